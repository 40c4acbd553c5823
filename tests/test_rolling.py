"""Rolling-window joint denoising (Rolling Forcing): a window of chunks at staggered levels, one finished per call."""

import pytest
import torch

from pipeline.diffusion.sampling import Denoiser, few_step_sigmas, sample_few_step, sample_rolling
from tests.conftest import make_tiny_model

FPC = 3


def setup(frames=12, seed=0):
    den = Denoiser(make_tiny_model(), "block_causal", FPC, "x0", 1.0)
    g = torch.Generator().manual_seed(seed)
    return den, torch.randn(2, 3, frames, 8, 8, generator=g), torch.randn(2, 2, 16, generator=g)


def test_one_level_is_the_chunkwise_sampler():
    den, noise, cond = setup()
    sig = few_step_sigmas([1000], 1.0)
    ref = sample_few_step(den, noise, cond, sig, max_context_frames=6)
    out = sample_rolling(den, noise, cond, sig, max_context_frames=6)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("levels", [2, 4])
def test_staggered_window_one_chunk_finished_per_call(levels):
    den, noise, cond = setup(frames=15)
    sig = few_step_sigmas([1000, 750, 500, 250][:levels], 1.0)
    calls, finished = [], []
    out = sample_rolling(den, noise, cond, sig, calls=calls, on_chunk=lambda i, x: finished.append((i, len(calls))))
    n = 5
    assert len(calls) == n + levels - 1  # against n·levels chunk by chunk
    for c, lv in enumerate(calls):  # the window: oldest first, one level apart, at most `levels` chunks
        assert lv == sorted(lv, reverse=True) and len(lv) <= levels
        assert all(a - b == 1 for a, b in zip(lv, lv[1:]))
    assert [i for i, _ in finished] == list(range(n))
    assert [c for _, c in finished] == list(range(levels, levels + n))  # after warm-up, one per call
    assert out.shape == noise.shape and torch.isfinite(out).all()


def test_a_call_equals_one_block_causal_forward_over_its_past():
    """Each call sees the finished chunks (clean, in the cache) and the window at its levels: the same as one
    block-causal forward over [finished chunks, window] (two levels, 4 chunks; the last call checked)."""
    den, noise, cond = setup()
    sig = few_step_sigmas([1000, 500], 1.0)
    seen = []
    orig = den.predict_x0

    def spy(x, sigma, c, kv_cache=None, write_cache=False, cache_first=None):
        seen.append((x.clone(), sigma.clone(), cache_first))
        return orig(x, sigma, c, kv_cache, write_cache, cache_first)
    den.predict_x0 = spy
    out = sample_rolling(den, noise, cond, sig)
    den.predict_x0 = orig
    x, sigma, _ = seen[-1]  # the last call: the final chunk alone at the last level
    past = out[:, :, :9]
    full = den.predict_x0(torch.cat([past, x], 2), torch.cat([torch.zeros(2, 9), sigma], 1), cond)[:, :, 9:]
    torch.testing.assert_close(out[:, :, 9:], full, atol=1e-5, rtol=0)
    x, sigma, _ = seen[-2]  # two chunks: chunk 2 at the last level, chunk 3 at the first
    assert x.shape[2] == 6 and sigma[0, 0] < sigma[0, -1]
    full = den.predict_x0(torch.cat([out[:, :, :6], x], 2), torch.cat([torch.zeros(2, 6), sigma], 1), cond)
    torch.testing.assert_close(out[:, :, 6:9], full[:, :, 6:9], atol=1e-5, rtol=0)


def test_sample_rolling_flag(student_stage, tmp_path, capsys):
    from stages import sample
    from tests.conftest import call, one_error

    _, stage = student_stage
    assert sample.main([str(stage), "--out", str(tmp_path / "r.safetensors"), "--n", "6", "--frames", "9",
                        "--rolling"]) == 0
    rc, err = call(capsys, sample.main, str(stage), "--out", str(tmp_path / "b.safetensors"), "--frames", "9",
                   "--rolling", "--switch-at", "3")
    one_error(rc, err, "--rolling does not take prompt switches")


