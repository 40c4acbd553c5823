"""The bad-input catalogue (README "Bad inputs"): every row is an input that must give exactly one line
`error: ...` naming the cause, a non-zero exit, and leave what was already written untouched.

Rows run `./launch.sh CONFIG ...` in-process (`stages.launch.main`): config rows before any stage starts
(the run directory must not even be created), stage rows against prepared run directories (every file
already there must keep its bytes, except what the row's own setup breaks on purpose).
"""

from __future__ import annotations

import errno
import json
import shutil
from pathlib import Path

import pytest

from pipeline.training import checkpoint as checkpoint_module
from pipeline.training.checkpoint import latest_checkpoint
from stages import launch
from tests.conftest import TINY_OVERRIDES

REPO = Path(__file__).resolve().parents[1]

# id, extra command-line arguments, what the one line must contain
CONFIG_ROWS = [
    ("misspelt key", ["pretrain_teacher.stpes=5"], "unknown config key 'pretrain_teacher.stpes'; did you mean "
                                                   "'pretrain_teacher.steps'?"),
    ("unknown section", ["trainer.lr=1"], "unknown config key 'trainer"),
    ("wrong type", ["pretrain_teacher.steps=many"], "wrong type for config key 'pretrain_teacher.steps'"),
    ("float for int", ["distill.batch_size=2.5"], "wrong type for config key 'distill.batch_size'"),
    ("negative steps", ["distill.steps=-3"], "distill.steps and batch_size must be positive"),
    ("zero batch", ["init_student.batch_size=0"], "init_student.steps and batch_size must be positive"),
    ("chunk not dividing frames", ["data.frames=7"], "data.frames (7) must be a multiple of data.frames_per_chunk (3)"),
    ("negative guidance", ["distill.real_guidance=-1"], "guidance must be >= 0"),
    ("zero learning rate", ["pretrain_teacher.lr=0"], "pretrain_teacher.lr must be positive"),
    ("EMA decay out of range", ["distill.ema_decay=1.5"], "0 <= ema_decay < 1"),
    ("zero checkpoint interval", ["init_student.checkpoint_every=0"], "checkpoint_every"),
    ("KV window not whole chunks", ["student.max_context_frames=4"], "student.max_context_frames (4) and sink_frames"),
    ("student steps not decreasing", ["student.denoising_steps=[250,500]"], "expected decreasing timesteps"),
    ("unknown method", ["distill.method=dmd2"], "distill.method: expected sf_dmd, df_dmd or sf_gan, got 'dmd2'"),
    ("unknown precision", ["run.mixed_precision=fp8"], "run.mixed_precision: expected auto, no or bf16"),
    ("sprites size", ["data.size=24"], "data.size: sprites frames are 16 or 32 pixels, got 24"),
    ("unknown evaluated model", ["evaluate.models=[teacher,studnet]"], "evaluate.models: unknown model 'studnet'"),
    ("override without =", ["pretrain_teacher.steps"], "is not of the form key=value"),
    ("unknown stage", ["--stages", "pretrain,distill"], "--stages: unknown stage 'pretrain'"),
    ("prompts without videos for df_dmd", ["data.kind=prompts", "data.path=/nowhere", "distill.method=df_dmd",
                                           "run.stages=[distill]"], "distill.method=df_dmd needs videos"),
    ("missing accelerate config", ["--num-processes", "2", "--accelerate-config", "/nowhere/ddp.yaml"],
     "--accelerate-config: file not found"),
    # values checked against their meaning (the ranges declared beside the fields; tests/test_config_schema.py
    # walks every numeric key): each once a traceback or a silent success
    ("zero frames per chunk", ["data.frames_per_chunk=0"], "data.frames_per_chunk must be positive, got 0"),
    ("zero heads", ["model.num_attention_heads=0"], "model.num_attention_heads must be positive, got 0"),
    ("negative FFN width", ["model.ffn_dim=-1"], "model.ffn_dim must be positive, got -1"),
    ("no layers", ["model.num_layers=0"], "model.num_layers must be positive, got 0"),
    ("odd head width", ["model.attention_head_dim=7"], "model.attention_head_dim must be a multiple of 2, got 7"),
    ("patch not dividing the frame", ["model.patch_size=[1,3,3]"], "model.patch_size [1, 3, 3] must divide the"),
    ("4 channels on RGB sprites", ["model.in_channels=4", "model.out_channels=4"],
     "model.in_channels: sprites videos have 3 channels (RGB), got 4"),
    ("one beta", ["pretrain_teacher.betas=[0.9]"], "pretrain_teacher.betas: expected [beta1, beta2]"),
    ("negative lag", ["pretrain_teacher.sampler.lag=-5"], "pretrain_teacher.sampler.lag must be >= 0, got -5"),
    ("zero sampler steps", ["pretrain_teacher.sampler.steps=0"], "pretrain_teacher.sampler.steps must be positive"),
    ("zero shift", ["pretrain_teacher.sampler.shift=0"], "pretrain_teacher.sampler.shift must be positive"),
    ("negative clip", ["student.clip_x0=-1"], "student.clip_x0 must be >= 0, got -1.0"),
    ("NaN learning rate", ["distill.lr=nan"], "distill.lr must be a finite number, got nan"),
    ("infinite guidance", ["distill.real_guidance=inf"], "distill.real_guidance must be a finite number"),
    ("huge seed", ["run.seed=99999999999999999999"], "run.seed: need 0 <= seed <= 4294967295"),
    ("unknown sigma distribution", ["pretrain_teacher.sigma_kind=normal"],
     "pretrain_teacher.sigma_kind: expected logit_normal or uniform, got 'normal'"),
]


