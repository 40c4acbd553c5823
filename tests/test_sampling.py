"""Samplers: Euler integration against an exact (oracle) flow, autoregressive streaming, guidance."""

import pytest
import torch

from pipeline.models.causal_wan import KVCache
from pipeline.diffusion.flow import sampling_sigmas
from pipeline.diffusion.sampling import Denoiser, generate, guided_flow, sample_autoregressive, sample_synchronous
from tests.conftest import TINY_MODEL_KW, make_tiny_model


class OracleDenoiser:
    """The exact flow `E[ε - x0 | x_σ] = (x_σ - E[x0 | x_σ]) / σ` for data uniform over a finite set of
    videos, under `x_σ = (1-σ)·x0 + σ·ε`. Same call signature as `Denoiser`."""

    def __init__(self, videos: torch.Tensor):
        self.videos = videos.double()  # [K, C, F, H, W]
        self.levels_seen = []

    def __call__(self, x, sigma, context, kv_cache=None, write_cache=False):
        assert sigma.shape == (x.shape[0], x.shape[2])
        assert (sigma == sigma[:, :1]).all(), "synchronous sampling: one level for all frames"
        s = sigma[:, 0].double()
        self.levels_seen.append(float(s[0]))
        xd = x.double()
        diff = xd[:, None] - (1 - s)[:, None, None, None, None, None] * self.videos[None]  # [B, K, ...]
        logits = -diff.flatten(2).pow(2).sum(-1) / (2 * s[:, None] ** 2)
        w = torch.softmax(logits, dim=1)
        mean_x0 = torch.einsum("bk,k...->b...", w, self.videos)
        return ((xd - mean_x0) / s[:, None, None, None, None]).to(x.dtype)


def nearest(samples, videos):
    d = (samples[:, None] - videos[None]).flatten(2).norm(dim=-1)
    return d.min(dim=1)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_euler_on_a_single_video_is_exact(shift):
    """For one training video the flow field is straight (`ε - x0` along the line), so Euler is exact: it
    ends on the video for any number of steps and schedule."""
    g = torch.Generator().manual_seed(0)
    video = torch.randn(1, 2, 3, 2, 2, generator=g)
    oracle = OracleDenoiser(video)
    noise = torch.randn(5, 2, 3, 2, 2, generator=g)
    out = sample_synchronous(oracle, noise, None, None, steps=3, shift=shift)
    torch.testing.assert_close(out, video.expand_as(out), atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(oracle.levels_seen), sampling_sigmas(3, shift)[:-1])


def test_euler_with_oracle_lands_on_training_videos_in_proportion():
    g = torch.Generator().manual_seed(0)
    distinct = torch.stack([torch.full((1, 2, 2, 2), 1.0), -torch.ones(1, 2, 2, 2),
                            torch.tensor([1.0, -1.0]).repeat(4).view(1, 2, 2, 2)])
    counts = [5, 3, 2]  # the data distribution: 50% / 30% / 20%
    videos = torch.cat([distinct[i:i + 1].expand(c, -1, -1, -1, -1) for i, c in enumerate(counts)])
    oracle = OracleDenoiser(videos)
    n = 600
    noise = torch.randn(n, *distinct.shape[1:], generator=g)
    out = sample_synchronous(oracle, noise, None, None, steps=30, shift=1.0)
    dist, idx = nearest(out, distinct)
    assert dist.max() < 0.05, f"every sample ends on a training video (max distance {dist.max():.3f})"
    frac = torch.bincount(idx, minlength=3).float() / n
    torch.testing.assert_close(frac, torch.tensor([0.5, 0.3, 0.2]), atol=0.06, rtol=0)
    # The samples are not the noise's nearest video at σ=1 trivially: the data mean is far from all of them.
    assert nearest(videos.mean(0, keepdim=True), distinct)[0].item() > 0.5


class _CountingDenoiser:
    def __init__(self, inner):
        self.inner, self.calls = inner, []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def __call__(self, x, sigma, context, kv_cache=None, write_cache=False):
        self.calls.append((x.shape[2], float(sigma.flatten()[0]), write_cache,
                           kv_cache.num_frames if kv_cache is not None else None))
        return self.inner(x, sigma, context, kv_cache, write_cache)


