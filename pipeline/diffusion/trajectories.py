"""Forward processes as trajectory distributions over per-frame noise levels (seed 000).

The Diffusion-Forcing loss for n frames is a sum of KL terms over denoising trajectories on the
n-cube of per-frame noise levels; each training method is a distribution over the states of those
trajectories, and the L2 loss is taken at states drawn from it:

- `df`  (Diffusion Forcing): every frame (or every chunk) has its own independent level;
- `tf`  (Teacher Forcing): frames left of a chosen chunk are clean, the chunk has one level, later
  frames are excluded (fully noised, weight 0) — the cube's edges walked frame after frame;
- `bid` (synchronous, "bidirectional" training): one level for all frames — the cube's diagonal.

Independent per-frame levels almost never visit the two corners samplers walk through (all frames
equally noisy for synchronous sampling, clean context for autoregressive sampling), so `df` can mix
in a fraction of `tf` and `bid` states (`tf_prob`, `bid_prob`): still the DF objective, with a
trajectory prior that puts mass where sampling goes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pipeline.data import shard
from pipeline.diffusion.flow import sample_sigma

KINDS = ("df", "tf", "bid")


@dataclass
class TrajectoryDistribution:
    """Samples per-frame noise levels `σ [B, F]` and loss weights `[B, F]`.

    Args:
        kind: "df", "tf" or "bid".
        frames_per_chunk: latent frames that share a chunk (the causal unit).
        per_chunk: in `df`, one level per chunk instead of per frame.
        tf_prob, bid_prob: in `df`, fraction of samples drawn as `tf` / `bid` states instead.
        sigma_kind, sigma_mean, sigma_std, sigma_shift: the marginal of each drawn level
            (see `flow.sample_sigma`).
    """

    kind: str = "df"
    frames_per_chunk: int = 1
    per_chunk: bool = False
    tf_prob: float = 0.0
    bid_prob: float = 0.0
    sigma_kind: str = "logit_normal"
    sigma_mean: float = 0.0
    sigma_std: float = 1.0
    sigma_shift: float = 1.0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"unknown trajectory kind {self.kind!r}; expected one of {KINDS}")
        if not 0 <= self.tf_prob + self.bid_prob <= 1:
            raise ValueError("tf_prob + bid_prob must lie in [0, 1]")

    def _levels(self, shape, generator, device):
        return sample_sigma(shape, generator, self.sigma_kind, self.sigma_mean, self.sigma_std,
                            self.sigma_shift, device=device)

    def sample(self, batch: int, frames: int, generator: torch.Generator, device="cpu"):
        """Draw a batch of trajectory states.

        Returns:
            sigma: `[B, F]` noise level of every frame (0 = clean, 1 = pure noise).
            weight: `[B, F]` loss weight per frame (0 for frames a method excludes).
        """
        fpc = self.frames_per_chunk
        if frames % fpc:
            raise ValueError(f"frames ({frames}) must be a multiple of frames_per_chunk ({fpc})")
        chunks = frames // fpc
        # Draw all three kinds for every sample, then pick per sample: the draw order stays fixed.
        if self.per_chunk:
            df = self._levels((batch, chunks), generator, device).repeat_interleave(fpc, dim=1)
        else:
            df = self._levels((batch, frames), generator, device)
        bid = self._levels((batch, 1), generator, device).expand(batch, frames)
        chunk = shard.randint(0, chunks, (batch, 1), generator, device=device)
        frame_chunk = torch.arange(frames, device=device)[None] // fpc
        level = self._levels((batch, 1), generator, device)
        tf = torch.where(frame_chunk < chunk, torch.zeros_like(df), torch.where(frame_chunk == chunk, level, 1.0))
        tf_weight = (frame_chunk == chunk).float()
        ones = torch.ones(batch, frames, device=device)

        if self.kind == "bid":
            return bid.contiguous(), ones
        if self.kind == "tf":
            return tf, tf_weight
        u = shard.rand((batch, 1), generator, device=device)
        use_tf = u < self.tf_prob
        use_bid = (u >= self.tf_prob) & (u < self.tf_prob + self.bid_prob)
        sigma = torch.where(use_tf, tf, torch.where(use_bid, bid, df))
        weight = torch.where(use_tf, tf_weight, ones)
        return sigma, weight