def run_launch(capsys, args: list[str]) -> tuple[int, str]:
    capsys.readouterr()  # only this command's output
    rc = launch.main(args)
    err = capsys.readouterr().err.strip()
    return rc, err


def one_line(rc: int, err: str, needle: str) -> None:
    """Exit 2 and one `error:` line naming the cause (a stage's progress bar may precede it on stderr)."""
    assert rc == 2, err
    errors = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and err.splitlines()[-1] == errors[0] and "Traceback" not in err, err
    assert needle in errors[0], errors[0]


@pytest.mark.parametrize("extra,needle", [r[1:] for r in CONFIG_ROWS], ids=[r[0] for r in CONFIG_ROWS])
def test_config_rows(tmp_path, capsys, extra, needle):
    run = tmp_path / "run"
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    rc, err = run_launch(capsys, [str(cfg), *TINY_OVERRIDES, f"run.dir={run}", *extra])
    one_line(rc, err, needle)
    assert len(err.splitlines()) == 1  # nothing but the error
    assert not run.exists()  # nothing written


def test_missing_config_file(tmp_path, capsys):
    rc, err = run_launch(capsys, [str(tmp_path / "nope.yaml")])
    one_line(rc, err, "config file not found")
    assert len(err.splitlines()) == 1


def test_invalid_yaml(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed\n")
    one_line(*run_launch(capsys, [str(bad)]), "not valid YAML")


def test_yaml_of_the_wrong_shape(tmp_path, capsys):
    for body, needle in [("- run\n- data\n", "expected a mapping of config sections"),
                         ("run: 5\n", "config key 'run' is a section: expected a mapping of its keys, got 5"),
                         ("distill:\n  method: dmd2\n", "distill.method: expected sf_dmd, df_dmd or sf_gan, got 'dmd2'")]:
        f = tmp_path / "shape.yaml"
        f.write_text(body)
        rc, err = run_launch(capsys, [str(f), f"run.dir={tmp_path / 'run'}"])
        one_line(rc, err, needle)
        assert err.startswith(f"error: {f}: ") and len(err.splitlines()) == 1  # names the file
        assert not (tmp_path / "run").exists()


def test_unknown_key_in_file(tmp_path, capsys):
    f = tmp_path / "typo.yaml"
    f.write_text("distill:\n  lr_critic: 1.0e-3\n")
    one_line(*run_launch(capsys, [str(f), f"run.dir={tmp_path / 'run'}"]), "unknown config key 'distill.lr_critic'")
    assert not (tmp_path / "run").exists()


def test_bad_accelerate_config(tmp_path, capsys):
    f = tmp_path / "acc.yaml"
    f.write_text("distributed_type: TPU_POD\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    one_line(*run_launch(capsys, [str(cfg), "--num-processes", "2", "--accelerate-config", str(f), *TINY_OVERRIDES,
                                  f"run.dir={tmp_path / 'run'}"]), "distributed_type must be one of")


