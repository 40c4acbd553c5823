"""A per-GPU memory estimate for `--dry-run`: what each stage holds, under DDP or DeepSpeed ZeRO.

Model states are counted exactly from the parameter count `P` (bytes per parameter):

| state | bytes | DDP | ZeRO-1 | ZeRO-2 | ZeRO-3 |
| --- | --- | --- | --- | --- | --- |
| fp32 weights (trained) | 4 | 4 | 4 | 4 | 4/N |
| fp32 gradients | 4 | 4 | 4 | 4/N | 4/N |
| AdamW moments (2 × fp32) | 8 | 8 | 8/N | 8/N | 8/N |
| EMA copy (fp32, generator / teacher) | 4 | 4 | 4 | 4 | 4 |
| frozen weights (teacher in distill, ODE teacher) | 4 (2 in bf16) | same | same | same | /N (ZeRO-3 engine) |

Activations are an estimate: per transformer layer and token, about 34·D bytes in 16-bit precision
without recomputation (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
Transformer Models", with memory-efficient attention, so no quadratic term), or 2·D bytes (the
layer input) plus one layer's 34·D with gradient checkpointing. A Self-Forcing rollout keeps
gradients only at each chunk's exit step, so the tokens that hold activations are those of one
video; its KV cache adds 2 (K, V) × layers × window tokens × D × 2 bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1024 ** 3
ACT_BYTES_PER_TOKEN_DIM = 34  # per layer, 16-bit activations, flash/SDPA attention


@dataclass
class MemoryEstimate:
    """Bytes per GPU, by component."""

    weights: float
    gradients: float
    optimizer: float
    ema: float
    frozen: float
    activations: float
    kv_cache: float

    @property
    def total(self) -> float:
        return sum(vars(self).values())

    def line(self) -> str:
        parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in vars(self).items() if v)
        return f"~{self.total / GIB:.1f} GiB per device ({parts} GiB)"


def model_states(params: int, trained: int, ema: int, frozen: int, backend: str, zero_stage: int, processes: int,
                 frozen_bytes: int = 4) -> dict:
    """Bytes per GPU of weights, gradients, optimizer, EMA and frozen copies.

    Args:
        params: parameters of one model.
        trained, ema, frozen: how many models of that size are trained (with AdamW), EMA-averaged,
            held frozen.
        backend: "DDP" (or single), "DEEPSPEED"; `zero_stage` applies to DeepSpeed.
        frozen_bytes: 4 (fp32) or 2 (bf16) per frozen weight.
    """
    n = max(processes, 1)
    stage = zero_stage if backend == "DEEPSPEED" else 0
    w = 4 / n if stage >= 3 else 4
    g = 4 / n if stage >= 2 else 4
    o = 8 / n if stage >= 1 else 8
    f = frozen_bytes / n if backend == "DEEPSPEED" else frozen_bytes  # the frozen teacher: a ZeRO-3 engine
    return dict(weights=trained * params * w, gradients=trained * params * g, optimizer=trained * params * o,
                ema=ema * params * 4, frozen=frozen * params * f)


def activation_bytes(tokens: int, dim: int, layers: int, checkpointing: bool, trained_forwards: int = 1) -> float:
    """Activations kept for the backward pass of `trained_forwards` models over `tokens` tokens."""
    per_layer = ACT_BYTES_PER_TOKEN_DIM * tokens * dim
    if checkpointing:
        return trained_forwards * (2 * tokens * dim * layers + per_layer)
    return trained_forwards * per_layer * layers


def kv_cache_bytes(tokens: int, dim: int, layers: int, bytes_per: int = 2) -> float:
    """K and V of `tokens` cached tokens in every layer."""
    return 2 * layers * tokens * dim * bytes_per


def estimate(stage: str, params: int, dim: int, layers: int, tokens_per_frame: int, frames: int, batch: int,
             window_frames: int | None, backend: str = "DDP", zero_stage: int = 2, processes: int = 1,
             checkpointing: bool = False, bf16: bool = False) -> MemoryEstimate:
    """Per-GPU memory of one training stage.

    Args:
        stage: pretrain_teacher | init_student | distill (sf_dmd's three models).
        params, dim, layers: the transformer's parameter count, hidden size and depth.
        tokens_per_frame, frames, batch: one video's latent tokens per frame, latent frames, videos per GPU.
        window_frames: the student's KV window (None: all frames) for distill's rollout.
    """
    act_bytes = 1.0 if bf16 else 2.0  # the 34·D rule counts 16-bit activations
    tokens = tokens_per_frame * frames * batch
    frozen_bytes = 2 if bf16 else 4
    if stage == "distill":  # generator (EMA) + critic trained, teacher frozen
        states = model_states(params, 2, 1, 1, backend, zero_stage, processes, frozen_bytes)
        # generator and critic updates alternate: one of them holds activations at a time
        act = activation_bytes(tokens, dim, layers, checkpointing) * act_bytes
        window = tokens_per_frame * (window_frames or frames) * batch
        kv = kv_cache_bytes(window, dim, layers, 2 if bf16 else 4)
    else:  # one trained model with EMA (init_student also samples its ODE pairs first, with the same weights)
        states = model_states(params, 1, 1, 0, backend, zero_stage, processes, frozen_bytes)
        act = activation_bytes(tokens, dim, layers, checkpointing) * act_bytes
        kv = 0.0
    return MemoryEstimate(**states, activations=act, kv_cache=kv)
