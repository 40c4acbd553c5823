"""Stage `pretrain_teacher`: the loss learns, outputs, exact resume, skip, NaN and corrupt checkpoints."""

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import load_file

from pipeline.models.causal_wan import CausalWanTransformer, build_transformer
from pipeline.training.checkpoint import CheckpointError, latest_checkpoint
from pipeline.config import ConfigError
from pipeline.data.sources import build_source, class_table
from pipeline.diffusion.sampling import Denoiser
from pipeline.diffusion.trajectories import TrajectoryDistribution
from stages import pretrain_teacher
from pipeline.methods import flow_matching
from pipeline.cli import stage_main
from pipeline.diffusion.losses import flow_matching_loss
from pipeline.training.optim import NonFiniteLoss
from tests.conftest import TINY_OVERRIDES, Interrupt, assert_same_weights, crash_after_checkpoint, tiny_cfg, weights


def test_flow_matching_loss_decreases(make_cfg):
    cfg = make_cfg()
    torch.manual_seed(0)
    model = build_transformer(cfg.model)
    den = Denoiser(model, "block_causal", cfg.data.frames_per_chunk)
    source = build_source(cfg, seed=0)
    traj = TrajectoryDistribution(kind="df", frames_per_chunk=cfg.data.frames_per_chunk)
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(60):
        batch = source.next_batch(8)
        sigma, weight = traj.sample(8, cfg.data.frames, gen)
        noise = torch.randn(batch["x0"].shape, generator=gen)
        loss = flow_matching_loss(den, batch["x0"], batch["context"], sigma, weight, noise)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < 0.8 * first, (first, last)


def test_flow_matching_loss_definition():
    """The loss is the weighted per-frame MSE to `ε - x0` (flow) or to x0 (x0 prediction)."""
    class Const(torch.nn.Module):
        def forward(self, x, t, ctx, **kw):
            return torch.zeros_like(x)

    x0 = torch.randn(2, 3, 6, 4, 4)
    noise = torch.randn_like(x0)
    sigma = torch.rand(2, 6)
    weight = torch.zeros(2, 6)
    weight[0, 2] = 1.0
    flow_loss = flow_matching_loss(Denoiser(Const(), frames_per_chunk=3), x0, None, sigma, weight, noise)
    torch.testing.assert_close(flow_loss, (noise - x0)[0, :, 2].pow(2).mean())
    x0_loss = flow_matching_loss(Denoiser(Const(), frames_per_chunk=3, prediction="x0"), x0, None, sigma, weight, noise)
    torch.testing.assert_close(x0_loss, x0[0, :, 2].pow(2).mean())


def test_run_writes_outputs(trained_stage):
    cfg, path = trained_stage
    assert (path / "config.yaml").is_file()
    m = json.loads((path / "manifest.json").read_text())
    assert m["status"] == "done" and m["stage"] == "pretrain_teacher"
    assert m["metrics"]["steps"] == cfg.pretrain_teacher.steps
    assert m["metrics"]["final_loss"] > 0
    for sub in ("transformer", "transformer_ema"):
        assert (path / sub / "config.json").is_file()
        assert isinstance(CausalWanTransformer.from_pretrained(path / sub), CausalWanTransformer)
    # Raw and EMA weights differ (EMA lags), and stock diffusers reads the folder.
    raw, ema = weights(path, "transformer"), weights(path, "transformer_ema")
    assert any(not torch.equal(raw[k], ema[k]) for k in raw)
    WanTransformer3DModel.from_pretrained(path / "transformer_ema")
    table = load_file(str(path / "conditioning.safetensors"))["class_table"]
    assert torch.equal(table, class_table(cfg))
    assert (path / "preview.gif").stat().st_size > 0
    events = list((path / "logs").rglob("events.out.tfevents.*"))
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert {"loss", "lr", "grad_norm"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("loss")] == list(range(1, cfg.pretrain_teacher.steps + 1))
    assert latest_checkpoint(path / "checkpoints").name == f"step_{cfg.pretrain_teacher.steps:07d}"


def test_done_stage_is_skipped(trained_stage, capsys):
    cfg, path = trained_stage
    f = path / "transformer" / "diffusion_pytorch_model.safetensors"
    before = (f.stat().st_mtime_ns, f.read_bytes())
    pretrain_teacher.run(cfg)
    assert "done already" in capsys.readouterr().out
    assert (f.stat().st_mtime_ns, f.read_bytes()) == before


