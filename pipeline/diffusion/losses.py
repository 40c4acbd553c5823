"""Training losses, one function per equation (seed 002's landscape: methods × losses).

- `flow_matching_loss` (teacher, seed 000): per-frame L2 to the flow `ε - x0` under a trajectory
  distribution of noise levels.
- `ode_regression_loss` (CausVid's student initialisation): L2 from the student's clean prediction
  at a stored ODE state to the teacher's ODE end point.
"""

from __future__ import annotations

import torch

from pipeline.data import shard
from pipeline.diffusion.flow import add_noise, flow_target
from pipeline.diffusion.sampling import Denoiser


def flow_matching_loss(denoiser: Denoiser, x0, context, sigma, weight, noise, norm: torch.Tensor | None = None):
    """Weighted per-frame L2 in the space the network predicts (flow `ε - x0`, or x0; the two differ
    by a per-level weight `1/σ²`).

        loss = Σ_f w_f · mean((v_θ(x_σ, σ, prompt) - (ε - x0))²)_f / Σ_f w_f,   x_σ = (1-σ)x0 + σε

    Args:
        x0, noise: `[B, C, F, H, W]`.
        context: `[B, L, D]` prompt embeddings.
        sigma, weight: `[B, F]` per-frame levels and loss weights (a trajectory distribution's draw).
        norm: the denominator (default: this batch's weight sum). With several processes, pass the mean
            over processes of their sums, so that the averaged gradient is the global batch's.
    Returns:
        scalar loss.
    """
    pred = denoiser.raw(add_noise(x0, noise, sigma), sigma, context)
    target = x0 if denoiser.prediction == "x0" else flow_target(x0, noise)
    per_frame = (pred.float() - target.float()).pow(2).mean(dim=(1, 3, 4))  # [B, F]
    return (per_frame * weight).sum() / (weight.sum() if norm is None else norm).clamp_min(1e-8)


def pick_ode_states(states: torch.Tensor, sigmas: torch.Tensor, frames_per_chunk: int,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """CausVid's input draw: per chunk, a random entry of the stored path, the clean end included.

    A chunk drawn at the clean entry (σ = 0) serves as clean context for later chunks, as a KV cache
    does at inference, and is left out of the loss (`ode_regression_loss`).

    Args:
        states: `[B, K+1, C, F, H, W]` ODE states at the student's K levels, then the clean end point.
        sigmas: `[K+1]` their levels (the last is 0).
    Returns:
        x `[B, C, F, H, W]` (each chunk taken from its drawn step) and σ `[B, F]`.
    """
    b, k1, _, f = states.shape[:4]
    k = shard.randint(0, k1, (b, f // frames_per_chunk), generator)
    k = k.repeat_interleave(frames_per_chunk, dim=1).to(states.device)  # [B, F]
    index = k[:, None, None, :, None, None].expand(b, 1, *states.shape[2:])
    return states.gather(1, index).squeeze(1), sigmas.to(states.device)[k]


def ode_regression_loss(denoiser: Denoiser, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor,
                        x0: torch.Tensor, norm: torch.Tensor | None = None) -> torch.Tensor:
    """CausVid's regression: `mean((G_θ(x_σ, σ, prompt) - x0_teacher)²)` over frames with σ > 0,
    `G_θ` the student's x̂0 (clean frames are context only).

    Args:
        x: `[B, C, F, H, W]` teacher ODE states (per-chunk levels, see `pick_ode_states`).
        sigma: `[B, F]` their levels.
        context: `[B, L, D]` the prompt the teacher sampled with.
        x0: `[B, C, F, H, W]` the teacher's ODE end point from the same noise.
        norm: the denominator (default: this batch's count of noisy frames). With several processes, pass the mean
            over processes of their sums, so that the averaged gradient is the global batch's.
    Returns:
        scalar loss.
    """
    pred = denoiser.predict_x0(x, sigma, context)
    per_frame = (pred.float() - x0.float()).pow(2).mean(dim=(1, 3, 4))  # [B, F]
    noisy = (sigma > 0).float()
    return (per_frame * noisy).sum() / (noisy.sum() if norm is None else norm).clamp_min(1.0)
