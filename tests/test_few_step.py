"""Few-step (student) sampling: Self-Forcing's warped schedule, and cache == recomputing the prefix."""

import pytest
import torch

from pipeline.diffusion.flow import add_noise, x0_from_flow
from pipeline.diffusion.sampling import Denoiser, few_step_rollout, few_step_sigmas, sample_few_step
from tests.conftest import make_tiny_model


def test_warped_schedule_matches_self_forcing():
    t = few_step_sigmas((1000, 750, 500, 250), shift=5.0) * 1000
    torch.testing.assert_close(t, torch.tensor([1000.0, 937.5, 2500 / 3, 625.0]))
    assert torch.equal(few_step_sigmas((1000, 500), shift=1.0), torch.tensor([1.0, 0.5]))


def _recompute(model, noise, cond, sigmas, fpc, gen):
    """Reference: every step runs the whole prefix (clean finished chunks at σ=0) without a cache."""
    den = Denoiser(model, "block_causal", fpc)
    b, done = noise.shape[0], []
    for start in range(0, noise.shape[2], fpc):
        x = noise[:, :, start:start + fpc]
        for k in range(len(sigmas)):
            prefix = torch.cat([*done, x], dim=2)
            sig = torch.zeros(b, prefix.shape[2])
            sig[:, -fpc:] = float(sigmas[k])
            x0 = x0_from_flow(x, den(prefix, sig, cond)[:, :, -fpc:], sig[:, -fpc:])
            if k + 1 < len(sigmas):
                x = add_noise(x0, torch.randn(x0.shape, generator=gen), torch.full((b, fpc), float(sigmas[k + 1])))
        done.append(x0)
    return torch.cat(done, dim=2)


@torch.no_grad()
@pytest.mark.parametrize("fpc", [1, 2])
def test_cached_equals_recompute(fpc):
    model = make_tiny_model()
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(2, 3, 6, 4, 6, generator=g)
    cond = torch.randn(2, 5, 16, generator=g)
    sigmas = few_step_sigmas(shift=5.0)
    cached = sample_few_step(Denoiser(model, "block_causal", fpc), noise, cond, sigmas,
                             generator=torch.Generator().manual_seed(1))
    ref = _recompute(model, noise, cond, sigmas, fpc, torch.Generator().manual_seed(1))
    assert (cached - ref).abs().max() <= 1e-5


@torch.no_grad()
def test_windowed_stream_and_errors():
    model = make_tiny_model()
    g = torch.Generator().manual_seed(0)
    noise, cond = torch.randn(1, 3, 24, 4, 6, generator=g), torch.randn(1, 5, 16, generator=g)
    out = sample_few_step(Denoiser(model, "block_causal", 2), noise, cond, few_step_sigmas(), generator=g,
                          max_context_frames=6, sink_frames=2)
    assert out.shape == noise.shape and torch.isfinite(out).all()
    with pytest.raises(ValueError, match="multiple"):
        sample_few_step(Denoiser(model, "block_causal", 4), noise[:, :, :6], cond, few_step_sigmas())


@torch.no_grad()
@pytest.mark.parametrize("window", [None, 6])
def test_fused_cache_write_equals_separate_write(window):
    """The sampler writes a finished chunk into the cache inside the next chunk's first call: the same
    videos as a separate write call (up to rounding), with one call fewer per chunk after the first."""
    model = make_tiny_model()
    g = torch.Generator().manual_seed(0)
    noise, cond = torch.randn(2, 3, 16, 4, 6, generator=g), torch.randn(2, 5, 16, generator=g)
    den, sigmas = Denoiser(model, "block_causal", 2), few_step_sigmas()
    calls = []
    hook = model.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[2]))
    out = {}
    for fuse in (True, False):
        calls.clear()
        out[fuse] = few_step_rollout(den, noise, cond, sigmas, [3] * 8, context_sigma=0.0,
                                     generator=torch.Generator().manual_seed(1), max_context_frames=window,
                                     sink_frames=2 if window else 0, fuse_cache_write=fuse)
        assert len(calls) == 8 * 4 + (0 if fuse else 7)
        assert sum(calls) == 16 * 4 + 14  # the same frames go through the network either way
    hook.remove()
    assert (out[True] - out[False]).abs().max() <= 1e-5
