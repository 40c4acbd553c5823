"""Videos from a trained model: the one sampling entry point (`sample_latents`; `sample_videos` for class-conditioned
sprites models), which picks the sampler from the model's recorded role, and preview grids.

A student (`pipeline.models.loading.is_student`) samples with the few-step chunk-wise sampler of its `student`
section; a teacher with the many-step `sampler` section under its `attention`. `few_step=True` runs a teacher
through the student's sampler (evaluate's no-distillation baseline; the few-step training previews).
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.config import Config, SamplerConfig, StudentConfig
from pipeline.data.sources import class_table
from pipeline.data.sprites import NULL_CLASS, balanced_labels
from pipeline.diffusion.sampling import Denoiser, few_step_sigmas, generate, generate_few_step
from pipeline.io.media import save_video_grid
from pipeline.models.loading import is_student


def sample_latents(model, cond: torch.Tensor, *, shape: tuple, frames_per_chunk: int, prediction: str,
                   student: StudentConfig | None = None, sampler: SamplerConfig | None = None,
                   attention: str = "block_causal", uncond: torch.Tensor | None = None, seed: int = 0,
                   batch_size: int = 64, few_step: bool | None = None, denoising_steps=None, on_chunk=None,
                   fuse_cache_write: bool = True, switches=(), recache: bool = False,
                   rolling: bool = False) -> torch.Tensor:
    """Latents `[N, C, F, H, W]` of `model` for prompt embeddings `cond [N, L, D]`, noise seeded by `seed`.

    Args:
        shape: `(C, F, H, W)` of one video; F a multiple of `frames_per_chunk`.
        prediction: what the network outputs ("flow" or "x0", `model.prediction`).
        student: the few-step sampler (`StudentConfig`): its steps (`denoising_steps` replaces the list),
            shift, context level, KV window.
        sampler, attention, uncond: the many-step sampler (`SamplerConfig`), the teacher's attention, and
            the null prompt's embeddings `[N, L, D]` it guides against.
        few_step: which sampler; None: the model's recorded role (a student → few-step, a teacher → many-step).
        on_chunk: `on_chunk(index, chunk [b, C, fpc, H, W])` per finished chunk (index restarts per batch).
        fuse_cache_write: few-step only (see `sampling.few_step_rollout`).
        switches, recache: prompt switches `[(K, cond_K [N, L, D]), ...]` and whether the KV window is rebuilt
            under the new prompt (`sampling.few_step_rollout`, `sampling.sample_autoregressive`).
        rolling: few-step only: rolling-window joint denoising (`sampling.sample_rolling`).
    """
    model.eval()
    if is_student(model) if few_step is None else few_step:
        if student is None:
            raise ValueError("the few-step sampler needs the student section (student=)")
        den = Denoiser.of_sampler(model, "block_causal", frames_per_chunk, prediction, student)
        sigmas = few_step_sigmas(denoising_steps or student.denoising_steps, student.shift)
        return generate_few_step(den, cond, shape, sigmas, context_sigma=student.context_sigma, seed=seed,
                                 batch_size=batch_size, max_context_frames=student.max_context_frames,
                                 sink_frames=student.sink_frames, on_chunk=on_chunk,
                                 fuse_cache_write=fuse_cache_write, switches=switches, recache=recache,
                                 rolling=rolling)
    if rolling:
        raise ValueError("the rolling-window sampler is a few-step (student) sampler")
    if sampler is None:
        raise ValueError("the many-step sampler needs the teacher's sampler section (sampler=)")
    den = Denoiser.of_sampler(model, attention, frames_per_chunk, prediction, sampler)
    return generate(den, cond, uncond, shape, kind=sampler.kind, steps=sampler.steps, guidance=sampler.guidance,
                    shift=sampler.shift, context_sigma=sampler.context_sigma, seed=seed, batch_size=batch_size,
                    lag=sampler.lag, max_context_frames=sampler.max_context_frames, sink_frames=sampler.sink_frames,
                    on_chunk=on_chunk, switches=switches, recache=recache)


def sample_videos(model, table: torch.Tensor, labels: torch.Tensor, *, frames: int, size: int, frames_per_chunk: int,
                  prediction: str, student: StudentConfig | None = None, sampler: SamplerConfig | None = None,
                  attention: str = "block_causal", seed: int = 0, channels: int = 3, batch_size: int = 64,
                  few_step: bool | None = None, denoising_steps=None, on_chunk=None,
                  fuse_cache_write: bool = True, recache: bool = False, rolling: bool = False) -> torch.Tensor:
    """Sprites-like videos `[N, F, 3, S, S]` in [-1, 1] for class ids `labels [N]` (their rows of the class
    `table [K+1, L, D]`; the null class guides the many-step sampler), or for a class schedule `labels [N, F]`
    (switched videos, SPRITES.md: the prompt switches at every frame where a video's class changes, from the
    first chunk starting there; `recache` rebuilds the KV window under the new class). Other arguments as
    `sample_latents`."""
    few = is_student(model) if few_step is None else few_step
    labels, switches = class_switches(table, labels, frames)
    uncond = None if few else table[torch.full_like(labels, NULL_CLASS)]
    lat = sample_latents(model, table[labels], shape=(channels, frames, size, size), frames_per_chunk=frames_per_chunk,
                         prediction=prediction, student=student, sampler=sampler, attention=attention, uncond=uncond,
                         seed=seed, batch_size=batch_size, few_step=few, denoising_steps=denoising_steps,
                         on_chunk=on_chunk, fuse_cache_write=fuse_cache_write, switches=switches, recache=recache,
                         rolling=rolling)
    return lat.permute(0, 2, 1, 3, 4).clamp(-1, 1).contiguous()


def class_switches(table: torch.Tensor, labels: torch.Tensor, frames: int) -> tuple[torch.Tensor, list]:
    """Class ids `labels [N]`, or a class schedule `[N, frames]`, as the first class of every video `[N]` and the
    prompt switches `[(K, table rows [N, L, D]), ...]` at every frame K where some video's class changes
    (`sampling.prompt_at`: from the first chunk starting there). Shared by `sample_videos` and `CausalWanPipeline`."""
    if labels.ndim != 2:
        return labels, []
    if labels.shape[1] != frames:
        raise ValueError(f"a class schedule must be [N, frames={frames}], got {list(labels.shape)}")
    changes = (labels[:, 1:] != labels[:, :-1]).any(0).nonzero().flatten().tolist()
    return labels[:, 0], [(k + 1, table[labels[:, k + 1]]) for k in changes]


def preview(cfg: Config, model, path: Path, attention: str = "block_causal", sampler=None, n: int = 12) -> Path:
    """A GIF grid of `n` samples: the many-step `sampler`, or (None) the few-step student sampler."""
    videos = sample_videos(model, class_table(cfg), balanced_labels(n), frames=cfg.data.frames, size=cfg.data.size,
                           frames_per_chunk=cfg.data.frames_per_chunk, prediction=cfg.model.prediction,
                           student=cfg.student, sampler=sampler, attention=attention, seed=cfg.run.seed,
                           few_step=sampler is None)
    return save_video_grid(videos, path)