# ---- stage rows: a prepared run directory, one broken thing, the same command --------------------------

def snapshot(root: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()} if root.exists() else {}


def stage_cmd(tmp_path: Path, run: Path, stage: str, *extra) -> list[str]:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    return [str(cfg), "--stages", stage, *TINY_OVERRIDES, f"run.dir={run}", *extra]


@pytest.fixture
def teacher_run(trained_stage, tmp_path):
    """A copy of a finished tiny teacher stage in a fresh run directory."""
    _, path = trained_stage
    run = tmp_path / "run"
    shutil.copytree(path, run / "pretrain_teacher")
    return run


def test_stage_before_its_inputs(tmp_path, capsys):
    run = tmp_path / "run"
    one_line(*run_launch(capsys, stage_cmd(tmp_path, run, "init_student")), "pretrain_teacher")
    one_line(*run_launch(capsys, stage_cmd(tmp_path, run, "distill")), "init_student")
    assert not (run / "init_student").exists() and not (run / "distill").exists()


def test_unfinished_input_stage(teacher_run, tmp_path, capsys):
    man = teacher_run / "pretrain_teacher" / "manifest.json"
    m = json.loads(man.read_text())
    man.write_text(json.dumps({**m, "status": "running"}))  # e.g. killed while writing its preview
    before = snapshot(teacher_run)
    one_line(*run_launch(capsys, stage_cmd(tmp_path, teacher_run, "init_student", "model.prediction=x0")),
             "has not finished (status 'running')")
    assert snapshot(teacher_run) == before and not (teacher_run / "init_student").exists()


def test_input_changed_since_the_stage_started(teacher_run, tmp_path, capsys, monkeypatch):
    """init_student crashed mid-run; then its teacher was replaced: resuming would mix two teachers."""
    from stages import init_student
    from tests.conftest import Interrupt, crash_after_checkpoint

    args = stage_cmd(tmp_path, teacher_run, "init_student", "model.prediction=x0")
    with monkeypatch.context() as m:
        crash_after_checkpoint(m, init_student, 2)
        with pytest.raises(Interrupt):
            launch.main(args)
    w = teacher_run / "pretrain_teacher" / "transformer_ema" / "diffusion_pytorch_model.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 1  # another teacher (one bit of one weight)
    w.write_bytes(bytes(data))
    capsys.readouterr()
    before = snapshot(teacher_run)
    one_line(*run_launch(capsys, args), "input 'teacher'")
    assert snapshot(teacher_run) == before
    rc, err = run_launch(capsys, [*args, "--force"])  # starting over on the new teacher is allowed
    assert rc == 0, err


def _crashed_teacher(tmp_path, monkeypatch) -> tuple[list[str], Path]:
    """A teacher run stopped right after its step-2 checkpoint."""
    from stages import pretrain_teacher
    from tests.conftest import Interrupt, crash_after_checkpoint

    run = tmp_path / "run"
    args = stage_cmd(tmp_path, run, "pretrain_teacher")
    with monkeypatch.context() as m:
        crash_after_checkpoint(m, pretrain_teacher, 2)
        with pytest.raises(Interrupt):
            launch.main(args)
    return args, latest_checkpoint(run / "pretrain_teacher" / "checkpoints")


def test_truncated_checkpoint(tmp_path, capsys, monkeypatch):
    args, ckpt = _crashed_teacher(tmp_path, monkeypatch)
    f = ckpt / "optimizer.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    before = snapshot(ckpt.parent.parent)
    one_line(*run_launch(capsys, args), "corrupt safetensors file")
    assert snapshot(ckpt.parent.parent) == before


