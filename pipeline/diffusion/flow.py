"""Flow-matching math in Wan's convention, the timestep shift, and the noise-level distribution.

Convention (rectified flow, as Wan2.1): for clean latents `x0`, noise `ε ~ N(0, I)` and noise level
`σ ∈ [0, 1]` (per frame),

    x_σ = (1 - σ)·x0 + σ·ε,        the model predicts the flow  v = dx_σ/dσ = ε - x0.

The model's timestep input is `1000·σ` (Wan's `num_train_timesteps`). Tensors are in the model's
layout `[B, C, F, H, W]`; noise levels are per frame, `[B, F]`.
"""

from __future__ import annotations

import torch

from pipeline.data import shard

NUM_TRAIN_TIMESTEPS = 1000


def per_frame(sigma: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast `σ [B, F]` (or `[B]`) against latents `[B, C, F, H, W]` → `[B, 1, F, 1, 1]`."""
    if sigma.ndim == 1:
        sigma = sigma[:, None].expand(like.shape[0], like.shape[2])
    return sigma[:, None, :, None, None].to(like.dtype)


def add_noise(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Forward process `x_σ = (1 - σ)·x0 + σ·ε`.  Shapes: `[B, C, F, H, W]`, σ `[B, F]`."""
    s = per_frame(sigma, x0)
    return (1 - s) * x0 + s * noise


def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Regression target of the flow-matching (L2) loss: `v = ε - x0`."""
    return noise - x0


def x0_from_flow(x_t: torch.Tensor, flow: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """`x0 = x_σ - σ·v`."""
    return x_t - per_frame(sigma, x_t) * flow


def noise_from_flow(x_t: torch.Tensor, flow: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """`ε = x_σ + (1 - σ)·v`."""
    return x_t + (1 - per_frame(sigma, x_t)) * flow


def flow_from_x0(x_t: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """`v = (x_σ - x0) / σ` (undefined at σ = 0; clamp σ away from 0 before calling)."""
    return (x_t - x0) / per_frame(sigma, x_t)


def shift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """Timestep shift `σ' = s·σ / (1 + (s - 1)·σ)`; `s > 1` spends more of a schedule at high noise."""
    return shift * sigma / (1 + (shift - 1) * sigma)


def timestep_from_sigma(sigma: torch.Tensor) -> torch.Tensor:
    """Wan's timestep input `t = 1000·σ`."""
    return sigma * NUM_TRAIN_TIMESTEPS


def sample_sigma(shape, generator: torch.Generator, kind: str = "logit_normal", mean: float = 0.0,
                 std: float = 1.0, shift: float = 1.0, device="cpu") -> torch.Tensor:
    """Draw training noise levels.

    Args:
        shape: output shape, e.g. `(B, F)`.
        kind: "logit_normal" (`σ = sigmoid(N(mean, std²))`, SD3) or "uniform" (`σ ~ U(0, 1)`).
        shift: timestep shift applied after drawing (1 = none).
    Returns:
        σ of the given shape, in (0, 1).
    """
    if kind == "logit_normal":
        sigma = torch.sigmoid(mean + std * shard.randn(shape, generator, device=device))
    elif kind == "uniform":
        sigma = shard.rand(shape, generator, device=device)
    else:
        raise ValueError(f"unknown sigma distribution {kind!r} (logit_normal, uniform)")
    return shift_sigma(sigma, shift) if shift != 1.0 else sigma


def sampling_sigmas(steps: int, shift: float = 1.0) -> torch.Tensor:
    """Euler schedule `[steps + 1]` from σ=1 down to σ=0, linear in σ before the shift."""
    sigmas = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    return shift_sigma(sigmas, shift).float()
