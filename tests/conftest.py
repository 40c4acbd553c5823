"""Shared fixtures: tiny configs and tiny transformers that run in seconds on a CPU."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from pipeline.models.causal_wan import CausalWanTransformer  # noqa: E402
from pipeline.config import load_config  # noqa: E402

# The models here are tiny: one intra-op thread is far faster than several fighting over a busy CPU
# (measured: ~100x on 2 cores shared with another process).
torch.set_num_threads(1)

# A model of ~10k parameters on 16x16 sprites (16 tokens per frame with 4x4 patches), 6 frames.
TINY_OVERRIDES = [
    "run.device=cpu",
    "run.mixed_precision=no",
    "model.num_layers=2",
    "model.attention_head_dim=8",
    "model.num_attention_heads=2",
    "model.ffn_dim=32",
    "model.text_dim=16",
    "model.freq_dim=32",
    "data.frames=6",
    "data.frames_per_chunk=3",
    "data.cond_tokens=2",
    "pretrain_teacher.batch_size=4",
    "pretrain_teacher.steps=4",
    "pretrain_teacher.warmup_steps=2",
    "pretrain_teacher.checkpoint_every=2",
    "pretrain_teacher.log_every=1",
    "pretrain_teacher.preview_n=6",
    "pretrain_teacher.sampler.steps=2",
    "init_student.steps=4",
    "init_student.batch_size=4",
    "init_student.warmup_steps=2",
    "init_student.checkpoint_every=2",
    "init_student.log_every=1",
    "init_student.preview_n=6",
    "init_student.ode_pairs=6",
    "init_student.ode_shard_size=4",
    "distill.steps=4",
    "distill.batch_size=4",
    "distill.critic_steps_per_generator_step=2",
    "distill.checkpoint_every=2",
    "distill.log_every=1",
    "distill.preview_n=6",
    "distill.lr=1e-3",
    "distill.critic_lr=1e-3",
    "evaluate.num_videos=6",
    "evaluate.real_videos=24",
    "evaluate.long_factor=2",
    "evaluate.batch_size=4",
    "evaluate.preview_videos=6",
]

TINY_MODEL_KW = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=3,
                     out_channels=3, text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2)


def tiny_cfg(tmp_path, *extra, config_file=None):
    """A validated tiny `Config` whose run dir lies in `tmp_path`; `extra` are further key=value overrides."""
    return load_config(config_file, [*TINY_OVERRIDES, f"run.dir={Path(tmp_path) / 'run'}", *extra])


@pytest.fixture
def make_cfg(tmp_path):
    """Factory: `make_cfg(*overrides, sub="run")` → a tiny config writing under `tmp_path/sub`."""
    def make(*extra, sub: str = "run"):
        return load_config(None, [*TINY_OVERRIDES, f"run.dir={Path(tmp_path) / sub}", *extra])
    return make


def make_tiny_model(seed: int = 0, perturb: float = 0.2, **kw) -> CausalWanTransformer:
    """A tiny `CausalWanTransformer` in eval mode; every parameter perturbed so that no norm weight is
    exactly 1 and no bias exactly 0 (equivalence tests then exercise every weight)."""
    torch.manual_seed(seed)
    model = CausalWanTransformer(**{**TINY_MODEL_KW, **kw})
    with torch.no_grad():
        g = torch.Generator().manual_seed(seed + 100)
        for p in model.parameters():
            p.add_(perturb * torch.randn(p.shape, generator=g))
    return model.eval()


@pytest.fixture
def tiny_model():
    return make_tiny_model()


@pytest.fixture(scope="session")
def trained_stage(tmp_path_factory):
    """A finished tiny `pretrain_teacher` stage (4 steps), shared by the stage and CLI tests."""
    from stages import pretrain_teacher

    root = tmp_path_factory.mktemp("trained")
    cfg = tiny_cfg(root, "model.prediction=x0")  # the default tiny.yaml teacher predicts x0
    stage = pretrain_teacher.run(cfg)
    return cfg, stage.path


@pytest.fixture(scope="session")
def student_stage(trained_stage):
    """A finished tiny `init_student` stage (4 steps) next to `trained_stage`."""
    from stages import init_student

    cfg, _ = trained_stage
    return cfg, init_student.run(cfg).path


@pytest.fixture(scope="session")
def distill_stage(student_stage):
    """A finished tiny `distill` stage (4 critic steps) next to `student_stage`."""
    from stages import distill

    cfg, _ = student_stage
    return cfg, distill.run(cfg).path


def weights(stage_path: Path, sub: str) -> dict:
    from safetensors.torch import load_file
    return load_file(str(stage_path / sub / "diffusion_pytorch_model.safetensors"))


def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k}: max diff {(a[k] - b[k]).abs().max().item()}"


class Interrupt(Exception):
    """Stands in for a crash / Ctrl-C at a chosen point of a run."""


def copy_stages(src_run: Path, dst_run: Path, stages=("pretrain_teacher", "init_student")) -> Path:
    """Copy finished `stages` of the run `src_run` into `dst_run` (a fresh run that then reuses them); returns it."""
    import shutil

    for s in stages:
        shutil.copytree(Path(src_run) / s, Path(dst_run) / s)
    return Path(dst_run)


def crash_after_checkpoint(monkeypatch, stage_module, at_step: int):
    """Make `stage_module`'s run raise `Interrupt` right after writing the checkpoint of `at_step`."""
    from pipeline.training import checkpoint

    orig = checkpoint.save_training_checkpoint

    def save(root, step, *a, **kw):
        out = orig(root, step, *a, **kw)
        if step == at_step and Path(root).parent.name == stage_module.STAGE:
            raise Interrupt(f"crash after checkpoint {step}")
        return out

    monkeypatch.setattr(checkpoint, "save_training_checkpoint", save)


