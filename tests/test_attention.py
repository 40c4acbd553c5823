"""pipeline/models/attention.py: the block-causal mask description, FlexAttention = dense-mask path, backends.

Compiling flex_attention costs ~10 s per token shape on a CPU, so the tests share three shapes:
(96, 96) and (48, 96) tokens at the model level, (144, 216) at the `attend` level (several 128-token
blocks, none of the lengths a multiple of 128). FlexAttention has no CPU backward: gradients are
compared on CUDA only (on a CPU, "flex" falls back to the dense mask when gradients are needed).
"""

import pytest
import torch

from pipeline.models import attention
from pipeline.models.attention import BlockCausalMask, attend, block_causal, block_causal_mask, flex_block_mask
from pipeline.models.causal_wan import KVCache, build_transformer
from pipeline.config import ConfigError, load_config
from tests.conftest import make_tiny_model

TOL = 1e-5
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]
B, C, H, W = 2, 3, 8, 8  # patch (1, 2, 2): 16 tokens per frame


@pytest.fixture
def flex_calls(monkeypatch):
    """Counts calls of the compiled flex_attention (so a test knows the flex path really ran)."""
    calls = []
    compiled = attention._compiled_flex()

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return compiled(*args, **kwargs)

    monkeypatch.setattr(attention, "_compiled_flex", lambda: spy)
    return calls


def max_diff(a, b):
    return (a - b).abs().max().item()


@pytest.mark.parametrize("q_offset,q_frames,fpc", [(0, 6, 1), (0, 6, 3), (3, 3, 1), (2, 4, 2), (3, 3, 3), (0, 1, 1)])
def test_description_matches_block_causal_mask(q_offset, q_frames, fpc):
    tpf = 3
    spec = BlockCausalMask(q_offset, q_frames, fpc, tpf)
    q = torch.arange(q_offset, q_offset + q_frames).repeat_interleave(tpf)
    k = torch.arange(q_offset + q_frames).repeat_interleave(tpf)
    ref = block_causal_mask(q, k, fpc)
    assert spec.shape == tuple(ref.shape) and torch.equal(spec.dense("cpu"), ref)
    assert spec.dense("cpu") is spec.dense(torch.device("cpu"))  # built once per description
    # None exactly when every key is visible (today's rule).
    assert (block_causal(q_offset=q_offset, q_frames=q_frames, frames_per_chunk=fpc, tokens_per_frame=tpf) is None) \
        == bool(ref.all())


def test_block_mask_cache():
    a = BlockCausalMask(3, 6, 1, 24)
    first = flex_block_mask(a, "cpu")
    assert flex_block_mask(BlockCausalMask(3, 6, 1, 24), torch.device("cpu")) is first  # equal description: hit
    assert a.block_mask("cpu") is first
    assert flex_block_mask(BlockCausalMask(3, 6, 3, 24), "cpu") is not first
    assert first.seq_lengths == (144, 216)


def qkv(lq, lk, device, seed=0, heads=2, dim=16, batch=1):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, n, heads, dim, generator=g) for n in (lq, lk, lk))
    return q.to(device), k.to(device), v.to(device)


@pytest.mark.parametrize("device", DEVICES)
def test_attend_flex_equals_dense(flex_calls, device):
    # Three descriptions of (144, 216) tokens: one compiled kernel.
    for spec in (BlockCausalMask(3, 6, 1, 24), BlockCausalMask(3, 6, 3, 24), BlockCausalMask(6, 12, 2, 12)):
        q, k, v = qkv(*spec.shape, device)
        grad = device == "cuda"
        for t in (q, k, v):
            t.requires_grad_(grad)
        dense = attend(q, k, v, spec, backend="dense")
        flex = attend(q, k, v, spec, backend="flex")
        assert dense.shape == flex.shape == q.shape
        assert max_diff(dense, flex) <= TOL
        # The mask matters: plain attention differs.
        assert max_diff(attend(q, k, v, None, backend="dense"), dense) > 1e-3
        if grad:
            g = torch.randn_like(dense)
            gd = torch.autograd.grad(dense, (q, k, v), g)
            gf = torch.autograd.grad(flex, (q, k, v), g)
            assert max(max_diff(a, b) for a, b in zip(gd, gf)) <= TOL
    assert len(flex_calls) == 3


def test_attend_cpu_backward_falls_back_to_dense(flex_calls):
    spec = BlockCausalMask(3, 6, 3, 24)
    q, k, v = qkv(*spec.shape, "cpu")
    q.requires_grad_(True)
    out = attend(q, k, v, spec, backend="flex")
    (g,) = torch.autograd.grad(out.square().sum(), q)
    assert flex_calls == [] and torch.isfinite(g).all()
    # "auto" on a CPU is the dense path (today's numerics), gradients or not.
    with torch.no_grad():
        assert torch.equal(attend(q, k, v, spec), attend(q, k, v, spec, backend="dense"))
    assert flex_calls == []


def inputs(frames, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, C, frames, H, W, generator=g)
    t = torch.rand(B, frames, generator=g) * 1000
    ctx = torch.randn(B, 5, 16, generator=g)
    return x.to(device), t.to(device), ctx.to(device)


