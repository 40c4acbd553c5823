"""The GAN row (`pipeline/methods/gan.py`): sf_gan and DMD + GAN — the losses against a direct computation,
where gradients go, the alternation, bit-exact resume of the discriminator, a NaN stop."""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from torch.nn.attention import SDPBackend, sdpa_kernel

from conftest import make_tiny_model, copy_stages, capture_method, TINY_OVERRIDES, assert_same_weights, crash_then_resume, one_error, call, weights
from pipeline.config import ConfigError, load_config
from pipeline.methods import gan as gan_module
from pipeline.methods.dmd import SelfForcingDMD
from pipeline.methods.gan import Discriminator, discriminator_loss, generator_gan_loss, r1_finite_difference, r1_penalty
from pipeline.models.discriminator import FrameDiscriminatorHead
from stages import distill
from stages.launch import main as launch


def gan_cfg(cfg, run_dir: Path, **keys):
    d = replace(cfg.distill, student=str(Path(cfg.run.dir) / "init_student"),
                teacher=str(Path(cfg.run.dir) / "pretrain_teacher"), **{"method": "sf_gan", **keys})
    return replace(cfg, run=replace(cfg.run, dir=str(run_dir)), distill=d)


def test_losses_match_a_direct_computation():
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(3, 4, generator=g), torch.randn(3, 4, generator=g)
    sig = torch.sigmoid
    want_d = (-torch.log(sig(real))).mean() - torch.log(1 - sig(fake)).mean()
    assert torch.allclose(discriminator_loss(real, fake), want_d, atol=1e-6)
    assert torch.allclose(generator_gan_loss(fake), (-torch.log(sig(fake))).mean(), atol=1e-6)
    # R1 of a linear discriminator D(x) = Σ w·x over each video: ∇ = w, so ‖∇‖² = Σ w² per video
    w = torch.randn(2, 5, generator=g)
    x = torch.randn(4, 2, 5, generator=g, requires_grad=True)
    logits = (x * w).sum(dim=2)  # [B, F]
    assert math.isclose(r1_penalty(logits, x).item(), w.pow(2).sum().item(), rel_tol=1e-6)