def crash_then_resume(monkeypatch, capsys, stage_module, cfg, run_dir: Path, inputs=(), at_step: int = 2) -> Path:
    """Run `stage_module` on `cfg` in `run_dir` (after copying the finished stages `inputs` there from
    `cfg.run.dir`), crash it after the checkpoint of `at_step`, run it again and check it said it resumed.

    Returns:
        the resumed stage's folder.
    """
    from dataclasses import replace

    copy_stages(cfg.run.dir, run_dir, inputs)
    cfg2 = replace(cfg, run=replace(cfg.run, dir=str(run_dir)))
    with monkeypatch.context() as m:
        crash_after_checkpoint(m, stage_module, at_step)
        with pytest.raises(Interrupt):
            stage_module.run(cfg2)
    capsys.readouterr()
    path = stage_module.run(cfg2).path
    assert f"resuming from step_{at_step:07d} (step {at_step})" in capsys.readouterr().out
    return path


# ---- command-line checks shared by the bad-input tests ----

def one_error(rc: int, err: str, *needles: str) -> str:
    """Exit 2 and exactly one `error:` line (the last on stderr) containing every needle; returns it."""
    assert rc == 2, err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and err.strip().splitlines()[-1] == lines[0] and "Traceback" not in err, err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def call(capsys, main, *argv) -> tuple[int, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def capture_method(monkeypatch) -> dict:
    """`seen["method"]`: the distill method of the next run, recorded as it binds its losses (its models
    prepared, `frozen` / `trained` / `offloaded` in place), with the devices of its offloaded real score."""
    from pipeline.methods.distillation import DMDMethod

    seen, orig = {}, DMDMethod.bind

    def bind(self):
        seen["method"] = self
        if self.offloaded is not None:
            seen["offloaded_devices"] = {p.device.type for p in self.offloaded.parameters()}
        orig(self)
    monkeypatch.setattr(DMDMethod, "bind", bind)
    return seen
