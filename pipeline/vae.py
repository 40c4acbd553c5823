"""The frozen VAE of the real-scale path: diffusers' `AutoencoderKLWan` from a LOCAL folder.

Latents are normalised per channel with the VAE config's `latents_mean` / `latents_std`, the exact inverse
of what diffusers' `WanPipeline.__call__` does before decoding (diffusers 0.42,
`diffusers/pipelines/wan/pipeline_wan.py`):

    latents = latents / (1 / latents_std) + latents_mean      # pipeline, before vae.decode

so `encode` returns `(mode(q(z|x)) - latents_mean) / latents_std` (the posterior's mode, deterministic)
and `decode` undoes it before `vae.decode`. Wan's VAE compresses 4x in time (first frame kept:
T pixel frames -> 1 + (T - 1) / 4 latent frames) and 8x in space.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .text_encoder import DTYPES, resolve_component, resolve_device


class WanVAE:
    """Encode videos `[B, 3, T, H, W]` in [-1, 1] to normalised latents `[B, z, F, H/8, W/8]` and back."""

    def __init__(self, path: str | Path, dtype: str = "fp32", device: str | torch.device = "cpu"):
        from diffusers import AutoencoderKLWan

        folder = resolve_component(path, "vae", "components.vae")
        self.vae = AutoencoderKLWan.from_pretrained(folder, torch_dtype=DTYPES[dtype],
                                                    local_files_only=True).eval().requires_grad_(False)
        self.device, self.dtype = torch.device(device), DTYPES[dtype]
        self.vae.to(self.device)
        c = self.vae.config
        self.z_dim = c.z_dim
        self.scale_temporal, self.scale_spatial = c.scale_factor_temporal, c.scale_factor_spatial
        self.mean = torch.tensor(c.latents_mean, dtype=torch.float32).view(1, c.z_dim, 1, 1, 1)
        self.std = torch.tensor(c.latents_std, dtype=torch.float32).view(1, c.z_dim, 1, 1, 1)

    @classmethod
    def from_config(cls, cfg) -> "WanVAE":
        c = cfg.components
        return cls(c.vae, c.vae_dtype, resolve_device(c.device))

    def latent_frames(self, pixel_frames: int) -> int:
        """Latent frames of a `pixel_frames`-frame video (which must be 1 + a multiple of the stride)."""
        if (pixel_frames - 1) % self.scale_temporal:
            raise ValueError(f"data.pixel_frames ({pixel_frames}) must be 1 + a multiple of {self.scale_temporal} "
                             "for this VAE")
        return 1 + (pixel_frames - 1) // self.scale_temporal

    @torch.no_grad()
    def encode(self, videos: torch.Tensor) -> torch.Tensor:
        """Normalised latents `[B, z, F, h, w]` float32 (CPU) of videos `[B, 3, T, H, W]` in [-1, 1]:
        the posterior's mode, so encoding is deterministic."""
        x = videos.to(self.device, self.dtype)
        z = self.vae.encode(x).latent_dist.mode().float().cpu()
        return (z - self.mean) / self.std

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Videos `[B, 3, T, H, W]` float32 (CPU) in [-1, 1] of normalised latents `[B, z, F, h, w]`."""
        z = latents.float().cpu() * self.std + self.mean
        out = self.vae.decode(z.to(self.device, self.dtype)).sample
        return out.float().cpu().clamp(-1, 1)
