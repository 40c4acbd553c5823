"""Videos from a trained model: the few-step student sampler or a many-step sampler, and preview grids."""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.config import Config
from pipeline.data.sources import class_table
from pipeline.io.media import save_video_grid
from pipeline.diffusion.sampling import Denoiser, few_step_sigmas, generate, generate_few_step
from pipeline.data.sprites import NULL_CLASS, balanced_labels




def sample_student_videos(model, table: torch.Tensor, labels: torch.Tensor, frames: int, size: int,
                          frames_per_chunk: int, student, seed: int, prediction: str = "flow", channels: int = 3,
                          denoising_steps=None, on_chunk=None, batch_size: int = 64,
                          fuse_cache_write: bool = True) -> torch.Tensor:
    """Few-step student samples `[N, F, 3, S, S]` in [-1, 1] for class ids `labels [N]`.

    `student` is the `StudentConfig` (step list, shift, context level, window); `denoising_steps`
    overrides its step list.
    """
    model.eval()
    denoiser = Denoiser(model, "block_causal", frames_per_chunk, prediction, student.clip_x0, rope=student.rope,
                        kv_cache=student.kv_cache)
    sigmas = few_step_sigmas(denoising_steps or student.denoising_steps, student.shift)
    lat = generate_few_step(denoiser, table[labels], (channels, frames, size, size), sigmas, student.context_sigma,
                            seed, batch_size, max_context_frames=student.max_context_frames,
                            sink_frames=student.sink_frames, on_chunk=on_chunk, fuse_cache_write=fuse_cache_write)
    return lat.permute(0, 2, 1, 3, 4).clamp(-1, 1).contiguous()


def sample_videos(model, table: torch.Tensor, labels: torch.Tensor, frames: int, size: int, attention: str,
                  frames_per_chunk: int, sampler, seed: int, prediction: str = "flow", channels: int = 3,
                  on_chunk=None, batch_size: int = 64) -> torch.Tensor:
    """Sample sprites-like videos `[N, F, 3, S, S]` in [-1, 1] for class ids `labels [N]` with a many-step
    `SamplerConfig`."""
    model.eval()
    denoiser = Denoiser(model, attention, frames_per_chunk, prediction, sampler.clip_x0, rope=sampler.rope,
                        kv_cache=sampler.kv_cache)
    cond = table[labels]
    uncond = table[torch.full_like(labels, NULL_CLASS)]
    lat = generate(denoiser, cond, uncond, (channels, frames, size, size), sampler.kind, sampler.steps,
                   sampler.guidance, sampler.shift, sampler.context_sigma, seed, batch_size, lag=sampler.lag,
                   max_context_frames=sampler.max_context_frames, sink_frames=sampler.sink_frames, on_chunk=on_chunk)
    return lat.permute(0, 2, 1, 3, 4).clamp(-1, 1).contiguous()


def preview(cfg: Config, model, path: Path, attention: str = "block_causal", sampler=None, n: int = 12) -> Path:
    """A GIF grid of `n` samples: the many-step `sampler`, or (None) the few-step student sampler."""
    labels = balanced_labels(n)
    if sampler is None:
        videos = sample_student_videos(model, class_table(cfg), labels, cfg.data.frames, cfg.data.size,
                                       cfg.data.frames_per_chunk, cfg.student, cfg.run.seed, cfg.model.prediction)
    else:
        videos = sample_videos(model, class_table(cfg), labels, cfg.data.frames, cfg.data.size, attention,
                               cfg.data.frames_per_chunk, sampler, seed=cfg.run.seed, prediction=cfg.model.prediction)
    return save_video_grid(videos, path)
