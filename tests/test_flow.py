"""Flow-matching algebra, the timestep shift, trajectory distributions, and x0-prediction denoisers."""

import pytest
import torch

from pipeline.diffusion.flow import (
    add_noise,
    flow_from_x0,
    flow_target,
    noise_from_flow,
    sample_sigma,
    sampling_sigmas,
    shift_sigma,
    timestep_from_sigma,
    x0_from_flow,
)
from pipeline.diffusion.sampling import SIGMA_MIN, Denoiser
from pipeline.diffusion.trajectories import TrajectoryDistribution


def _data(seed=0, b=3, f=4):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(b, 2, f, 3, 3, generator=g, dtype=torch.float64)
    eps = torch.randn(b, 2, f, 3, 3, generator=g, dtype=torch.float64)
    sigma = torch.rand(b, f, generator=g, dtype=torch.float64) * 0.98 + 0.01
    return x0, eps, sigma


def test_add_noise_endpoints_and_per_frame_levels():
    x0, eps, sigma = _data()
    assert torch.equal(add_noise(x0, eps, torch.zeros_like(sigma)), x0)
    assert torch.equal(add_noise(x0, eps, torch.ones_like(sigma)), eps)
    xt = add_noise(x0, eps, sigma)
    for b in range(x0.shape[0]):
        for f in range(x0.shape[2]):
            s = sigma[b, f]
            torch.testing.assert_close(xt[b, :, f], (1 - s) * x0[b, :, f] + s * eps[b, :, f])
    # A [B] level broadcasts over frames.
    s1 = sigma[:, 0]
    torch.testing.assert_close(add_noise(x0, eps, s1), add_noise(x0, eps, s1[:, None].expand_as(sigma)))


def test_flow_round_trips():
    x0, eps, sigma = _data(1)
    xt = add_noise(x0, eps, sigma)
    v = flow_target(x0, eps)
    torch.testing.assert_close(v, eps - x0)
    torch.testing.assert_close(x0_from_flow(xt, v, sigma), x0)
    torch.testing.assert_close(noise_from_flow(xt, v, sigma), eps)
    torch.testing.assert_close(flow_from_x0(xt, x0, sigma), v)
    # The flow is the σ-derivative of the forward process (finite difference along σ).
    h = 1e-6
    d = (add_noise(x0, eps, sigma + h) - add_noise(x0, eps, sigma - h)) / (2 * h)
    torch.testing.assert_close(d, v)
    # An arbitrary prediction: x0 → flow → x0 is the identity.
    x0_hat = torch.randn_like(x0)
    torch.testing.assert_close(x0_from_flow(xt, flow_from_x0(xt, x0_hat, sigma), sigma), x0_hat)


def test_shift_sigma_formula_monotone_endpoints():
    sigma = torch.linspace(0, 1, 101, dtype=torch.float64)
    for s in (0.5, 1.0, 3.0, 5.0):
        out = shift_sigma(sigma, s)
        torch.testing.assert_close(out, s * sigma / (1 + (s - 1) * sigma))
        assert out[0] == 0 and abs(out[-1].item() - 1) < 1e-12
        assert (out[1:] > out[:-1]).all()
    assert torch.equal(shift_sigma(sigma, 1.0), sigma)
    # s > 1 pushes levels up (more time at high noise), s < 1 down.
    mid = sigma[1:-1]
    assert (shift_sigma(mid, 3.0) > mid).all() and (shift_sigma(mid, 0.5) < mid).all()


