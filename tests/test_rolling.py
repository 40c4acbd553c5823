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