def test_training_rollout_carries_gradients_only_through_finishing_calls():
    """Rolling Forcing's training rollout: one call with gradients per chunk (the one finishing it), none in the
    warm-up calls or cache writes; the same videos as the sampler; each chunk's gradient stays in its own call."""
    from pipeline.diffusion.sampling import rolling_rollout

    den, noise, cond = setup(frames=12)
    sig = few_step_sigmas([1000, 750, 500], 1.0)
    grads = []
    handle = den.model.register_forward_hook(lambda m, a, out: grads.append(out.requires_grad))
    out = rolling_rollout(den, noise, cond, sig, generator=torch.Generator().manual_seed(2))
    handle.remove()
    assert sum(grads) == 4 and len(grads) == 4 + 2 + 3  # 6 window calls (2 warm-up) and 3 separate cache writes
    ref = sample_rolling(den, noise, cond, sig, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(out.detach(), ref, atol=1e-5, rtol=0)  # fused vs separate cache writes: rounding
    (g,) = torch.autograd.grad(out[:, :, 9:].sum(), den.model.blocks[0].attn1.to_q.weight)
    assert g.abs().sum() > 0


def test_training_rollout_outputs_each_chunk_at_its_exit_level():
    """Random exit levels (Self-Forcing's, on the rolling window): chunk i's output is its prediction in the call
    where it sits at level exits[i], with gradients; only such calls carry any; the rollout itself (the finished
    chunks) is the sampler's whatever the exits; exits all at the last level give the finished video."""
    from pipeline.diffusion.sampling import rolling_rollout

    den, noise, cond = setup(frames=12)
    sig = few_step_sigmas([1000, 750, 500], 1.0)
    exits = [0, 2, 0, 2]
    levels, grads, finished = [], [], {}
    handle = den.model.register_forward_hook(lambda m, a, out: grads.append(out.requires_grad))
    out = rolling_rollout(den, noise, cond, sig, generator=torch.Generator().manual_seed(2), exits=exits,
                          calls=levels, on_chunk=lambda i, x: finished.setdefault(i, x))
    handle.remove()
    # window calls (chunk i enters at call i, sits at level k in call i + k): those holding a chunk at its exit
    exit_calls = {i + k for i, k in enumerate(exits)}
    window_grads = [g for g in grads if g]
    assert len(window_grads) == len(exit_calls) == 4 and len(levels) == 6
    ref = sample_rolling(den, noise, cond, sig, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(torch.cat([finished[i] for i in range(4)], dim=2), ref, atol=1e-5, rtol=0)
    assert torch.equal(out[:, :, 3:6].detach(), finished[1])  # chunk 1 exits at the last level: its finished frames
    assert not torch.allclose(out[:, :, :3].detach(), finished[0], atol=1e-3)  # chunk 0 exits at the first level
    for chunk in range(4):
        (g,) = torch.autograd.grad(out[:, :, 3 * chunk:3 * chunk + 3].sum(), den.model.blocks[0].attn1.to_q.weight,
                                   retain_graph=True)
        assert g.abs().sum() > 0, chunk
    last = rolling_rollout(den, noise, cond, sig, generator=torch.Generator().manual_seed(2), exits=[2] * 4)
    torch.testing.assert_close(last.detach(), ref, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="exits must give one level in 0..2 for each of the 4 chunks"):
        rolling_rollout(den, noise, cond, sig, exits=[0, 3, 0, 0])


def test_distill_with_rolling_rollouts(student_stage, tmp_path):
    from dataclasses import replace
    from pathlib import Path

    from pipeline.config import ConfigError
    from stages import distill
    from tests.conftest import weights

    cfg, _ = student_stage
    d = replace(cfg.distill, student=str(Path(cfg.run.dir) / "init_student"), rollout="rolling",
                teacher=str(Path(cfg.run.dir) / "pretrain_teacher"), steps=2)
    path = distill.run(replace(cfg, run=replace(cfg.run, dir=str(tmp_path / "r")), distill=d)).path
    a, b = weights(path, "transformer"), weights(Path(cfg.run.dir) / "init_student", "transformer_ema")
    assert any(not torch.equal(a[k], b[k]) for k in a)
    from pipeline.config import load_config
    from tests.conftest import TINY_OVERRIDES
    with pytest.raises(ConfigError, match="distill.rollout"):
        load_config(None, [*TINY_OVERRIDES, "distill.rollout=rolling", "distill.method=df_dmd"])