def scenarios(model, x, t, ctx):
    """Model outputs of every kind of masked call (16 tokens per frame): full-sequence block-causal
    forwards (fpc 1 and 3: (96, 96) tokens), a cache-writing forward over an empty cache (fpc 3), a chunk of
    3 frames over a 3-frame cache (fpc 1: (48, 96)), and a fused context chunk of 3 frames (fpc 1: its
    call (48, 96) masked, the last frame's (16, 112) not)."""
    out = {}
    for fpc in (1, 3):
        out[f"full{fpc}"] = model(x[:, :, :6], t[:, :6], ctx, frames_per_chunk=fpc)
    out["cache_write3"] = model(x[:, :, :6], t[:, :6], ctx, frames_per_chunk=3, kv_cache=KVCache(), write_cache=True)

    def cache_of_3():
        cache = KVCache()
        with torch.no_grad():
            for i in range(3):  # one frame per call: unmasked
                model(x[:, :, i:i + 1], t[:, i:i + 1], ctx, frames_per_chunk=1, kv_cache=cache, write_cache=True)
        return cache

    out["cached1"] = model(x[:, :, 3:6], t[:, 3:6], ctx, frames_per_chunk=1, kv_cache=cache_of_3())
    out["fused1"] = model(x[:, :, 3:7], t[:, 3:7], ctx, frames_per_chunk=1, kv_cache=cache_of_3(), context_frames=3)
    return out


def test_model_flex_forward_equals_dense(flex_calls):
    model = make_tiny_model(attention_head_dim=16)
    x, t, ctx = inputs(7)
    with torch.no_grad():
        model.set_attention_backend("dense")
        dense = scenarios(model, x, t, ctx)
        assert flex_calls == []
        model.set_attention_backend("flex")
        flex = scenarios(model, x, t, ctx)
    assert flex_calls  # every masked call of every block
    assert {tuple(s) for s in flex_calls} == {(B, 2, 96, 16), (B, 2, 48, 16)}  # [B, heads, L, d]
    for name in dense:
        assert dense[name].shape == flex[name].shape
        assert max_diff(dense[name], flex[name]) <= TOL, name
    # The streamed chunk equals the full forward's frames (the cache path is exercised, not bypassed).
    assert max_diff(flex["cached1"], flex["full1"][:, :, 3:]) <= TOL


@pytest.mark.parametrize("device", DEVICES)
def test_model_flex_backward_equals_dense(flex_calls, device):
    """Gradients of inputs and parameters (on a CPU "flex" runs the dense mask: no flex backward there)."""
    model = make_tiny_model(attention_head_dim=16).to(device)
    x, t, ctx = inputs(7, seed=1, device=device)

    def grads(backend):
        model.set_attention_backend(backend)
        model.zero_grad()
        xs = x.clone().requires_grad_(True)
        out = scenarios(model, xs, t, ctx)
        sum(o.square().mean() for o in out.values()).backward()
        return out, xs.grad, [p.grad.clone() for p in model.parameters()]

    dense, dx_dense, dp_dense = grads("dense")
    flex, dx_flex, dp_flex = grads("flex")
    assert bool(flex_calls) == (device == "cuda")
    for name in dense:
        assert max_diff(dense[name], flex[name]) <= TOL, name
    assert max_diff(dx_dense, dx_flex) <= TOL
    assert max(max_diff(a, b) for a, b in zip(dp_dense, dp_flex)) <= TOL


def test_auto_on_cpu_is_the_dense_path(flex_calls):
    model = make_tiny_model()
    x, t, ctx = inputs(6)
    with torch.no_grad():
        auto = model(x, t, ctx, frames_per_chunk=3)
        model.set_attention_backend("dense")
        dense = model(x, t, ctx, frames_per_chunk=3)
    assert flex_calls == [] and torch.equal(auto, dense)


def test_backend_config_and_wiring():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["model.attention_backend=fastest"])
    msg = str(e.value)
    assert "\n" not in msg and "model.attention_backend" in msg and "'fastest'" in msg and "flex" in msg
    if not attention._check_attention_backend_requirements.__globals__["_CAN_USE_FLASH_ATTN"]:
        with pytest.raises(ConfigError) as e:  # flash-attn not installed: said at config time, in one line
            load_config(None, ["model.attention_backend=flash"])
        assert "\n" not in str(e.value) and "model.attention_backend" in str(e.value)
    cfg = load_config(None, ["model.attention_backend=_native_cudnn", "model.num_layers=1"])
    assert cfg.model.attention_backend == "cudnn"  # diffusers' spelling, normalised
    cfg.model.attention_backend = "flex"
    model = build_transformer(cfg.model)
    assert model.attention_backend == "flex"
    assert model.blocks[0].attn1.processor._attention_backend == "flex"
    assert model.blocks[0].attn2.processor._attention_backend is None  # cross-attention: unmasked, SDPA
    with pytest.raises(ValueError, match="attention backend"):
        model.set_attention_backend("fastest")
