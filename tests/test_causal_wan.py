"""CausalWanTransformer: streaming = block-causal, bidirectional = diffusers, causality, checkpoints."""

import pytest
import torch
from diffusers import WanTransformer3DModel

from pipeline.models.causal_wan import CausalWanTransformer, KVCache, block_causal_mask
from tests.conftest import TINY_MODEL_KW

B, C, F, H, W = 2, 3, 6, 4, 6  # patch (1, 2, 2): 2x3 = 6 tokens per frame
TOL = 1e-5


def inputs(seed=0, frames=F):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, frames, H, W, generator=g)
    t = torch.rand(B, frames, generator=g) * 1000  # per-frame, per-sample timesteps, all different
    ctx = torch.randn(B, 5, TINY_MODEL_KW["text_dim"], generator=g)
    return x, t, ctx


def max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("fpc", [1, 2, 3])
@torch.no_grad()
def test_streaming_with_cache_equals_block_causal_forward(tiny_model, fpc):
    x, t, ctx = inputs(fpc)
    full = tiny_model(x, t, ctx, attention="block_causal", frames_per_chunk=fpc)
    cache = KVCache()
    outs = []
    for s in range(0, F, fpc):
        outs.append(tiny_model(x[:, :, s:s + fpc], t[:, s:s + fpc], ctx, attention="block_causal",
                               frames_per_chunk=fpc, kv_cache=cache, write_cache=True))
    streamed = torch.cat(outs, dim=2)
    assert streamed.shape == full.shape == (B, C, F, H, W)
    assert max_diff(streamed, full) <= TOL
    # The cache really carried information: without it, later chunks differ.
    alone = tiny_model(x[:, :, fpc:2 * fpc], t[:, fpc:2 * fpc], ctx, attention="block_causal", frames_per_chunk=fpc)
    assert max_diff(alone, full[:, :, fpc:2 * fpc]) > 1e-3


@torch.no_grad()
def test_bidirectional_uniform_timestep_equals_diffusers(tiny_model):
    ref = WanTransformer3DModel(**TINY_MODEL_KW).eval()
    ref.load_state_dict(tiny_model.state_dict())
    x, _, ctx = inputs(1)
    t = torch.tensor([137.0, 815.0])
    ours = tiny_model(x, t, ctx, attention="bidirectional")
    theirs = ref(x, t, ctx, return_dict=False)[0]
    assert ours.shape == theirs.shape
    assert max_diff(ours, theirs) <= TOL
    # Not trivially equal: the timestep matters.
    other = tiny_model(x, torch.tensor([500.0, 500.0]), ctx, attention="bidirectional")
    assert max_diff(ours, other) > 1e-3


