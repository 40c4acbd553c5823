"""Issue 19, rule 3: a resume checks what it resumes. Settings that change what is trained are saved with
every checkpoint and in a done stage's manifest; a rerun with another value refuses in one line naming the
key; harmless keys (more steps, intervals, previews) may change and the change is recorded; `--force` moves
the old stage folder aside; ODE pairs carry what made them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from pipeline.data.ode_pairs import OdePairs, write_ode_pairs
from pipeline.diffusion.sampling import Denoiser
from pipeline.io.run_dir import StaleInputError
from pipeline.training.checkpoint import latest_checkpoint
from pipeline.training.settings import SettingsChanged, changes, is_harmless, refuse_changes, settings_of
from stages import init_student, launch, pretrain_teacher
from tests.conftest import TINY_OVERRIDES, Interrupt, crash_after_checkpoint, make_tiny_model, tiny_cfg


def snapshot(root: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def crashed_teacher(tmp_path_factory):
    """A teacher run (4 steps) stopped right after its step-2 checkpoint."""
    tmp = tmp_path_factory.mktemp("crashed")
    cfg = tiny_cfg(tmp)
    with pytest.MonkeyPatch.context() as m:
        crash_after_checkpoint(m, pretrain_teacher, 2)
        with pytest.raises(Interrupt):
            pretrain_teacher.run(cfg)
    return Path(cfg.run.dir)


def copy_run(src: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(src, run)
    return run


@pytest.mark.parametrize("override,key", [
    ("pretrain_teacher.lr=0.003", "pretrain_teacher.lr"),
    ("model.prediction=x0", "model.prediction"),
    ("run.seed=7", "run.seed"),
    ("pretrain_teacher.batch_size=2", "pretrain_teacher.batch_size*processes=4 (now 2)"),
    ("pretrain_teacher.trajectory=tf", "pretrain_teacher.trajectory"),
    ("data.cond_seed=99", "data.cond_seed"),
])
def test_resume_with_a_changed_training_key_is_refused(crashed_teacher, tmp_path, capsys, override, key):
    run = copy_run(crashed_teacher, tmp_path)
    before = snapshot(run)
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("{}\n")
    capsys.readouterr()
    rc = launch.main([str(cfg_file), "--stages", "pretrain_teacher", *TINY_OVERRIDES, f"run.dir={run}", override])
    err = capsys.readouterr().err.strip().splitlines()
    errors = [ln for ln in err if ln.startswith("error: ")]
    assert rc == 2 and len(errors) == 1 and err[-1] == errors[0] and not any("Traceback" in ln for ln in err)
    assert key in errors[0] and "checkpoint step_0000002" in errors[0] and "--force" in errors[0]
    assert snapshot(run) == before  # nothing written


def test_more_steps_and_other_intervals_resume_and_are_recorded(crashed_teacher, tmp_path, capsys):
    run = copy_run(crashed_teacher, tmp_path)
    cfg = tiny_cfg(tmp_path, f"run.dir={run}", "pretrain_teacher.steps=6", "pretrain_teacher.log_every=2",
                   "pretrain_teacher.preview_n=2")
    capsys.readouterr()
    stage = pretrain_teacher.run(cfg)
    assert "resuming from step_0000002" in capsys.readouterr().out
    m = json.loads((stage.path / "manifest.json").read_text())
    assert m["status"] == "done" and m["metrics"]["steps"] == 6
    [change] = m["setting_changes"]
    assert change["at_step"] == 2 and change["pretrain_teacher.steps"] == [4, 6]
    assert change["pretrain_teacher.log_every"] == [1, 2] and change["pretrain_teacher.preview_n"] == [6, 2]


def test_done_stage_with_changed_settings_or_inputs_is_refused_and_force_moves_it_aside(trained_stage, tmp_path,
                                                                                         capsys):
    cfg, teacher = trained_stage
    run = tmp_path / "run"
    shutil.copytree(teacher, run / "pretrain_teacher")
    base = [*TINY_OVERRIDES, f"run.dir={run}"]
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("{}\n")
    assert launch.main([str(cfg_file), "--stages", "init_student", *base]) == 0
    done = run / "init_student"
    before = snapshot(done)

    # a setting init_student trained with: refused, naming the key; nothing changed
    capsys.readouterr()
    rc = launch.main([str(cfg_file), "--stages", "init_student", *base, "student.shift=3.0"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: ") and "student.shift" in err[-1] and "finished stage" in err[-1]
    assert snapshot(done) == before

    # its input changed since (the teacher's weights): refused too
    w = run / "pretrain_teacher" / "transformer_ema" / "diffusion_pytorch_model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 1
    w.write_bytes(bytes(data))
    with pytest.raises(StaleInputError, match="input 'teacher'"):
        init_student.run(tiny_cfg(tmp_path, f"run.dir={run}"))
    assert snapshot(done) == before

    # --force: the old folder is moved aside whole, a new run starts from scratch
    capsys.readouterr()
    assert launch.main([str(cfg_file), "--stages", "init_student", *base, "--force"]) == 0
    assert "moved the earlier stage folder aside" in capsys.readouterr().out
    aside = run / "init_student.replaced-1"
    assert snapshot(aside) == {aside / p.relative_to(done): b for p, b in before.items()}
    assert json.loads((done / "manifest.json").read_text())["status"] == "done"


def test_a_checkpoint_records_the_settings(crashed_teacher):
    meta = json.loads((latest_checkpoint(crashed_teacher / "pretrain_teacher" / "checkpoints") / "meta.json")
                      .read_text())
    settings = meta["extra"]["settings"]
    assert settings["pretrain_teacher.lr"] > 0 and settings["model.prediction"] == "flow"
    assert "pretrain_teacher.sampler.steps" in settings  # recorded, but harmless for the teacher (preview only)


def test_settings_rules():
    cfg = tiny_cfg("/tmp/unused")
    s = settings_of(cfg, ["run.seed", "distill"])
    assert s["run.seed"] == cfg.run.seed and s["distill.method"] == "sf_dmd"
    assert is_harmless("distill.steps") and is_harmless("init_student.checkpoint_every")
    assert not is_harmless("distill.lr") and is_harmless("pretrain_teacher.sampler.steps", ("pretrain_teacher.sampler",))
    diff = changes({"a.lr": 1, "a.steps": 2}, {"a.lr": 1, "a.steps": 3, "a.new": 1})
    assert diff == {"a.steps": (2, 3), "a.new": (None, 1)}
    with pytest.raises(SettingsChanged, match="a.new=null"):
        refuse_changes("a", "x", diff)
    assert refuse_changes("a", "x", {"a.steps": (2, 3)}) == {"a.steps": (2, 3)}


def test_ode_pairs_carry_what_made_them(tmp_path):
    cfg = tiny_cfg(tmp_path)
    teacher = Denoiser(make_tiny_model(), "block_causal", 3, "flow")
    table = torch.randn(7, 2, 16)

    def conditions(start, n):
        labels = torch.arange(start, start + n) % 6
        return table[labels], labels

    sampler = cfg.pretrain_teacher.sampler
    sigmas = torch.tensor([1.0, 0.5])
    made = {"pretrain_teacher.sampler.steps": 2, "teacher_sha256": "abc"}
    kw = dict(uncond=None, shard_size=2, latent_shape=(3, 6, 8, 8), student_sigmas=sigmas, sampler=sampler, seed=0)
    paths = write_ode_pairs(tmp_path / "pairs", teacher, conditions, num_pairs=4, provenance=made, **kw)
    assert len(paths) == 2
    with pytest.raises(ValueError, match="pretrain_teacher.sampler.steps=2.*now has 3"):
        write_ode_pairs(tmp_path / "pairs", teacher, conditions, num_pairs=4,
                        provenance={**made, "pretrain_teacher.sampler.steps": 3}, **kw)
    with pytest.raises(ValueError, match="teacher_sha256"):
        write_ode_pairs(tmp_path / "pairs", teacher, conditions, num_pairs=4, provenance={**made, "teacher_sha256": "d"},
                        **kw)
    # fewer pairs asked for: only the shards of this run are read, not the leftovers
    fewer = write_ode_pairs(tmp_path / "pairs", teacher, conditions, num_pairs=2, provenance=made, **kw)
    assert len(OdePairs(tmp_path / "pairs", fewer)) == 2 and len(OdePairs(tmp_path / "pairs")) == 4