def _setup(b=2, f=6, seed=0):
    model = make_tiny_model()
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(b, 3, f, 4, 4, generator=g)
    cond = torch.randn(b, 3, TINY_MODEL_KW["text_dim"], generator=g)
    uncond = torch.randn(1, 3, TINY_MODEL_KW["text_dim"], generator=g).expand(b, -1, -1)
    return model, noise, cond, uncond


@torch.no_grad()
def manual_autoregressive(den, noise, cond, uncond, steps, guidance):
    fpc = den.frames_per_chunk
    sigmas = sampling_sigmas(steps)
    cache, out = KVCache(), []
    b = noise.shape[0]
    for start in range(0, noise.shape[2], fpc):
        x = noise[:, :, start:start + fpc]
        for i in range(steps):
            sig = torch.full((b, fpc), float(sigmas[i]))
            if guidance == 1.0:
                v = den(x, sig, cond, cache, False)
            else:
                vc, vu = den(torch.cat([x, x]), torch.cat([sig, sig]), torch.cat([cond, uncond]), cache, False).chunk(2)
                v = vu + guidance * (vc - vu)
            x = x + (float(sigmas[i + 1]) - float(sigmas[i])) * v
        out.append(x)
        zero = torch.zeros(b, fpc)
        if guidance == 1.0:
            den(x, zero, cond, cache, True)
        else:
            den(torch.cat([x, x]), torch.cat([zero, zero]), torch.cat([cond, uncond]), cache, True)
    return torch.cat(out, dim=2)


@pytest.mark.parametrize("guidance", [1.0, 2.5])
def test_autoregressive_equals_manual_loop(guidance):
    model, noise, cond, uncond = _setup()
    den = Denoiser(model, "block_causal", frames_per_chunk=2)
    got = sample_autoregressive(den, noise, cond, uncond, steps=3, guidance=guidance, context_sigma=0.0)
    want = manual_autoregressive(den, noise, cond, uncond, steps=3, guidance=guidance)
    assert got.shape == noise.shape
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    assert (got - noise).abs().max() > 1e-2


def test_autoregressive_call_pattern_and_causality():
    model, noise, cond, uncond = _setup()
    den = _CountingDenoiser(Denoiser(model, "block_causal", frames_per_chunk=2))
    out = sample_autoregressive(den, noise, cond, None, steps=2)
    # 3 chunks × 2 steps read-only, plus a cache write after each chunk but the last.
    writes = [c for c in den.calls if c[2]]
    assert len(den.calls) == 3 * 2 + 2 and len(writes) == 2
    assert [c[3] for c in den.calls if not c[2]] == [0, 0, 2, 2, 4, 4]  # RoPE offset of each chunk
    assert all(c[1] == 0.0 for c in writes)  # context written clean
    # The first chunk does not depend on later noise; the last does depend on earlier chunks' noise.
    noise2 = noise.clone()
    noise2[:, :, 4:] = torch.randn_like(noise2[:, :, 4:])
    out2 = sample_autoregressive(den, noise2, cond, None, steps=2)
    torch.testing.assert_close(out[:, :, :4], out2[:, :, :4], atol=1e-6, rtol=0)
    noise3 = noise.clone()
    noise3[:, :, :2] = torch.randn_like(noise3[:, :, :2])
    out3 = sample_autoregressive(den, noise3, cond, None, steps=2)
    assert (out3[:, :, 4:] - out[:, :, 4:]).abs().max() > 1e-4
    # The first chunk equals synchronous sampling of that chunk alone (same levels, no context).
    sync = sample_synchronous(den.inner, noise[:, :, :2], cond, None, steps=2)
    torch.testing.assert_close(out[:, :, :2], sync, atol=1e-5, rtol=0)


def test_autoregressive_determinism_context_noise_and_errors():
    model, noise, cond, uncond = _setup()
    den = Denoiser(model, "block_causal", frames_per_chunk=3)
    kw = dict(steps=2, guidance=1.0, context_sigma=0.3)
    a = sample_autoregressive(den, noise, cond, uncond, generator=torch.Generator().manual_seed(1), **kw)
    b = sample_autoregressive(den, noise, cond, uncond, generator=torch.Generator().manual_seed(1), **kw)
    c = sample_autoregressive(den, noise, cond, uncond, generator=torch.Generator().manual_seed(2), **kw)
    assert torch.equal(a, b)
    assert torch.equal(a[:, :, :3], c[:, :, :3])  # first chunk never sees context noise
    assert (a[:, :, 3:] - c[:, :, 3:]).abs().max() > 1e-4  # the re-noised context matters
    with pytest.raises(ValueError, match="multiple of frames_per_chunk"):
        sample_autoregressive(den, noise[:, :, :5], cond, uncond, steps=1)