def test_corrupt_checkpoint_metadata(tmp_path, capsys, monkeypatch):
    args, ckpt = _crashed_teacher(tmp_path, monkeypatch)
    (ckpt / "meta.json").write_text("{not json")
    one_line(*run_launch(capsys, args), "meta.json unreadable")


def test_checkpoint_of_another_shape(tmp_path, capsys, monkeypatch):
    args, ckpt = _crashed_teacher(tmp_path, monkeypatch)
    before = snapshot(ckpt.parent.parent)
    one_line(*run_launch(capsys, [*args, "model.ffn_dim=48"]), "does not fit the model")
    assert snapshot(ckpt.parent.parent) == before


def test_nan_loss_stops_and_keeps_the_last_checkpoint(tmp_path, capsys):
    run = tmp_path / "run"
    args = stage_cmd(tmp_path, run, "pretrain_teacher", "pretrain_teacher.steps=6", "pretrain_teacher.warmup_steps=0",
                     "pretrain_teacher.lr=1e30", "pretrain_teacher.checkpoint_every=1")
    rc, err = run_launch(capsys, args)
    one_line(rc, err, "loss is nan at step")
    step = int(err.split("at step ")[1].split(";")[0])
    assert "lower pretrain_teacher.lr" in err
    last = latest_checkpoint(run / "pretrain_teacher" / "checkpoints")
    assert last is not None and json.loads((last / "meta.json").read_text())["step"] == step  # the last good one
    assert json.loads((run / "pretrain_teacher" / "manifest.json").read_text())["status"] == "running"


def test_unwritable_run_directory(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the run directory should go")
    one_line(*run_launch(capsys, stage_cmd(tmp_path, blocker / "run", "pretrain_teacher")),
             "cannot write the stage folder")
    assert blocker.read_text().startswith("a file")


def test_disk_full_during_a_checkpoint_write(tmp_path, capsys, monkeypatch):
    """The step-4 checkpoint fails half-way (ENOSPC): one line, the step-2 checkpoint intact, no temp left."""
    run = tmp_path / "run"
    args = stage_cmd(tmp_path, run, "pretrain_teacher", "pretrain_teacher.steps=6")
    orig = checkpoint_module.save_file

    def full_disk(tensors, path, *a, **kw):
        if "step_0000004" in str(path) and path.endswith("optimizer.safetensors"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return orig(tensors, path, *a, **kw)

    monkeypatch.setattr(checkpoint_module, "save_file", full_disk)
    one_line(*run_launch(capsys, args), "could not write checkpoint step 4")
    ckpts = run / "pretrain_teacher" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_0000002"]
    assert json.loads((ckpts / "step_0000002" / "meta.json").read_text())["step"] == 2
    monkeypatch.setattr(checkpoint_module, "save_file", orig)
    rc, err = run_launch(capsys, args)  # the same command, disk space back: resumes from step 2 and finishes
    assert rc == 0, err


def test_latent_folder_without_shards(tmp_path, capsys):
    (tmp_path / "latents").mkdir()
    one_line(*run_launch(capsys, stage_cmd(tmp_path, tmp_path / "run", "pretrain_teacher", "data.kind=latents",
                                           f"data.path={tmp_path / 'latents'}")), "no latent shards")


def test_no_unsafe_loading_in_the_code():
    """Nothing in the pipeline unpickles: every `torch.load` passes `weights_only=True` (the crafted-pickle
    refusal itself is `tests/test_convert.py::test_pickled_objects_are_refused`), no `pickle.load`."""
    calls = []
    for path in sorted(p for d in ("pipeline", "stages", "benchmarks") for p in (REPO / d).rglob("*.py")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("#")[0]
            if "torch.load(" in code and "`" not in code:
                calls.append((path.name, n))
                assert "weights_only=True" in code, f"{path}:{n}"
            assert "pickle.load(" not in code and "pickle.loads(" not in code, f"{path}:{n}"
    assert calls  # the one place that reads foreign .pt files was found (the scan works)
