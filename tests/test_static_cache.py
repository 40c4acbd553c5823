"""The static KV cache (`pipeline/models/kv_cache.py`): equal to the reference cache and to direct computations,
in both RoPE semantics, written in place."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pipeline.models.causal_wan import CausalWanTransformer, KVCache
from pipeline.models.kv_cache import BufferPool, StaticKVCache, new_kv_cache, rope_at
from pipeline.diffusion.sampling import Denoiser, few_step_sigmas, sample_autoregressive, sample_few_step

FPC, B = 3, 2


def model_of(layers: int = 2, rope_max_seq_len: int = 1024) -> CausalWanTransformer:
    torch.manual_seed(0)
    return CausalWanTransformer(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
                                out_channels=4, text_dim=16, freq_dim=32, ffn_dim=32, num_layers=layers,
                                rope_max_seq_len=rope_max_seq_len).eval()


def stream(model, cache, x, ctx, fused: bool) -> torch.Tensor:
    """A sampler's call pattern: per chunk, the previous chunk written as context (fused into the call or
    a call of its own), then the chunk denoised once at level 500."""
    outs, pending = [], None
    for c in range(x.shape[2] // FPC):
        xs = x[:, :, c * FPC:(c + 1) * FPC]
        t = torch.full((B, FPC), 500.0, device=x.device)
        if pending is not None and fused:
            out = model(torch.cat([pending, xs], 2), torch.cat([torch.zeros_like(t), t], 1), ctx,
                        frames_per_chunk=FPC, kv_cache=cache, context_frames=FPC)
        else:
            if pending is not None:
                model(pending, torch.zeros_like(t), ctx, frames_per_chunk=FPC, kv_cache=cache, write_cache=True)
            out = model(xs, t, ctx, frames_per_chunk=FPC, kv_cache=cache)
        outs.append(out)
        pending = 0.5 * xs
    return torch.cat(outs, 2)


@pytest.mark.parametrize("rope", ["relative", "absolute"])
@pytest.mark.parametrize("window,sinks", [(None, 0), (6, 0), (9, 3), (12, 6)])
def test_static_equals_reference_cache_over_4x_the_training_length(rope, window, sinks):
    model = model_of()
    x, ctx = torch.randn(B, 4, 24, 4, 4), torch.randn(B, 3, 16)  # 24 = 4 x a 6-frame training clip
    with torch.no_grad():
        for fused in (False, True):
            ref = stream(model, KVCache(max_frames=window, sink_frames=sinks, rope=rope), x, ctx, fused)
            static = StaticKVCache(max_frames=window, sink_frames=sinks, rope=rope)
            out = stream(model, static, x, ctx, fused)
            torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
            assert (static.seen_frames, static.num_frames) == (21, min(21, window or 21))


def test_static_equals_one_block_causal_forward():
    model = model_of()
    x, ctx = torch.randn(B, 4, 12, 4, 4), torch.randn(B, 3, 16)
    t = torch.rand(B, 12) * 1000
    with torch.no_grad():
        full = model(x, t, ctx, frames_per_chunk=FPC)
        cache, outs = StaticKVCache(), []
        for c in range(4):
            sl = slice(c * FPC, (c + 1) * FPC)
            outs.append(model(x[:, :, sl], t[:, sl], ctx, frames_per_chunk=FPC, kv_cache=cache, write_cache=True))
    torch.testing.assert_close(torch.cat(outs, 2), full, atol=1e-5, rtol=0)


@pytest.mark.parametrize("rope", ["relative", "absolute"])
def test_rope_semantics_equal_a_direct_computation(rope):
    """One layer: a cached frame's keys depend on that frame alone, so the last chunk's output equals one
    forward over [sinks, window, chunk] with the positions each semantics gives them (relative: 0..n-1;
    absolute: every frame its index in the stream)."""
    model = model_of(layers=1)
    window, sinks, written = 9, 3, 18
    x, ctx = torch.randn(B, 4, written + FPC, 4, 4), torch.randn(B, 3, 16)
    with torch.no_grad():
        cache = StaticKVCache(max_frames=window, sink_frames=sinks, rope=rope)
        for c in range(written // FPC):
            sl = slice(c * FPC, (c + 1) * FPC)
            model(x[:, :, sl], torch.zeros(B, FPC), ctx, frames_per_chunk=FPC, kv_cache=cache, write_cache=True)
        t = torch.full((B, FPC), 700.0)
        out = model(x[:, :, written:], t, ctx, frames_per_chunk=FPC, kv_cache=cache)

        kept = list(range(sinks)) + list(range(written - (window - sinks), written))
        frames = kept + list(range(written, written + FPC))
        if rope == "absolute":
            positions = torch.tensor(frames)
            model._rope = lambda n, h, w, device: rope_at(model.rope, positions, h // 2, w // 2)
        else:
            assert kept != list(range(len(kept)))  # the window has rolled: the two semantics differ here
        direct = model(x[:, :, frames], torch.cat([torch.zeros(B, len(kept)), t], 1), ctx, frames_per_chunk=FPC)
    torch.testing.assert_close(out, direct[:, :, -FPC:], atol=1e-5, rtol=0)


def test_positions_past_the_rope_table():
    """Absolute indices past `rope_max_seq_len` extend the table with diffusers' own function: a stream of
    48 frames through a 16-row table equals the reference (whose relative positions stay inside it)."""
    model = model_of(rope_max_seq_len=16)
    x, ctx = torch.randn(B, 4, 48, 4, 4), torch.randn(B, 3, 16)
    with torch.no_grad():
        ref = stream(model, KVCache(max_frames=6, sink_frames=3), x, ctx, True)
        out = stream(model, StaticKVCache(max_frames=6, sink_frames=3), x, ctx, True)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    rows = rope_at(model.rope, torch.arange(16), 1, 1)
    table = model._rope(16, 2, 2, "cpu")
    torch.testing.assert_close(rows[0], table[0])


def test_written_in_place_once_the_window_is_full():
    model = model_of()
    x, ctx = torch.randn(B, 4, 24, 4, 4), torch.randn(B, 3, 16)
    cache = StaticKVCache(max_frames=6, sink_frames=3)
    seen = {}
    with torch.no_grad():
        for c in range(8):
            sl = slice(c * FPC, (c + 1) * FPC)
            model(x[:, :, sl], torch.zeros(B, FPC), ctx, frames_per_chunk=FPC, kv_cache=cache, write_cache=True)
            if cache.full:
                seen.setdefault("ptr", [t.data_ptr() for t in cache.keys])
                assert [t.data_ptr() for t in cache.keys] == seen["ptr"]  # no reallocation, no concatenation
    assert cache.num_frames == 6 and cache.seen_frames == 24


def test_samplers_equal_with_either_cache():
    model = model_of()
    noise, cond = torch.randn(B, 4, 12, 4, 4), torch.randn(B, 3, 16)
    gen = lambda: torch.Generator().manual_seed(1)  # noqa: E731
    out = {}
    for kind in ("dynamic", "static"):
        den = Denoiser(model, "block_causal", FPC, "flow", kv_cache=kind)
        out[kind] = (sample_few_step(den, noise, cond, few_step_sigmas(), context_sigma=0.1, generator=gen(),
                                     max_context_frames=6, sink_frames=3),
                     sample_autoregressive(den, noise, cond, None, steps=3, max_context_frames=6, sink_frames=3))
    for a, b in zip(out["dynamic"], out["static"]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_cache_kinds():
    assert isinstance(new_kv_cache("auto", device="cpu"), KVCache)  # the CPU path stays the reference
    with torch.no_grad():
        assert isinstance(new_kv_cache("static", max_frames=6), StaticKVCache)
    assert isinstance(new_kv_cache("static", max_frames=6), KVCache)  # gradients flow: the dynamic cache
    model = model_of()
    with pytest.raises(ValueError, match="StaticKVCache is for inference"):
        model(torch.randn(1, 4, 3, 4, 4), torch.zeros(1), torch.randn(1, 3, 16), frames_per_chunk=FPC,
              kv_cache=StaticKVCache())
    with pytest.raises(ValueError, match="rope must be one of"):
        StaticKVCache(rope="alibi")


@pytest.mark.parametrize("scope, layers", [("blocks", 2), ("full", 1)])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA"))])
def test_compiled_steady_state_step_equals_eager(device, scope, layers):
    """`compile_steady_state`: once the window is full (and rolled) the sampler's fused call (context
    write into the ring, sinks rotated, the chunk denoised) runs through `torch.compile` (inductor; on CUDA
    `reduce-overhead`, captured in CUDA graphs), traced once, as does the first chunk's call (an empty
    cache); equal to the eager stream. Regional
    compilation ("blocks") traces one block for all of them: one graph however many blocks (the full
    scope: one layer here, for the compile time of a 2-core CPU)."""
    from torch._dynamo.utils import counters

    model = model_of(layers=layers).to(device)
    x, ctx = torch.randn(B, 4, 24, 4, 4).to(device), torch.randn(B, 3, 16).to(device)
    calls = []
    with torch.no_grad():
        ref = stream(model, StaticKVCache(max_frames=6, sink_frames=3), x, ctx, True)
        model.compile_steady_state(scope=scope)
        compiled = model._steady_step
        model._steady_step = lambda *a: calls.append(1) or compiled(*a)
        counters.clear()
        out = stream(model, StaticKVCache(max_frames=6, sink_frames=3), x, ctx, True)
    # chunks 4..7 (the window of 6 frames is full from chunk 3 on, rolled from chunk 4), and chunk 0's calls
    # over an empty cache after the first (which allocates the buffers): here its one call, then in a second stream
    assert len(calls) == 4
    calls.clear()
    with torch.no_grad():
        cache = StaticKVCache(max_frames=6, sink_frames=3)
        first = stream(model, cache, x[:, :, :FPC], ctx, True)
        again = model(x[:, :, :FPC], torch.full((B, FPC), 500.0, device=device), ctx, frames_per_chunk=FPC,
                      kv_cache=cache)
    assert len(calls) == 1
    torch.testing.assert_close(again, first, atol=1e-5, rtol=0)
    assert counters["stats"]["unique_graphs"] == 2  # the two kinds; no recompilation between calls, nor between blocks
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="scope must be"):
        model.compile_steady_state(scope="model")


@pytest.mark.parametrize("rope", ["relative", "absolute"])
def test_buffer_pool_hands_a_freed_cache_buffers_to_the_next_stream(rope):
    """`BufferPool`: a stream's cache takes the buffers a freed cache left, each in its role (block i's keys
    become block i's keys: a CUDA graph recorded over them replays), never those of a live one, and the last
    stream's values in them are never read: the second stream (other inputs) equals one on fresh buffers, through
    a rolled window with sinks. A request of another shape (batch) drops the pooled buffers of that role."""
    model = model_of()
    pool = BufferPool()
    x, ctx = torch.randn(B, 4, 24, 4, 4), torch.randn(B, 3, 16)
    with torch.no_grad():
        cache = StaticKVCache(max_frames=6, sink_frames=3, rope=rope, pool=pool)
        stream(model, cache, x, ctx, True)
        held = {"keys": list(cache.keys), "values": list(cache.values), "sink_keys": list(cache.sink_keys)}
        other = StaticKVCache(max_frames=6, sink_frames=3, rope=rope, pool=pool)
        stream(model, other, x[:, :, :6], ctx, True)  # while `cache` lives: buffers of its own
        assert not pool.free and {id(t) for ts in held.values() for t in ts}.isdisjoint(
            id(t) for t in other.keys + other.values + other.sink_keys)
        del cache
        reused = StaticKVCache(max_frames=6, sink_frames=3, rope=rope, pool=pool)
        out = stream(model, reused, -x, ctx, True)
        # the freed cache's buffers, each in its own role and block (the addresses a CUDA graph recorded)
        for role, ts in held.items():
            assert len(getattr(reused, role)) == len(ts) and all(a is b for a, b in zip(getattr(reused, role), ts))
        assert len(held["sink_keys"]) == (2 if rope == "relative" else 0)
        ref = stream(model, StaticKVCache(max_frames=6, sink_frames=3, rope=rope), -x, ctx, True)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
    del reused
    smaller = StaticKVCache(max_frames=6, sink_frames=3, rope=rope, pool=pool)
    with torch.no_grad():
        model(x[:1, :, :FPC], torch.zeros(1, FPC), ctx[:1], frames_per_chunk=FPC, kv_cache=smaller, write_cache=True)
    assert not any(t.shape[0] == B for ts in pool.free.values() for t in ts)  # the batch-2 buffers are not kept
    # an unbounded cache's next stream starts on the buffers its predecessor grew (`adopt_pooled`): none regrown
    pool = BufferPool()
    with torch.no_grad():
        grown = StaticKVCache(rope=rope, pool=pool)
        stream(model, grown, x, ctx, True)
        held = list(grown.keys)
        del grown
        again = StaticKVCache(rope=rope, pool=pool)
        out = stream(model, again, -x, ctx, True)
        assert len(again.keys) == len(held) and all(a is b for a, b in zip(again.keys, held))
        ref = stream(model, StaticKVCache(rope=rope), -x, ctx, True)
    torch.testing.assert_close(out, ref, atol=0, rtol=0)


def test_a_pooled_set_is_one_freed_cache_whole():
    """`BufferPool.take_set` hands over buffers of one shape for every block (one freed cache's), not block 0's of a
    larger cache with block 1's of a smaller one, whose slots a compiled call would overrun; nothing is taken where
    no whole set fits."""
    pool = BufferPool()
    big = [torch.zeros(B, 16, 2, 4)]  # a one-block cache of 16 slots, freed first
    small = [torch.zeros(B, 8, 2, 4) for _ in range(2)]  # a two-block cache of 8 slots
    pool.give(big, [t.clone() for t in big], [])
    pool.give(small, [t.clone() for t in small], [])
    assert pool.take_set(2, ("keys", "values"), lambda role, t: t.shape[1] >= 12) is None  # only `big` has room
    assert len(pool.free["keys", 0]) == 2  # nothing taken
    got = pool.take_set(2, ("keys", "values"), lambda role, t: t.shape[1] >= 4)
    assert got["keys"][0] is small[0] and got["keys"][1] is small[1]
    assert {t.shape for ts in got.values() for t in ts} == {small[0].shape}


@pytest.mark.parametrize("scope, window", [("blocks", None), ("full", None)])
def test_compiled_calls_that_need_more_cache_slots_run_eagerly(scope, window):
    """A compiled call cannot allocate or grow the cache buffers: the rolling sampler (a first call of one chunk,
    then calls of several over an empty cache) and an unbounded cache (buffers sized by the first call) run those
    calls eagerly and give the eager sampler's videos."""
    from pipeline.diffusion.sampling import sample_rolling

    model = model_of(layers=1)  # (compile time on a 2-core CPU)
    x, ctx = torch.randn(B, 4, 18, 4, 4), torch.randn(B, 3, 16)
    sigmas = few_step_sigmas([1000, 750, 500, 250], 5.0)
    den = Denoiser(model, "block_causal", FPC, "flow", kv_cache="static", pool=BufferPool())
    with torch.no_grad():
        ref = sample_rolling(den, x, ctx, sigmas, max_context_frames=window, generator=torch.Generator().manual_seed(1))
        model.compile_steady_state(scope=scope)
        out = sample_rolling(den, x, ctx, sigmas, max_context_frames=window, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_a_pooled_stream_runs_its_first_call_compiled():
    """With a `BufferPool`, a stream after the first takes the freed stream's whole set of buffers before its first
    call (`StaticKVCache.adopt_pooled`), so that call, the first of the first chunk, runs compiled too (the first
    stream's ran eagerly: it allocated them); the videos equal the eager sampler's. Buffers of another precision
    are not adopted, and keys of another precision than a cache's buffers are refused with a clear error."""
    model = model_of(layers=1)  # (compile time on a 2-core CPU)
    x, ctx = torch.randn(B, 4, 12, 4, 4), torch.randn(B, 3, 16)
    sigmas = few_step_sigmas([1000, 750, 500, 250], 5.0)
    den = Denoiser(model, "block_causal", FPC, "flow", kv_cache="static", pool=BufferPool())
    kw = dict(max_context_frames=6, sink_frames=3)
    with torch.no_grad():
        ref = sample_few_step(den, x, ctx, sigmas, generator=torch.Generator().manual_seed(1), **kw)
        model.compile_steady_state(scope="blocks")
        den.pool = BufferPool()  # (the eager stream's buffers would serve the first compiled one)
        compiled, calls = model._steady_step, []
        model._steady_step = lambda *a: calls.append(1) or compiled(*a)
        outs, counts = [], []
        for _ in range(2):
            outs.append(sample_few_step(den, x, ctx, sigmas, generator=torch.Generator().manual_seed(1), **kw))
            counts.append(len(calls))
            calls.clear()
    assert counts[1] == counts[0] + 1  # the second stream's first call too
    for out in outs:
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)
    # a pooled set of fp32 buffers, keys computed in float64: refused, not silently cast
    with torch.no_grad():
        cache = den.new_cache(max_frames=6, sink_frames=3)
        passes = model._static_passes(cache, FPC, 0, False, "block_causal", FPC, 2, 2, "cpu")
        kw = dict(blocks=1, batch=B, heads=2, head_dim=12, device="cpu")
        cache.adopt_pooled(passes, dtype=torch.float64, **kw)  # a stream of another precision: nothing adopted
        assert not cache.keys
        cache.adopt_pooled(passes, dtype=torch.float32, **kw)
        assert cache.keys and cache.keys[0].dtype == torch.float32
        with pytest.raises(ValueError, match="float32 keys, this call computes torch.float64"):
            cache.layer(0).attend_inputs(passes[0], *torch.zeros(2, B, FPC * 4, 2, 12, dtype=torch.float64))


class HostTraffic(TorchDispatchMode):
    """The ops that stop a GPU stream's host from running ahead: a copy from a host tensor into a device one (from
    pageable memory CUDA first waits for every queued kernel) and a read of a device scalar (`.item()`, `int()`)."""

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        aten = torch.ops.aten
        if func is aten._to_copy.default and args[0].device.type == "cpu" and \
                torch.device(kwargs.get("device") or "cpu").type != "cpu":
            self.ops.append(f"host-to-device copy {tuple(args[0].shape)}")
        elif func is aten.copy_.default and args[0].device.type != "cpu" and args[1].device.type == "cpu":
            self.ops.append(f"host-to-device copy_ {tuple(args[1].shape)}")
        elif func is aten._local_scalar_dense.default and args[0].device.type != "cpu":
            self.ops.append("device scalar read")
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("kv_cache, rope, sinks, fused", [
    ("static", "relative", 3, True), ("static", "relative", 3, False), ("static", "absolute", 3, True),
    ("static", "relative", 0, True), ("dynamic", "absolute", 3, True), ("dynamic", "relative", 3, True)])
def test_a_streaming_block_moves_nothing_between_host_and_device(monkeypatch, kv_cache, rope, sinks, fused):
    """Issue [gpu]'s "no host synchronisation inside a block": streaming on a device (here the meta device: shapes
    only, so anything reading a device value would fail), no network call copies a host tensor over (RoPE rows and
    ring slots are slices and `arange`s made on the device) and nothing reads a device value back, through the
    window's filling and rolling, with sinks, both RoPE semantics, fused and separate cache writes. The re-noising
    draws use a device generator on a GPU (`sampling._noise`); meta has none, so here they are drawn on the device
    without one."""
    from pipeline.diffusion import sampling

    monkeypatch.setattr(sampling, "_noise", lambda like, generator: torch.randn(like.shape, device=like.device))
    model = model_of().to("meta")
    den = Denoiser(model, "block_causal", FPC, "x0", kv_cache=kv_cache, rope=rope)
    noise = torch.empty(1, 4, 6 * FPC, 8, 8, device="meta")
    ctx = torch.empty(1, 4, 16, device="meta")
    chunks = []
    with HostTraffic() as traffic:
        sample_few_step(den, noise, ctx, few_step_sigmas([1000, 750, 500, 250], 5.0), max_context_frames=2 * FPC,
                        sink_frames=sinks, fuse_cache_write=fused, on_chunk=lambda i, c: chunks.append(i))
    assert chunks == list(range(6)) and traffic.ops == []
    # the check sees a host copy when there is one
    with HostTraffic() as traffic:
        torch.arange(3).to("meta")
    assert traffic.ops == ["host-to-device copy (3,)"]