def test_r1_by_finite_difference_approaches_the_exact_penalty():
    """`r1_finite_difference` is R1 in expectation over the perturbation: exactly for a linear discriminator
    (E[(w·ε)²] = ‖w‖²), and within 10 % on the tiny discriminator (blocks in float64, σ = 1e-3, averaged over
    1024 perturbations of 2 videos)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(2, 5, generator=g, dtype=torch.float64)
    x = torch.randn(1, 2, 5, generator=g, dtype=torch.float64).expand(8192, 2, 5)
    eps = torch.randn(x.shape, generator=g, dtype=torch.float64)
    approx = r1_finite_difference((x * w).sum(2), ((x + 1e-3 * eps) * w).sum(2), 1e-3)
    assert math.isclose(approx.item(), w.pow(2).sum().item(), rel_tol=0.1)

    model = make_tiny_model(seed=1).double()
    head = FrameDiscriminatorHead(dim=24, hidden=8)  # float32: it reads the features in float32
    disc = Discriminator(model, head, "block_causal", 3, 1)
    x = torch.randn(2, 3, 6, 8, 8, generator=g, dtype=torch.float64, requires_grad=True)
    sigma, ctx = torch.rand(2, 6, generator=g, dtype=torch.float64), torch.randn(2, 2, 16, generator=g, dtype=torch.float64)
    with sdpa_kernel(SDPBackend.MATH):
        exact = r1_penalty(disc(x, sigma, ctx), x).item()
    n, s = 1024, 1e-3
    with torch.no_grad():
        xs, sig, c = x.detach().repeat(n, 1, 1, 1, 1), sigma.repeat(n, 1), ctx.repeat(n, 1, 1)
        eps = torch.randn(xs.shape, generator=g, dtype=torch.float64)
        approx = r1_finite_difference(disc(xs, sig, c), disc(xs + s * eps, sig, c), s).item()
    assert math.isclose(approx, exact, rel_tol=0.1), (approx, exact)


def test_sf_gan_gradients_reach_the_generator_only_through_exit_steps(student_stage, tmp_path, monkeypatch):
    """One generator update of sf_gan: the generator's calls with gradients are its exit steps (one per
    chunk); the discriminator (critic and head) collects no gradient from it."""
    cfg, _ = student_stage
    seen = {}
    orig_loss = SelfForcingDMD.generator_loss

    def generator_loss(self, batch, gen):
        model = self.generator.model
        calls = []
        handle = model.register_forward_hook(lambda m, a, out: calls.append(out.requires_grad))
        loss, stats = orig_loss(self, batch, gen)
        handle.remove()
        loss.backward()
        critic, head = self.gan.disc.backbone, self.gan.disc.head
        seen.update(calls=calls, exits=stats["exit_step"],
                    disc_grads=[p.grad for p in [*critic.parameters(), *head.parameters()] if p.grad is not None],
                    gen_grads=sum(p.grad is not None for p in model.parameters()))
        for p in model.parameters():
            p.grad = None
        raise KeyboardInterrupt
    monkeypatch.setattr(SelfForcingDMD, "generator_loss", generator_loss)
    with pytest.raises(KeyboardInterrupt):
        distill.run(gan_cfg(cfg, tmp_path / "r", exit_step="per_chunk"))
    chunks = cfg.data.frames // cfg.data.frames_per_chunk
    assert sum(seen["calls"]) == chunks  # one call with gradients per chunk: its exit step
    assert seen["disc_grads"] == [] and seen["gen_grads"] > 0


def test_dmd_plus_gan_never_trains_the_real_score(student_stage, tmp_path, monkeypatch):
    cfg, _ = student_stage
    seen = capture_method(monkeypatch)
    path = distill.run(gan_cfg(cfg, tmp_path / "r", method="sf_dmd", gan_weight=0.5)).path
    real = seen["method"].frozen["teacher"]
    assert all(p.grad is None and not p.requires_grad for p in real.parameters())
    assert_same_weights(real.state_dict(), weights(Path(cfg.run.dir) / "pretrain_teacher", "transformer_ema"))
    assert (path / "discriminator" / "config.json").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(next((path / "logs").rglob("events.out.tfevents*")))).Reload()
    assert {"generator_loss", "dmd_grad_norm", "gan_g_loss", "gan_d_loss", "d_real_logit"} <= set(events.Tags()["scalars"])


def test_alternation_ratio_holds(student_stage, tmp_path, monkeypatch):
    cfg, _ = student_stage
    counts = {"generator_term": 0, "discriminator_term": 0}
    for name in counts:
        orig = getattr(gan_module.GAN, name)

        def counted(self, *a, _orig=orig, _name=name, **kw):
            counts[_name] += 1
            return _orig(self, *a, **kw)
        monkeypatch.setattr(gan_module.GAN, name, counted)
    distill.run(gan_cfg(cfg, tmp_path / "r", steps=7, critic_steps_per_generator_step=3))
    assert counts == {"generator_term": 3, "discriminator_term": 7}  # generator at steps 0, 3, 6


def test_critic_warmup_trains_the_discriminator_alone_first(student_stage, tmp_path, monkeypatch, capsys):
    """`critic_warmup: 4`: no generator update before step 4, then every `ratio`-th step (4 and 6 of 7 at ratio
    2); the generator's LR schedule counts only those; the manifest reports them; the progress bar shows no
    generator loss before the first (`gen=-`, not a NaN)."""
    from pipeline.methods.distillation import generator_updates

    cfg, _ = student_stage
    counts = {"generator_term": [], "discriminator_term": []}
    for name in counts:
        orig = getattr(gan_module.GAN, name)

        def counted(self, *a, _orig=orig, _name=name, **kw):
            counts[_name].append(1)
            return _orig(self, *a, **kw)
        monkeypatch.setattr(gan_module.GAN, name, counted)
    path = distill.run(gan_cfg(cfg, tmp_path / "r", steps=7, critic_steps_per_generator_step=2, critic_warmup=4)).path
    assert (len(counts["generator_term"]), len(counts["discriminator_term"])) == (2, 7)
    assert [generator_updates(s, 2, 4) for s in range(9)] == [0, 0, 0, 0, 0, 1, 1, 2, 2]
    assert json.loads((path / "manifest.json").read_text())["metrics"]["generator_updates"] == 2
    err = capsys.readouterr().err
    assert "gen=-" in err and "gen=nan" not in err and re.search(r"gen=\d+\.\d{4}", err)


def test_sf_gan_resume_restores_the_discriminator_bit_exactly(student_stage, tmp_path, monkeypatch, capsys):
    cfg, _ = student_stage
    full = distill.run(gan_cfg(cfg, tmp_path / "full", r1_weight=0.1)).path
    resumed = crash_then_resume(monkeypatch, capsys, distill, gan_cfg(cfg, tmp_path / "x", r1_weight=0.1),
                                tmp_path / "resumed")
    for sub in ("transformer", "transformer_ema", "critic", "discriminator"):
        assert_same_weights(weights(resumed, sub), weights(full, sub))
    for f in ("discriminator_optimizer.safetensors", "critic_optimizer.safetensors"):
        a = load_file(str(resumed / "checkpoints/step_0000004" / f))
        b = load_file(str(full / "checkpoints/step_0000004" / f))
        assert a.keys() == b.keys() and len(a) > 0 and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["sf_gan", "df_dmd"])
def test_gan_with_r1_under_gradient_checkpointing_trains_as_without(student_stage, tmp_path, method):
    """Gradient checkpointing (the Wan recipes') changes no number of a GAN run: the generator's GAN loss
    recomputes the discriminator's blocks in its backward (its parameters must stay frozen there), R1
    recomputes them under SDPA's math kernel (its double backward). Both failed with a CheckpointError."""
    cfg, _ = student_stage
    keys = dict(r1_weight=1.0, critic_warmup=0, steps=2, gan_weight=0.5 if method == "df_dmd" else 0.0,
                method=method)
    runs = [distill.run(gan_cfg(cfg, tmp_path / str(ck), gradient_checkpointing=ck, **keys)).path
            for ck in (False, True)]
    for sub in ("transformer", "critic", "discriminator"):
        assert_same_weights(weights(runs[1], sub), weights(runs[0], sub))
    assert not torch.equal(weights(runs[1], "transformer")["proj_out.weight"],
                           weights(Path(cfg.run.dir) / "init_student", "transformer")["proj_out.weight"])


def test_nan_in_the_discriminator_loss_stops_in_one_line(student_stage, tmp_path, capsys, monkeypatch):
    cfg, _ = student_stage
    state = {"calls": 0}
    orig = gan_module.discriminator_loss

    def loss(real, fake):
        state["calls"] += 1
        out = orig(real, fake)
        return out * float("nan") if state["calls"] == 3 else out
    monkeypatch.setattr(gan_module, "discriminator_loss", loss)
    run = copy_stages(cfg.run.dir, tmp_path / "r")
    (tmp_path / "c.yaml").write_text("{}\n")
    rc, err = call(capsys, launch, tmp_path / "c.yaml", "--stages", "distill", *TINY_OVERRIDES, f"run.dir={run}",
                   "distill.method=sf_gan", "distill.checkpoint_every=1")
    one_error(rc, err, "loss is nan at step 2", "distill.critic_lr")
    meta = json.loads((run / "distill" / "checkpoints" / "step_0000002" / "meta.json").read_text())
    assert meta["step"] == 2 and json.loads((run / "distill" / "manifest.json").read_text())["status"] == "running"


def test_gan_needs_real_videos():
    with pytest.raises(ConfigError, match="distill.method: the GAN's discriminator needs real videos"):
        load_config(None, ["data.kind=prompts", "run.stages=[init_student,distill]", "distill.method=sf_gan"])
    with pytest.raises(ConfigError, match="distill.gan_weight"):
        load_config(None, ["data.kind=prompts", "run.stages=[init_student,distill]", "distill.gan_weight=0.1"])


def test_checkpoints_from_before_the_gan_keys_still_resume(make_cfg):
    """Settings recorded before a key existed lack it: at its default it changes nothing (resume allowed),
    at another value it does (refused)."""
    from pipeline.methods import method_for
    from pipeline.training.settings import changes

    method = method_for("distill", make_cfg())
    now, defaults = method.fingerprint(), method.fingerprint_defaults()
    old = {k: v for k, v in now.items() if k not in ("distill.gan_weight", "distill.disc_hidden", "distill.r1_weight")}
    assert changes(old, now, defaults) == {}
    gan = method_for("distill", make_cfg("distill.gan_weight=0.5")).fingerprint()
    assert changes(old, gan, defaults) == {"distill.gan_weight": (None, 0.5)}
    assert changes(old, now) != {}  # without the defaults every new key would count