@torch.no_grad()
def test_per_frame_timestep_equals_diffusers_per_token_path(tiny_model):
    ref = WanTransformer3DModel(**TINY_MODEL_KW).eval()
    ref.load_state_dict(tiny_model.state_dict())
    x, t, ctx = inputs(2)
    tokens_per_frame = (H // 2) * (W // 2)
    ours = tiny_model(x, t, ctx, attention="bidirectional")
    theirs = ref(x, t.repeat_interleave(tokens_per_frame, dim=1), ctx, return_dict=False)[0]
    assert max_diff(ours, theirs) <= TOL
    # ... and differs from a uniform timestep (the per-frame levels are used).
    uniform = tiny_model(x, t.mean(1), ctx, attention="bidirectional")
    assert max_diff(ours, uniform) > 1e-3


@torch.no_grad()
def test_uniform_timestep_same_as_expanded_per_frame(tiny_model):
    x, _, ctx = inputs(3)
    t = torch.tensor([300.0, 700.0])
    a = tiny_model(x, t, ctx, attention="block_causal", frames_per_chunk=2)
    b = tiny_model(x, t[:, None].expand(B, F), ctx, attention="block_causal", frames_per_chunk=2)
    assert max_diff(a, b) <= TOL


@pytest.mark.parametrize("c", [1, 2])
@torch.no_grad()
def test_causality(tiny_model, c):
    fpc = 2
    x, t, ctx = inputs(4)
    x2 = x.clone()
    x2[:, :, c * fpc:(c + 1) * fpc] += torch.randn_like(x2[:, :, c * fpc:(c + 1) * fpc])
    before = tiny_model(x, t, ctx, attention="block_causal", frames_per_chunk=fpc)
    after = tiny_model(x2, t, ctx, attention="block_causal", frames_per_chunk=fpc)
    earlier = slice(0, c * fpc)
    assert max_diff(before[:, :, earlier], after[:, :, earlier]) <= 1e-6
    assert max_diff(before[:, :, c * fpc:(c + 1) * fpc], after[:, :, c * fpc:(c + 1) * fpc]) > 1e-3
    # Bidirectional: earlier frames see the change.
    bb = tiny_model(x, t, ctx, attention="bidirectional")
    ba = tiny_model(x2, t, ctx, attention="bidirectional")
    assert max_diff(bb[:, :, earlier], ba[:, :, earlier]) > 1e-3


@torch.no_grad()
def test_changing_timestep_of_a_later_chunk_leaves_earlier_chunks(tiny_model):
    x, t, ctx = inputs(5)
    t2 = t.clone()
    t2[:, 3:] = 999.0
    a = tiny_model(x, t, ctx, attention="block_causal", frames_per_chunk=3)
    b = tiny_model(x, t2, ctx, attention="block_causal", frames_per_chunk=3)
    assert max_diff(a[:, :, :3], b[:, :, :3]) <= 1e-6
    assert max_diff(a[:, :, 3:], b[:, :, 3:]) > 1e-3


def test_block_causal_mask():
    frames = torch.arange(6)
    m = block_causal_mask(frames, frames, 2)
    for q in range(6):
        for k in range(6):
            assert bool(m[q, k]) == (k // 2 <= q // 2)
    # Queries at an offset against a cache.
    m2 = block_causal_mask(torch.tensor([4, 5]), frames, 2)
    assert m2.all()
    m3 = block_causal_mask(torch.tensor([2, 3]), frames, 2)
    assert m3[:, :4].all() and not m3[:, 4:].any()


def test_state_dict_keys_match_diffusers(tiny_model):
    ref = WanTransformer3DModel(**TINY_MODEL_KW)
    ours = tiny_model.state_dict()
    theirs = ref.state_dict()
    assert list(ours.keys()) == list(theirs.keys())
    assert all(ours[k].shape == theirs[k].shape for k in ours)


@torch.no_grad()
def test_save_pretrained_round_trip(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "m")
    loaded = CausalWanTransformer.from_pretrained(tmp_path / "m").eval()
    assert isinstance(loaded, CausalWanTransformer)
    x, t, ctx = inputs(6)
    for mode in ("block_causal", "bidirectional"):
        a = tiny_model(x, t, ctx, attention=mode, frames_per_chunk=3)
        b = loaded(x, t, ctx, attention=mode, frames_per_chunk=3)
        assert torch.equal(a, b)
    # Stock diffusers loads the same folder, and agrees in bidirectional mode with a uniform level.
    plain = WanTransformer3DModel.from_pretrained(tmp_path / "m").eval()
    for k, v in tiny_model.state_dict().items():
        assert torch.equal(plain.state_dict()[k], v), k
    tt = torch.tensor([250.0, 750.0])
    assert max_diff(plain(x, tt, ctx, return_dict=False)[0], tiny_model(x, tt, ctx, attention="bidirectional")) <= TOL


@torch.no_grad()
def test_cache_offset_grows_only_on_write(tiny_model):
    x, t, ctx = inputs(7)
    cache = KVCache()
    assert cache.num_frames == 0 and len(cache) == 0
    tiny_model(x[:, :, :2], t[:, :2], ctx, frames_per_chunk=2, kv_cache=cache, write_cache=True)
    assert cache.num_frames == 2
    assert len(cache.keys) == len(tiny_model.blocks)
    tokens = 2 * (H // 2) * (W // 2)
    assert cache.keys[0].shape[1] == tokens
    # Read-only calls (e.g. the denoising steps of the next chunk) leave the cache alone.
    k_before = [k.clone() for k in cache.keys]
    r1 = tiny_model(x[:, :, 2:4], t[:, 2:4], ctx, frames_per_chunk=2, kv_cache=cache, write_cache=False)
    r2 = tiny_model(x[:, :, 2:4], t[:, 2:4], ctx, frames_per_chunk=2, kv_cache=cache, write_cache=False)
    assert cache.num_frames == 2
    assert all(torch.equal(a, b) for a, b in zip(k_before, cache.keys))
    assert torch.equal(r1, r2)
    tiny_model(x[:, :, 2:5], t[:, 2:5], ctx, frames_per_chunk=3, kv_cache=cache, write_cache=True)
    assert cache.num_frames == 5
    assert cache.keys[1].shape[1] == 5 * (H // 2) * (W // 2)


@torch.no_grad()
def test_clear_errors(tiny_model):
    x, t, ctx = inputs(9)
    with pytest.raises(ValueError, match="hidden_states"):
        tiny_model(x[:, :, 0], t[:, 0], ctx)
    with pytest.raises(ValueError, match="timestep"):
        tiny_model(x, t[:, :4], ctx)
    with pytest.raises(ValueError, match="timestep"):
        tiny_model(x, t[:1], ctx)
    with pytest.raises(ValueError, match="attention"):
        tiny_model(x, t, ctx, attention="causal")


@torch.no_grad()
def test_rolling_window_bounds_memory_and_keeps_sinks(tiny_model):
    """4x a 6-frame training length streamed through a 6-frame window with a 2-frame sink: the cache never
    holds more than 6 frames, the sink keys stay those of the first chunk, outputs stay finite."""
    tokens = (H // 2) * (W // 2)
    x, t, ctx = inputs(0, frames=24)
    cache = KVCache(max_frames=6, sink_frames=2)
    first_keys = None
    for start in range(0, 24, 2):
        out = tiny_model(x[:, :, start:start + 2], t[:, start:start + 2], ctx, frames_per_chunk=2,
                         kv_cache=cache, write_cache=True)
        assert torch.isfinite(out).all()
        assert cache.num_frames == min(start + 2, 6) and cache.seen_frames == start + 2
        for k, v in zip(cache.keys, cache.values):
            assert k.shape[1] == v.shape[1] == cache.num_frames * tokens
        if first_keys is None:
            first_keys = [k[:, : 2 * tokens].clone() for k in cache.keys]
    for k, k0 in zip(cache.keys, first_keys):
        assert torch.equal(k[:, : 2 * tokens], k0)


@torch.no_grad()
def test_window_streams_past_rope_table():
    """Positions are re-indexed inside the cache: with a window, a stream longer than rope_max_seq_len
    runs; without one, it fails with a clear error."""
    model = CausalWanTransformer(**{**TINY_MODEL_KW, "rope_max_seq_len": 8}).eval()
    x, t, ctx = inputs(0, frames=12)
    cache = KVCache(max_frames=4, sink_frames=0)
    for start in range(0, 12, 2):
        model(x[:, :, start:start + 2], t[:, start:start + 2], ctx, frames_per_chunk=2, kv_cache=cache, write_cache=True)
    assert cache.seen_frames == 12
    with pytest.raises(ValueError, match="rope_max_seq_len"):
        model(x, t, ctx, frames_per_chunk=2)
    with pytest.raises(ValueError, match="sink_frames"):
        KVCache(max_frames=2, sink_frames=2)


def test_window_must_hold_whole_chunks(tiny_model):
    x, t, ctx = inputs(0, frames=4)
    with pytest.raises(ValueError, match="whole chunks"):
        tiny_model(x[:, :, :2], t[:, :2], ctx, frames_per_chunk=2, kv_cache=KVCache(max_frames=5, sink_frames=0),
                   write_cache=True)


@pytest.mark.parametrize("window", [None, (6, 2)])
@torch.no_grad()
def test_context_frames_equal_a_write_then_a_call(tiny_model, window):
    """A call whose first chunk is finished context (`context_frames`) equals writing that chunk to the
    cache and then calling on the rest: same output, same cache, at every position of a 24-frame stream
    (with a window, also once it rolls)."""
    x, t, ctx = inputs(0, frames=24)
    kw = dict(max_frames=window[0], sink_frames=window[1]) if window else {}
    two, one = KVCache(**kw), KVCache(**kw)
    tiny_model(x[:, :, :2], t[:, :2], ctx, frames_per_chunk=2, kv_cache=two, write_cache=True)
    tiny_model(x[:, :, :2], t[:, :2], ctx, frames_per_chunk=2, kv_cache=one, write_cache=True)
    for start in range(2, 22, 2):
        ref_ctx, nxt = x[:, :, start:start + 2], x[:, :, start + 2:start + 4]
        tiny_model(ref_ctx, t[:, start:start + 2], ctx, frames_per_chunk=2, kv_cache=two, write_cache=True)
        ref = tiny_model(nxt, t[:, start + 2:start + 4], ctx, frames_per_chunk=2, kv_cache=two)
        fused = tiny_model(torch.cat([ref_ctx, nxt], dim=2), t[:, start:start + 4], ctx, frames_per_chunk=2,
                           kv_cache=one, context_frames=2)
        assert fused.shape == ref.shape
        assert max_diff(fused, ref) <= TOL
        assert (one.num_frames, one.seen_frames) == (two.num_frames, two.seen_frames)
        for a, b in zip(one.keys + one.values, two.keys + two.values):
            assert a.shape == b.shape and max_diff(a, b) <= TOL
    assert two.num_frames == (6 if window else 22)


def test_context_frames_errors(tiny_model):
    x, t, ctx = inputs(0, frames=4)
    with pytest.raises(ValueError, match="context_frames"):
        tiny_model(x, t, ctx, frames_per_chunk=2, context_frames=2)  # no cache
    with pytest.raises(ValueError, match="context_frames"):
        tiny_model(x, t, ctx, frames_per_chunk=2, kv_cache=KVCache(), context_frames=1)  # not a whole chunk
    with pytest.raises(ValueError, match="context_frames"):
        tiny_model(x, t, ctx, frames_per_chunk=2, kv_cache=KVCache(), context_frames=2, write_cache=True)
