"""The `--dry-run` memory estimate: model states per backend are exact byte counts; activations follow the documented rule."""

import pytest

from pipeline import memory

P = 1_000_000


def test_model_states_per_backend():
    ddp = memory.model_states(P, trained=2, ema=1, frozen=1, backend="DDP", zero_stage=0, processes=4)
    assert ddp == dict(weights=8 * P, gradients=8 * P, optimizer=16 * P, ema=4 * P, frozen=4 * P)
    z2 = memory.model_states(P, 2, 1, 1, "DEEPSPEED", 2, 4)
    assert z2 == dict(weights=8 * P, gradients=2 * P, optimizer=4 * P, ema=4 * P, frozen=1 * P)
    z3 = memory.model_states(P, 2, 1, 1, "DEEPSPEED", 3, 4)
    assert z3["weights"] == 2 * P and z3["gradients"] == 2 * P
    z1 = memory.model_states(P, 1, 0, 0, "DEEPSPEED", 1, 2, frozen_bytes=2)
    assert (z1["gradients"], z1["optimizer"]) == (4 * P, 4 * P)


def test_activations_and_cache():
    full = memory.activation_bytes(1000, 64, 10, checkpointing=False)
    ckpt = memory.activation_bytes(1000, 64, 10, checkpointing=True)
    assert full == 34 * 1000 * 64 * 10 and ckpt == 2 * 1000 * 64 * 10 + 34 * 1000 * 64 and ckpt < full
    assert memory.kv_cache_bytes(100, 8, 3) == 2 * 3 * 100 * 8 * 2


def test_estimate_distill_wan_shape():
    # Wan2.1-1.3B-like: 1536 wide, 30 layers, 21 latent frames of 30x52 tokens, one video per GPU, bf16
    kw = dict(params=1_400_000_000, dim=1536, layers=30, tokens_per_frame=1560, frames=21, batch=1,
              window_frames=None, bf16=True)
    ddp = memory.estimate("distill", **kw, checkpointing=True)
    z2 = memory.estimate("distill", **kw, backend="DEEPSPEED", zero_stage=2, processes=8, checkpointing=True)
    nockpt = memory.estimate("distill", **kw, checkpointing=False)
    assert z2.total < ddp.total < nockpt.total
    assert ddp.kv_cache == pytest.approx(2 * 30 * 1560 * 21 * 1536 * 2)
    assert "GiB per device" in ddp.line()
