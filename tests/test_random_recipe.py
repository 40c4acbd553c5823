"""`benchmarks/random_recipe.py`: random stand-ins for a recipe's inputs (a stock-Wan-like transformer folder,
prompt-embedding shards) at a tiny shape with Wan's 16 latent channels, and the real recipe
(`configs/wan2.1-t2v-1.3b/student.yaml`) training on them through the launcher, as the GPU check runs it at
full shape; the trainer's device-peak report beside the `--dry-run` estimate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from benchmarks import random_recipe
from conftest import call, one_error
from pipeline.config import load_config
from pipeline.io.run_dir import read_json
from pipeline.plan import memory_estimate
from stages.launch import main as launch

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "configs" / "wan2.1-t2v-1.3b" / "student.yaml"
# Wan2.1's channels, patch and text layout, at a size that trains in a second
SMALL = dict(num_layers=2, num_attention_heads=2, attention_head_dim=16, ffn_dim=64, text_dim=32, freq_dim=32)
SHAPE_KEYS = [f"model.{k}={v}" for k, v in SMALL.items()]
RUN_KEYS = [*SHAPE_KEYS, "data.latent_size=[8,8]", "data.frames=6", "components.max_sequence_length=16",
            "distill.steps=2", "distill.grad_accum=1", "run.device=cpu",
            "run.mixed_precision=no"]  # the recipes' bf16: one process keeps accelerate's first choice for all tests


@pytest.fixture(scope="module")
def stand_ins(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("random_recipe")
    shape = json.loads((REPO / "configs" / "shapes" / "wan2.1-t2v-1.3b.json").read_text())
    (root / "shape.json").write_text(json.dumps({**shape, **SMALL}))
    assert random_recipe.main([str(root / "out"), "--shape", str(root / "shape.json"), "--prompts", "3",
                               "--seq-len", "16", "--latents", "6", "8", "8"]) == 0
    return root / "out"


def overrides(out: Path, name: str = "overrides.txt") -> list[str]:
    return (out / name).read_text().split()


def test_stand_ins_are_what_prepare_data_and_diffusers_write(stand_ins):
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel.from_pretrained(stand_ins / "Wan-random" / "transformer")
    assert model.config.in_channels == 16 and model.config.num_layers == 2  # the shape file's, Wan's channels
    rows = load_file(stand_ins / "prompt-embeds" / "shard_00000.safetensors")["prompt_embeds"]
    null = load_file(stand_ins / "prompt-embeds" / "null_embeds.safetensors")["prompt_embeds"]
    assert rows.shape == (3, 16, 32) and null.shape == (1, 16, 32)
    used = (rows.float().abs().sum(-1) > 0).sum(-1)
    for r, n in zip(rows, used.tolist()):  # leading tokens, then zero padding as Wan's pipeline pads
        assert 8 <= n <= 16 and (r[:n].abs().sum(-1) > 0).all()
    assert (null[0, 1:] == 0).all() and null[0, 0].abs().sum() > 0  # the empty prompt: one token (EOS)
    videos = load_file(stand_ins / "latents" / "shard_00000.safetensors")
    assert videos["latents"].shape == (3, 16, 6, 8, 8) and torch.equal(videos["prompt_embeds"], rows)
    keys = dict(o.split("=", 1) for o in overrides(stand_ins))
    assert keys["distill.teacher"] == keys["distill.student"] == str(stand_ins / "Wan-random" / "transformer")


class PeakCounters:
    """What a GPU's allocator counters (`torch.cuda.max_memory_allocated` / `reset_peak_memory_stats`) would say
    if the run held `levels[phase]` bytes in each phase of `PhasePeaks` (None: outside them)."""

    def __init__(self, levels: dict):
        self.levels, self.peak, self.peaks = levels, 0, None

    def max_memory_allocated(self, device):
        self.peak = max(self.peak, self.levels[self.peaks.current])
        return self.peak

    def reset_peak_memory_stats(self, device):
        self.peak = 0

    def phase_peaks(self, device):
        from pipeline.training.memory import PhasePeaks

        self.peaks = PhasePeaks(device, allocator=self)
        return self.peaks


def test_recipe_distills_from_stock_wan_folders(stand_ins, capsys, monkeypatch):
    """The SF recipe's distill stage on 16-channel stock folders (no sampling record) as student, real and fake
    score: it trains, and with a device's peak counters (a GPU's) it reports its peak beside the `--dry-run`
    estimate, and each phase's beside that phase's estimate."""
    mib = 2 ** 20  # what the counters would say on a GPU: the critic update holds the most
    counters = PeakCounters({None: 1 * mib, "generator update": 2 * mib, "critic update": 3 * mib})
    monkeypatch.setattr("pipeline.training.trainer.PhasePeaks", counters.phase_peaks)
    peak = 3 * mib
    argv = [RECIPE, "--stages", "distill", *overrides(stand_ins), *RUN_KEYS]
    capsys.readouterr()
    rc = launch([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 0, err
    stage = stand_ins / "run" / "distill"
    manifest = read_json(stage / "manifest.json")
    assert manifest["status"] == "done" and manifest["metrics"]["steps"] == 2
    cfg = load_config(RECIPE, [str(a) for a in [*overrides(stand_ins), *RUN_KEYS]])
    est = memory_estimate(cfg, "distill").total
    assert manifest["metrics"]["peak_memory_gib"] == pytest.approx(peak / 2 ** 30)
    assert manifest["metrics"]["memory_estimate_gib"] == pytest.approx(est / 2 ** 30)
    line = next(ln for ln in out.splitlines() if ln.startswith("[distill] peak device memory"))
    assert f"estimate / measured {est / peak:.2f}" in line
    by_phase = manifest["metrics"]["memory_by_phase_gib"]
    assert set(by_phase) == {"generator update", "critic update"}
    for name, held in (("generator update", 2 * mib), ("critic update", 3 * mib)):
        at = memory_estimate(cfg, "distill", phase=name).total
        assert by_phase[name] == pytest.approx({"peak": held / 2 ** 30, "estimate": at / 2 ** 30})
        assert f"; {name} {held / 2 ** 30:.2f} GiB, estimate {at / 2 ** 30:.2f} ({at / held:.2f})" in line
    student = load_file(stage / "transformer" / "diffusion_pytorch_model.safetensors")
    start = load_file(stand_ins / "Wan-random" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(student[k], start[k]) for k in start)  # the generator trained


def test_init_student_measures_its_ode_pairs_and_training_apart(stand_ins, tmp_path, capsys, monkeypatch):
    """init_student's two phases (the teacher's ODE pairs, then the regression) each get their own measured peak,
    beside that phase's `--dry-run` estimate (the phases the trainer measures are the estimate's)."""
    mib = 2 ** 20
    counters = PeakCounters({None: 1 * mib, "ODE pairs": 4 * mib, "training": 2 * mib})
    monkeypatch.setattr("pipeline.training.trainer.PhasePeaks", counters.phase_peaks)
    keys = [*overrides(stand_ins), *RUN_KEYS, f"run.dir={tmp_path / 'run'}", "init_student.ode_pairs=2",
            "init_student.ode_shard_size=2", "init_student.steps=1", "init_student.grad_accum=1",
            "pretrain_teacher.sampler.steps=2"]
    capsys.readouterr()
    assert launch([str(a) for a in [RECIPE, "--stages", "init_student", *keys]]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    metrics = read_json(tmp_path / "run" / "init_student" / "manifest.json")["metrics"]
    cfg = load_config(RECIPE, keys)
    assert metrics["peak_memory_gib"] == pytest.approx(4 * mib / 2 ** 30)
    assert set(metrics["memory_by_phase_gib"]) == {"ODE pairs", "training"}
    for name, held in (("ODE pairs", 4 * mib), ("training", 2 * mib)):
        at = memory_estimate(cfg, "init_student", phase=name).total
        assert metrics["memory_by_phase_gib"][name] == pytest.approx({"peak": held / 2 ** 30, "estimate": at / 2 ** 30})
        assert f"; {name} {held / 2 ** 30:.2f} GiB, estimate {at / 2 ** 30:.2f}" in out


def test_no_peak_line_without_a_device_peak(tmp_path, stand_ins, capsys):
    """On a CPU (no allocator peak) the stage neither prints nor records one."""
    argv = [RECIPE, "--stages", "distill", *overrides(stand_ins), *RUN_KEYS, f"run.dir={tmp_path / 'run'}"]
    capsys.readouterr()
    rc = launch([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert "peak device memory" not in out + err
    assert "peak_memory_gib" not in read_json(tmp_path / "run" / "distill" / "manifest.json")["metrics"]


def test_out_of_memory_says_what_would_fit_and_the_rerun_resumes(tmp_path, stand_ins, capsys, monkeypatch):
    """A stage that runs out of device memory (torch's `OutOfMemoryError`, raised here at step 2 by the fault point
    `CVD_FAULT=oom:2`) stops with exit status 2 and one line: the stage, step and phase, the `--dry-run` estimate
    of the setting, the settings that would lower it each with its estimate, where a rerun resumes; the checkpoint
    of step 1 is kept and the rerun finishes the stage from it. The CPU allocator's own error counts as one too."""
    from pipeline.cli import run_command
    from pipeline.plan import memory_remedies
    from pipeline.training.memory import is_out_of_memory, size_text

    keys = [*overrides(stand_ins), *RUN_KEYS, f"run.dir={tmp_path / 'run'}", "distill.checkpoint_every=1"]
    monkeypatch.setenv("CVD_FAULT", "oom:2")
    line = one_error(*call(capsys, launch, RECIPE, "--stages", "distill", *keys),
                     "out of cpu memory in the distill stage at step 2 (critic update)",
                     "a rerun resumes from its checkpoint of step 1")
    cfg = load_config(RECIPE, keys)
    assert f"--dry-run estimates ~{size_text(memory_estimate(cfg, 'distill').total)} per device" in line
    remedies = memory_remedies(cfg, "distill")
    assert [r for r, _ in remedies] == ["distill.ema_device=cpu", "distill.teacher_offload=true"]  # lowest first
    for text, est in remedies:
        assert f"{text} (~{size_text(est.total)})" in line
    assert read_json(tmp_path / "run" / "distill" / "manifest.json")["status"] == "running"
    # a remedy a resume would refuse (another batch split) says so once the stage has a checkpoint
    from pipeline.plan import remedies_text

    tiny = memory_remedies(load_config(REPO / "configs" / "tiny.yaml"), "pretrain_teacher")
    started = remedies_text(tiny, started=True)
    assert "pretrain_teacher.gradient_checkpointing=true (~" in started and "pretrain_teacher.batch_size=8 " \
        "pretrain_teacher.grad_accum=2 (~85.7 MiB; with --force: restarts the stage)" in started
    assert "restarts" not in remedies_text(tiny) and "restarts" not in line
    monkeypatch.delenv("CVD_FAULT")
    capsys.readouterr()
    assert launch([str(a) for a in [RECIPE, "--stages", "distill", *keys]]) == 0, capsys.readouterr().err
    assert read_json(tmp_path / "run" / "distill" / "manifest.json")["metrics"]["steps"] == 2
    # more than any machine's address space: the CPU allocator refuses at once; outside a training stage (sample,
    # evaluate) every command says so in one line
    with pytest.raises(RuntimeError) as error:
        torch.empty(2 ** 50, dtype=torch.uint8)
    assert is_out_of_memory(error.value) and not is_out_of_memory(RuntimeError("shape mismatch"))
    wrapped = RuntimeError("backend compiler failed")  # as torch.compile re-raises what failed inside it
    wrapped.__cause__ = torch.OutOfMemoryError("CUDA out of memory")
    assert is_out_of_memory(wrapped)
    one_error(*call(capsys, lambda argv: run_command(lambda: torch.empty(2 ** 50, dtype=torch.uint8))),
              "error: out of memory: ", "can't allocate memory")


