"""DMD distillation: the gradient and loss on fixed tensors, the Self-Forcing rollout (only exit steps
carry gradients, none crosses the cache), the noise levels, and the distill stage (update ratio,
outputs, df_dmd, crash-resume of generator, critic, EMA and both optimisers)."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pipeline.config import ConfigError, load_config
from pipeline.methods.dmd import DFDMD, SelfForcingDMD, dmd_gradient, dmd_loss, sample_dmd_sigma
from pipeline.data.shard import ShardedGenerator
from pipeline.diffusion.sampling import Denoiser, few_step_rollout, few_step_sigmas, sample_few_step
from stages import distill
from tests.conftest import assert_same_weights, crash_then_resume, make_tiny_model, weights

SIGMAS = few_step_sigmas([1000, 750, 500, 250], 5.0)


def test_dmd_gradient_matches_direct_computation():
    g = torch.Generator().manual_seed(0)
    x, fake, real = (torch.randn(2, 3, 4, 2, 2, generator=g) for _ in range(3))
    grad = dmd_gradient(x, fake, real)
    for b in range(2):  # sample by sample, written out
        norm = sum(abs(float(x[b].flatten()[i] - real[b].flatten()[i])) for i in range(48)) / 48
        expected = (fake[b] - real[b]) / norm
        assert torch.allclose(grad[b], expected, atol=1e-6)
    # The loss's gradient with respect to x is g / numel; its value is 0.5·mean(g²).
    xg = x.clone().requires_grad_(True)
    loss = dmd_loss(xg, grad)
    loss.backward()
    assert torch.allclose(xg.grad, grad / x.numel(), atol=1e-9)
    assert loss.item() == pytest.approx(0.5 * grad.pow(2).mean().item(), rel=1e-6)


def test_dmd_gradient_is_nan_safe():
    x = torch.ones(2, 3, 1, 2, 2)
    real = x.clone()  # |x - x0_real| = 0: the normaliser would divide by zero
    fake = torch.full_like(x, float("nan"))
    grad = dmd_gradient(x, fake, real)
    assert torch.isfinite(grad).all() and (grad == 0).all()


def test_per_frame_levels_differ_across_frames_uniform_do_not():
    g = torch.Generator().manual_seed(0)
    per_frame = sample_dmd_sigma(64, 12, g, per_frame=True, sigma_min=0.02, sigma_max=0.98, shift=5.0)
    uniform = sample_dmd_sigma(64, 12, g, per_frame=False, sigma_min=0.02, sigma_max=0.98, shift=5.0)
    assert per_frame.shape == uniform.shape == (64, 12)
    assert (per_frame.std(dim=1) > 0.05).all()  # every video has frames at different levels
    assert (uniform == uniform[:, :1]).all() and uniform[:, 0].std() > 0.05
    for s in (per_frame, uniform):
        assert s.min() >= 0.02 and s.max() <= 0.98
    assert per_frame.mean() > 0.6  # shift 5 moves mass to high noise


def _rollout_setup():
    model = make_tiny_model().train()
    den = Denoiser(model, "block_causal", 3, "x0")
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 3, 9, 4, 4, generator=g)
    cond = torch.randn(2, 3, 16, generator=g)
    return model, den, noise, cond


@pytest.mark.parametrize("fuse", [True, False])
def test_rollout_only_exit_steps_carry_gradients(fuse):
    model, den, noise, cond = _rollout_setup()
    calls = []
    orig = model.forward

    def spy(x, timestep, *a, **kw):
        calls.append((torch.is_grad_enabled(), timestep[0, -1].item() / 1000, kw.get("write_cache", False),
                      kw.get("context_frames", 0)))
        return orig(x, timestep, *a, **kw)

    model.forward = spy
    exits = [2, 0, 3]
    out = few_step_rollout(den, noise, cond, SIGMAS, exits, generator=torch.Generator().manual_seed(1),
                           fuse_cache_write=fuse)
    with_grad = [c for c in calls if c[0]]
    assert len(with_grad) == 3  # one per chunk ...
    assert [round(c[1], 4) for c in with_grad] == [round(SIGMAS[k].item(), 4) for k in exits]  # ... at its exit
    assert not any(c[2] or c[3] for c in with_grad)  # cache writes never carry gradients
    # Denoising calls + two cache refills; fused, chunk 2's refill rides in its first (gradient-free) call,
    # chunk 1's cannot (exit step 0: its only call carries gradients).
    assert len(calls) == sum(k + 1 for k in exits) + (1 if fuse else 2)
    assert [c[3] for c in calls].count(3) == (1 if fuse else 0)
    assert out.requires_grad


def test_rollout_passes_no_gradient_through_the_cache():
    _, den, noise, cond = _rollout_setup()
    chunks = []
    out = few_step_rollout(den, noise, cond, SIGMAS, [1, 1, 1], generator=torch.Generator().manual_seed(1),
                           on_chunk=lambda i, c: chunks.append(c))
    assert out.requires_grad
    # The last chunk was computed attending to the first chunk's keys, but not through its graph.
    (g_first,) = torch.autograd.grad(chunks[2].sum(), chunks[0], allow_unused=True)
    assert g_first is None
    params = [p for p in den.model.parameters()]
    assert all(p.grad is None for p in params)
    chunks[2].sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in params)


def test_rollout_to_the_last_step_is_the_sampler():
    _, den, noise, cond = _rollout_setup()
    with torch.no_grad():
        ref = sample_few_step(den, noise, cond, SIGMAS, generator=torch.Generator().manual_seed(3))
    out = few_step_rollout(den, noise, cond, SIGMAS, [3, 3, 3], generator=torch.Generator().manual_seed(3))
    assert torch.allclose(out.detach(), ref, atol=1e-6)
    with pytest.raises(ValueError, match="exit_steps"):
        few_step_rollout(den, noise, cond, SIGMAS, [4, 0, 0])


def test_exit_steps_per_rollout_or_per_chunk():
    kw = dict(generator=None, real=None, fake=None, sigmas=SIGMAS)
    g = torch.Generator().manual_seed(0)
    one = torch.stack([SelfForcingDMD(**kw).exit_steps(4, g) for _ in range(50)])
    assert (one == one[:, :1]).all() and set(one[:, 0].tolist()) == {0, 1, 2, 3}
    each = torch.stack([SelfForcingDMD(**kw, per_chunk_exit=True).exit_steps(4, g) for _ in range(50)])
    assert (each != each[:, :1]).any()
    # Processes share the generator: every rank draws rank 0's exit steps.
    ranks = [SelfForcingDMD(**kw).exit_steps(4, ShardedGenerator(torch.Generator().manual_seed(5), r, 2))
             for r in range(2)]
    assert torch.equal(ranks[0], ranks[1])


def _dmd_models(**kw):
    """Generator, critic (both trained) and teacher (frozen) `Denoiser`s of tiny models, 4x4 latents in chunks of 3."""
    gen_m, critic_m, teacher_m = (make_tiny_model(seed=s, **kw).train() for s in (0, 1, 2))
    teacher_m.requires_grad_(False)
    return [Denoiser(m, "block_causal", 3, "x0") for m in (gen_m, teacher_m, critic_m)]


def test_gradient_free_calls_of_trained_models_cache_no_bf16_weights():
    """Under bf16 autocast, autocast keeps a bf16 copy of every weight that requires grad until the autocast ends. The
    DMD scores call the trained critic without gradients, the critic's update samples with the trained generator
    without gradients: neither leaves a copy (2 bytes per weight, per model, at the generator update's peak), so a
    trained critic / generator costs there what a frozen one does."""
    from pipeline.training.memory import TensorPeak

    gen_den, real, fake = _dmd_models()
    dmd = SelfForcingDMD(generator=gen_den, real=real, fake=fake, sigmas=SIGMAS, real_guidance=4.0)
    cond = torch.randn(1, 3, 16, generator=torch.Generator().manual_seed(1))
    batch = {"context": cond, "null": torch.zeros_like(cond), "shape": (3, 6, 4, 4)}

    def live(call, model, trained):  # bytes of the tensors `call` created, still alive inside the autocast
        model.requires_grad_(trained)
        with torch.autocast("cpu", dtype=torch.bfloat16), TensorPeak() as p:
            out = call(torch.Generator().manual_seed(0))
            now = p.now
        del out
        model.requires_grad_(True)
        return now

    generator_update = lambda g: dmd.generator_loss(batch, g)  # noqa: E731
    assert live(generator_update, fake.model, True) == live(generator_update, fake.model, False)
    critic_update = lambda g: dmd.critic_loss(batch, g)  # noqa: E731
    assert live(critic_update, gen_den.model, True) == live(critic_update, gen_den.model, False)
    # the check can fail: a trained model's gradient-free call does cache its copies without `no_parameter_grads`
    with torch.no_grad():
        assert live(lambda g: fake.predict_x0(torch.randn(1, 3, 6, 4, 4, generator=g), torch.rand(1, 6), cond),
                    fake.model, True) > live(lambda g: fake.predict_x0(torch.randn(1, 3, 6, 4, 4, generator=g),
                                                                       torch.rand(1, 6), cond), fake.model, False)


def test_df_dmd_denoises_noised_chunks_in_one_forward():
    model, den, noise, cond = _rollout_setup()
    calls = []
    orig = model.forward
    model.forward = lambda x, t, *a, **kw: calls.append(t.clone()) or orig(x, t, *a, **kw)
    method = DFDMD(generator=den, real=den, fake=den, sigmas=SIGMAS)
    x, _ = method.samples({"x0": noise, "context": cond}, torch.Generator().manual_seed(0))
    assert len(calls) == 1 and x.shape == noise.shape and x.requires_grad
    t = calls[0] / 1000
    assert (t.view(2, 3, 3) == t.view(2, 3, 3)[:, :, :1]).all()  # one level per chunk
    assert all(any(abs(v - s) < 1e-5 for s in SIGMAS.tolist()) for v in t.flatten().tolist())


def test_distill_outputs_and_update_ratio(distill_stage, student_stage):
    cfg, path = distill_stage
    man = json.loads((path / "manifest.json").read_text())
    assert man["status"] == "done" and man["metrics"]["steps"] == 4
    assert man["metrics"]["generator_updates"] == 2  # steps 0 and 2 with a ratio of 2
    assert man["inputs"]["student"]["path"].endswith("init_student/transformer_ema")
    conf = json.loads((path / "transformer_ema" / "sampling.json").read_text())["config"]["student"]
    assert conf["denoising_steps"] == [1000, 750, 500, 250]
    assert (path / "critic" / "config.json").is_file() and (path / "preview.gif").is_file()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(next((path / "logs").rglob("events.out.tfevents*")))).Reload()
    tags = events.Tags()
    assert {"generator_loss", "critic_loss", "dmd_grad_norm", "dmd_sigma_mean", "exit_step"} <= set(tags["scalars"])
    assert "dmd_sigma" in tags["histograms"]
    student = weights(student_stage[1], "transformer_ema")
    assert any(not torch.equal(student[k], v) for k, v in weights(path, "transformer").items())


def test_update_ratio_counts_calls(student_stage, tmp_path, monkeypatch):
    cfg, _ = student_stage
    counts = {"generator": 0, "critic": 0}
    for name, attr in (("generator", "generator_loss"), ("critic", "critic_loss")):
        orig = getattr(SelfForcingDMD, attr)

        def counted(self, *a, _orig=orig, _name=name, **kw):
            counts[_name] += 1
            return _orig(self, *a, **kw)
        monkeypatch.setattr(SelfForcingDMD, attr, counted)
    d = replace(cfg.distill, steps=7, critic_steps_per_generator_step=3, student=str(Path(cfg.run.dir) / "init_student"),
                teacher=str(Path(cfg.run.dir) / "pretrain_teacher"))
    distill.run(replace(cfg, run=replace(cfg.run, dir=str(tmp_path / "r")), distill=d))
    assert counts == {"generator": 3, "critic": 7}  # generator at steps 0, 3, 6


def test_critic_reuses_generator_samples(student_stage, tmp_path, monkeypatch):
    """critic_samples=generator: after a generator update the critic trains on that update's samples
    (no second rollout); on the other steps it makes its own."""
    cfg, _ = student_stage
    rollouts, critic_inputs = [], []
    orig_samples, orig_critic = SelfForcingDMD.samples, SelfForcingDMD.critic_loss

    def samples(self, *a, **kw):
        out = orig_samples(self, *a, **kw)
        rollouts.append(out[0].detach().clone())
        return out

    def critic_loss(self, batch, gen, samples=None):
        critic_inputs.append(samples)
        return orig_critic(self, batch, gen, samples)
    monkeypatch.setattr(SelfForcingDMD, "samples", samples)
    monkeypatch.setattr(SelfForcingDMD, "critic_loss", critic_loss)
    d = replace(cfg.distill, steps=4, critic_steps_per_generator_step=2, critic_samples="generator",
                student=str(Path(cfg.run.dir) / "init_student"), teacher=str(Path(cfg.run.dir) / "pretrain_teacher"))
    distill.run(replace(cfg, run=replace(cfg.run, dir=str(tmp_path / "r")), distill=d))
    # steps 0 and 2: generator rollout reused; steps 1 and 3: the critic's own rollout.
    assert len(rollouts) == 4 and [c is None for c in critic_inputs] == [False, True, False, True]
    assert torch.equal(critic_inputs[0], rollouts[0]) and torch.equal(critic_inputs[2], rollouts[2])


def test_distill_crash_resume_equals_uninterrupted(distill_stage, tmp_path, monkeypatch, capsys):
    cfg, path = distill_stage
    resumed = crash_then_resume(monkeypatch, capsys, distill, cfg, tmp_path / "run", ["pretrain_teacher", "init_student"])
    for sub in ("transformer", "transformer_ema", "critic"):  # generator, EMA, critic
        assert_same_weights(weights(resumed, sub), weights(path, sub))
    # Both optimisers' moments are in the final checkpoints, equal to the uninterrupted run's.
    from safetensors.torch import load_file
    for f in ("optimizer.safetensors", "critic_optimizer.safetensors"):
        a = load_file(str(resumed / "checkpoints/step_0000004" / f))
        b = load_file(str(path / "checkpoints/step_0000004" / f))
        assert a.keys() == b.keys() and len(a) > 0 and all(torch.equal(a[k], b[k]) for k in a)


def test_df_dmd_stage_from_ode_pairs(student_stage, tmp_path):
    cfg, _ = student_stage
    d = replace(cfg.distill, method="df_dmd", clean_source="ode_pairs", steps=2,
                student=str(Path(cfg.run.dir) / "init_student"), teacher=str(Path(cfg.run.dir) / "pretrain_teacher"))
    path = distill.run(replace(cfg, run=replace(cfg.run, dir=str(tmp_path / "r")), distill=d)).path
    assert json.loads((path / "manifest.json").read_text())["metrics"]["method"] == "df_dmd"


def test_distill_errors(make_cfg):
    with pytest.raises(FileNotFoundError, match="init_student"):
        distill.run(make_cfg())
    with pytest.raises(ConfigError, match="distill.method"):
        load_config(None, ["distill.method=gan"])
    with pytest.raises(ConfigError, match="timestep_sampling"):
        load_config(None, ["distill.timestep_sampling=per_chunk"])


def test_gradient_checkpointed_exit_step_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model, den, noise, cond = _rollout_setup()
        if checkpointing:
            model.enable_gradient_checkpointing()
        out = few_step_rollout(den, noise, cond, SIGMAS, [1, 2, 3], generator=torch.Generator().manual_seed(1),
                               max_context_frames=3)
        out.pow(2).sum().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        assert torch.allclose(a, b, atol=1e-5)