RESUME = ["pretrain_teacher.checkpoint_every=3", "pretrain_teacher.warmup_steps=6",
          "pretrain_teacher.log_every=100", "pretrain_teacher.preview_n=1", "pretrain_teacher.sampler.steps=1"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """An 8-step run in one go (warm-up still going at step 4, so the LR schedule must resume right)."""
    cfg = tiny_cfg(tmp_path_factory.mktemp("full"), "pretrain_teacher.steps=8", *RESUME)
    path = pretrain_teacher.run(cfg).path
    return {sub: weights(path, sub) for sub in ("transformer", "transformer_ema")}


def test_extend_done_stage_equals_uninterrupted(make_cfg, uninterrupted, capsys):
    first = make_cfg("pretrain_teacher.steps=4", *RESUME)
    pretrain_teacher.run(first)
    capsys.readouterr()
    second = make_cfg("pretrain_teacher.steps=8", *RESUME)
    path = pretrain_teacher.run(second).path
    out = capsys.readouterr().out
    assert "resuming from step_0000004 (step 4)" in out
    assert json.loads((path / "manifest.json").read_text())["metrics"]["steps"] == 8
    for sub, w in uninterrupted.items():
        assert_same_weights(weights(path, sub), w)


def test_crash_resume_equals_uninterrupted(make_cfg, uninterrupted, monkeypatch, capsys):
    cfg = make_cfg("pretrain_teacher.steps=8", *RESUME)
    with monkeypatch.context() as m:
        crash_after_checkpoint(m, pretrain_teacher, 6)
        with pytest.raises(Interrupt):
            pretrain_teacher.run(cfg)
    path = Path(cfg.run.dir) / "pretrain_teacher"
    assert json.loads((path / "manifest.json").read_text())["status"] == "running"
    assert not (path / "transformer").exists()
    meta = json.loads((latest_checkpoint(path / "checkpoints") / "meta.json").read_text())
    assert meta["step"] == 6
    capsys.readouterr()
    pretrain_teacher.run(cfg)
    assert "resuming from step_0000006 (step 6)" in capsys.readouterr().out
    for sub, w in uninterrupted.items():
        assert_same_weights(weights(path, sub), w)


def test_crash_after_final_checkpoint_finishes_on_rerun(make_cfg, monkeypatch):
    cfg = make_cfg(*RESUME)
    with monkeypatch.context() as m:
        def boom(*a, **kw):
            raise Interrupt("crash while writing the preview")
        m.setattr(flow_matching, "preview", boom)
        with pytest.raises(Interrupt):
            pretrain_teacher.run(cfg)
    stage = pretrain_teacher.run(cfg)
    man = stage.manifest()
    assert man["status"] == "done" and man["metrics"]["steps"] == cfg.pretrain_teacher.steps
    assert man["metrics"]["final_loss"] is not None
    assert (stage.path / "preview.gif").is_file()


def test_nan_loss_raises_clear_error(make_cfg):
    cfg = make_cfg("pretrain_teacher.lr=1e30", "pretrain_teacher.warmup_steps=0", "pretrain_teacher.steps=6")
    with pytest.raises(NonFiniteLoss, match=r"loss is nan at step \d+.*pretrain_teacher\.lr"):
        pretrain_teacher.run(cfg)
    assert json.loads((Path(cfg.run.dir) / "pretrain_teacher" / "manifest.json").read_text())["status"] != "done"


def test_corrupt_checkpoint_raises_one_line(make_cfg, monkeypatch):
    cfg = make_cfg("pretrain_teacher.steps=4", "pretrain_teacher.checkpoint_every=2")
    with monkeypatch.context() as m:
        crash_after_checkpoint(m, pretrain_teacher, 2)
        with pytest.raises(Interrupt):
            pretrain_teacher.run(cfg)
    ckpt = latest_checkpoint(Path(cfg.run.dir) / "pretrain_teacher" / "checkpoints")
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError) as e:
        pretrain_teacher.run(cfg)
    msg = str(e.value)
    assert "\n" not in msg and "model.safetensors" in msg and "corrupt" in msg
    # Through the stage's command line: exit code 2 and one line on stderr, no traceback.
    (Path(cfg.run.dir) / "c.yaml").write_text("")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = stage_main("pretrain_teacher", pretrain_teacher.run,
                        ["--config", str(Path(cfg.run.dir) / "c.yaml"), *TINY_OVERRIDES, f"run.dir={cfg.run.dir}",
                         "pretrain_teacher.steps=4", "pretrain_teacher.checkpoint_every=2"])
    assert rc == 2
    lines = err.getvalue().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "model.safetensors" in lines[0]


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_lr_schedule(make_cfg, schedule):
    from pipeline.training.optim import make_optimizer

    cfg = make_cfg(f"pretrain_teacher.lr_schedule={schedule}", "pretrain_teacher.steps=10",
                   "pretrain_teacher.warmup_steps=2", "pretrain_teacher.lr=1e-3")
    optimizer, scheduler = make_optimizer(torch.nn.Linear(2, 2), cfg.pretrain_teacher)
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[:3] == pytest.approx([0.0, 5e-4, 1e-3])  # warm-up
    if schedule == "constant":
        assert lrs[2:] == pytest.approx([1e-3] * 8) and optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    else:
        assert all(a > b for a, b in zip(lrs[2:], lrs[3:])) and optimizer.param_groups[0]["lr"] == pytest.approx(0)


def test_unknown_lr_schedule_is_an_error(make_cfg):
    with pytest.raises(ConfigError, match="init_student.lr_schedule"):
        make_cfg("init_student.lr_schedule=linear")