def test_output_rule(tmp_path, stand_ins, capsys):
    shape = REPO / "configs" / "shapes" / "wan2.1-t2v-1.3b.json"
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    for argv in ([foreign, "--shape", shape], [foreign, "--shape", shape, "--force"]):
        one_error(*call(capsys, random_recipe.main, *argv), str(foreign))
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
    one_error(*call(capsys, random_recipe.main, tmp_path / "x", "--shape", tmp_path / "none.json"), "none.json")
    one_error(*call(capsys, random_recipe.main, tmp_path / "x", "--prompts", "0"), "--prompts")
    assert not (tmp_path / "x").exists()


# Which of a recipe's sources come from its own earlier stages (kept), not from the stand-ins.
OWN_STAGES = {"teacher": (), "student": (), "self_forcing": ("distill.student",),
              "causal_forcing": ("init_student.teacher", "distill.student")}


@pytest.mark.parametrize("recipe", sorted(OWN_STAGES))
def test_every_wan_recipe_runs_on_stand_ins_from_anywhere(recipe, stand_ins, tmp_path, capsys, monkeypatch):
    """Each shipped Wan2.1 recipe, all its stages, started outside the checkout (its `${repo:...}` shape files
    still found) on 16-channel stock folders and random data: the recipes that start from stock Wan models run."""
    monkeypatch.chdir(tmp_path)
    path = REPO / "configs" / "wan2.1-t2v-1.3b" / f"{recipe}.yaml"
    cfg = load_config(path)
    videos = "pretrain_teacher" in cfg.run.stages or cfg.distill.method == "df_dmd"
    keys = [k for k in overrides(stand_ins, "overrides-latents.txt" if videos else "overrides.txt")
            if k.split("=")[0] not in OWN_STAGES[recipe]]
    steps = [f"{s}.{k}={v}" for s in ("pretrain_teacher", "init_student", "distill")
             for k, v in (("steps", 2), ("grad_accum", 1))]
    capsys.readouterr()
    rc = launch([str(path), *keys, *RUN_KEYS, *steps, "init_student.ode_pairs=2", f"run.dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert rc == 0, err
    for stage in cfg.run.stages:
        assert read_json(tmp_path / "run" / stage / "manifest.json")["status"] == "done", stage