def test_sampling_sigmas():
    for steps, shift in [(1, 1.0), (4, 1.0), (8, 3.0)]:
        s = sampling_sigmas(steps, shift)
        assert s.shape == (steps + 1,)
        assert s[0].item() == pytest.approx(1.0) and s[-1].item() == 0.0
        assert (s[1:] < s[:-1]).all()
    torch.testing.assert_close(sampling_sigmas(4), torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    assert timestep_from_sigma(torch.tensor(0.25)).item() == 250.0


def test_sample_sigma_kinds():
    g = torch.Generator().manual_seed(0)
    u = sample_sigma((20000,), g, "uniform")
    assert 0 <= u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.02
    ln = sample_sigma((20000,), g, "logit_normal", mean=1.0, std=0.5)
    assert abs(torch.logit(ln).mean().item() - 1.0) < 0.03 and abs(torch.logit(ln).std().item() - 0.5) < 0.03
    shifted = sample_sigma((20000,), torch.Generator().manual_seed(1), "uniform", shift=3.0)
    assert shifted.mean() > 0.6  # E[3u/(1+2u)] ≈ 0.677
    with pytest.raises(ValueError, match="unknown sigma distribution"):
        sample_sigma((2,), g, "gaussian")


def test_df_per_frame_levels_are_independent():
    t = TrajectoryDistribution(kind="df", frames_per_chunk=3)
    sigma, weight = t.sample(4000, 6, torch.Generator().manual_seed(0))
    assert sigma.shape == weight.shape == (4000, 6)
    assert (weight == 1).all()
    assert ((sigma > 0) & (sigma < 1)).all()
    assert not (sigma == sigma[:, :1]).all(dim=1).any()
    corr = torch.corrcoef(sigma.T)
    off_diag = corr[~torch.eye(6, dtype=torch.bool)]
    assert off_diag.abs().max() < 0.08


def test_df_per_chunk_constant_within_chunks():
    t = TrajectoryDistribution(kind="df", frames_per_chunk=3, per_chunk=True)
    sigma, weight = t.sample(500, 9, torch.Generator().manual_seed(0))
    chunks = sigma.view(500, 3, 3)
    assert (chunks == chunks[:, :, :1]).all()
    assert not (chunks[:, 0, 0] == chunks[:, 1, 0]).all()
    assert (weight == 1).all()


def test_bid_constant_over_frames():
    t = TrajectoryDistribution(kind="bid", frames_per_chunk=2)
    sigma, weight = t.sample(500, 6, torch.Generator().manual_seed(0))
    assert (sigma == sigma[:, :1]).all()
    assert sigma[:, 0].std() > 0.1  # but different across samples
    assert (weight == 1).all()


def test_tf_structure():
    fpc, frames, n = 2, 8, 2000
    t = TrajectoryDistribution(kind="tf", frames_per_chunk=fpc)
    sigma, weight = t.sample(n, frames, torch.Generator().manual_seed(0))
    chosen_seen = set()
    for b in range(n):
        w = weight[b]
        frames_on = w.nonzero().flatten()
        assert len(frames_on) == fpc, "weight 1 on exactly one chunk"
        c = frames_on[0].item() // fpc
        assert frames_on.tolist() == list(range(c * fpc, (c + 1) * fpc))
        assert set(w.unique().tolist()) <= {0.0, 1.0}
        chosen_seen.add(c)
        assert (sigma[b, :c * fpc] == 0).all(), "clean context before the chunk"
        lvl = sigma[b, c * fpc:(c + 1) * fpc]
        assert (lvl == lvl[0]).all() and 0 < lvl[0] < 1, "one shared level inside the chunk"
        assert (sigma[b, (c + 1) * fpc:] == 1).all(), "later frames fully noised"
    assert chosen_seen == set(range(frames // fpc))


def test_mixing_fractions():
    n = 6000
    t = TrajectoryDistribution(kind="df", frames_per_chunk=2, tf_prob=0.3, bid_prob=0.2)
    sigma, weight = t.sample(n, 6, torch.Generator().manual_seed(0))
    is_tf = (weight == 0).any(dim=1) | ((sigma == 0).any(dim=1))
    is_bid = (sigma == sigma[:, :1]).all(dim=1) & ~is_tf
    # With 3 chunks every tf state has a clean frame (chosen chunk c > 0) or 0-weight frames (c < 2);
    # df and bid states have neither.
    assert abs(is_tf.float().mean().item() - 0.3) < 0.03
    assert abs(is_bid.float().mean().item() - 0.2) < 0.03
    # tf states carry the tf weights; the rest weight every frame.
    assert (weight[~is_tf] == 1).all()


def test_trajectories_deterministic_and_validated():
    t = TrajectoryDistribution(kind="df", frames_per_chunk=2, tf_prob=0.2, bid_prob=0.2)
    a = t.sample(64, 6, torch.Generator().manual_seed(5))
    b = t.sample(64, 6, torch.Generator().manual_seed(5))
    c = t.sample(64, 6, torch.Generator().manual_seed(6))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    with pytest.raises(ValueError, match="multiple of frames_per_chunk"):
        t.sample(2, 5, torch.Generator())
    with pytest.raises(ValueError, match="unknown trajectory kind"):
        TrajectoryDistribution(kind="xx")
    with pytest.raises(ValueError, match="tf_prob"):
        TrajectoryDistribution(tf_prob=0.7, bid_prob=0.5)


class _Linear(torch.nn.Module):
    """Stand-in network with a fixed, input-dependent output (`raw` is what we inspect)."""

    def forward(self, x, timestep, context, **kw):
        if timestep.ndim == 1:
            timestep = timestep[:, None].expand(x.shape[0], x.shape[2])
        return 3.0 * x + timestep[:, None, :, None, None] / 1000.0 - 0.5


def test_denoiser_x0_prediction_returns_flow_of_predicted_x0():
    x0, eps, sigma = _data(2)
    x0, eps, sigma = x0.float(), eps.float(), sigma.float()
    xt = add_noise(x0, eps, sigma)
    net = _Linear()
    d = Denoiser(net, prediction="x0")
    out_raw = d.raw(xt, sigma, None)
    flow = d(xt, sigma, None)
    torch.testing.assert_close(x0_from_flow(xt, flow, sigma), out_raw, atol=1e-5, rtol=1e-5)
    # flow prediction: passed through unchanged.
    torch.testing.assert_close(Denoiser(net, prediction="flow")(xt, sigma, None), out_raw)
    # clip_x0 clamps the implied x0 (for both kinds of prediction).
    clipped = Denoiser(net, prediction="x0", clip_x0=0.5)(xt, sigma, None)
    implied = x0_from_flow(xt, clipped, sigma)
    assert out_raw.abs().max() > 1.0
    torch.testing.assert_close(implied, out_raw.clamp(-0.5, 0.5), atol=1e-5, rtol=1e-5)
    clipped_f = Denoiser(net, prediction="flow", clip_x0=0.5)(xt, sigma, None)
    torch.testing.assert_close(x0_from_flow(xt, clipped_f, sigma),
                               x0_from_flow(xt, out_raw, sigma).clamp(-0.5, 0.5), atol=1e-5, rtol=1e-5)
    # A [B] level works too, and σ is kept away from 0 (finite flow at σ = 0).
    s1 = sigma[:, 0]
    torch.testing.assert_close(d(xt, s1, None), d(xt, s1[:, None].expand_as(sigma), None))
    at_zero = d(xt, torch.zeros_like(sigma), None)
    assert torch.isfinite(at_zero).all()
    torch.testing.assert_close(at_zero, (xt - d.raw(xt, torch.zeros_like(sigma), None)) / SIGMA_MIN)