def test_guided_flow_equals_two_separate_calls():
    model, noise, cond, uncond = _setup()
    den = Denoiser(model, "block_causal", frames_per_chunk=3)
    sigma = torch.rand(noise.shape[0], noise.shape[2], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        vc = den(noise, sigma, cond)
        vu = den(noise, sigma, uncond)
        for w in (1.0, 0.0, 3.0):
            got = guided_flow(den, noise, sigma, cond, uncond, w)
            torch.testing.assert_close(got, vu + w * (vc - vu), atol=1e-5, rtol=1e-5)
        assert torch.equal(guided_flow(den, noise, sigma, cond, None, 3.0), vc)
        assert (vc - vu).abs().max() > 1e-3


def test_generate_batches_and_seed():
    model, _, cond, uncond = _setup(b=5)
    den = Denoiser(model, "block_causal", frames_per_chunk=3)
    shape = (3, 6, 4, 4)
    a = generate(den, cond, uncond, shape, kind="autoregressive", steps=2, guidance=2.0, seed=0, batch_size=5)
    b = generate(den, cond, uncond, shape, kind="autoregressive", steps=2, guidance=2.0, seed=0, batch_size=2)
    c = generate(den, cond, uncond, shape, kind="autoregressive", steps=2, guidance=2.0, seed=1, batch_size=5)
    assert a.shape == (5, *shape)
    torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert (a - c).abs().max() > 1e-2
    s = generate(den, cond, uncond, shape, kind="synchronous", steps=2, guidance=2.0, seed=0)
    assert s.shape == a.shape and (s - a).abs().max() > 1e-4
    with pytest.raises(ValueError, match="unknown sampler"):
        generate(den, cond, uncond, shape, kind="bogus", steps=1)


def test_one_entry_point_picks_the_sampler_from_the_role(monkeypatch):
    """`videos.sample_latents`: a student (by `is_student`) samples with the few-step sampler of the `student`
    section, a teacher with the many-step `sampler` section; `few_step` overrides the role; each path gives what
    its sampler gives when called directly."""
    from pipeline.config import SamplerConfig, StudentConfig
    from pipeline.diffusion import videos
    from pipeline.diffusion.sampling import few_step_sigmas, generate_few_step

    model, _, cond, uncond = _setup(b=3)
    shape = (3, 6, 4, 4)
    st, sp = StudentConfig(denoising_steps=[1000, 500]), SamplerConfig(steps=2, guidance=2.0)
    kw = dict(shape=shape, frames_per_chunk=3, prediction="flow", student=st, sampler=sp, uncond=uncond, seed=3,
              batch_size=2)
    few = generate_few_step(Denoiser(model, "block_causal", 3, "flow", st.clip_x0, rope=st.rope,
                                     kv_cache=st.kv_cache), cond, shape, few_step_sigmas([1000, 500], st.shift),
                            seed=3, batch_size=2)
    many = generate(Denoiser(model, "block_causal", 3, "flow", sp.clip_x0, rope=sp.rope, kv_cache=sp.kv_cache),
                    cond, uncond, shape, kind=sp.kind, steps=2, guidance=2.0, seed=3, batch_size=2)
    assert (few - many).abs().max() > 1e-3
    for role, want in ((True, few), (False, many)):
        monkeypatch.setattr(videos, "is_student", lambda m, r=role: r)
        assert torch.equal(videos.sample_latents(model, cond, **kw), want)
    assert torch.equal(videos.sample_latents(model, cond, **{**kw, "few_step": True}), few)  # a teacher, few steps
    with pytest.raises(ValueError, match="student section"):
        videos.sample_latents(model, cond, **{**kw, "student": None, "few_step": True})
    with pytest.raises(ValueError, match="sampler section"):
        videos.sample_latents(model, cond, **{**kw, "sampler": None, "few_step": False})
