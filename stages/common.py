"""What every stage shares: command-line parsing, the accelerator, previews."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration

from pipeline.checkpoint import CheckpointError
from pipeline.config import Config, ConfigError, load_config
from pipeline.data import class_table
from pipeline.media import save_video_grid
from pipeline.sampling import Denoiser, generate
from pipeline.sprites import NULL_CLASS, balanced_labels


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite."""


# Errors that are the user's to fix: reported as one line and a non-zero exit, never a traceback.
USER_ERRORS = (ConfigError, CheckpointError, FileNotFoundError, ValueError, NonFiniteLoss)


def make_accelerator(cfg: Config, stage_path: Path, grad_accum: int = 1) -> Accelerator:
    """An `Accelerator` logging TensorBoard scalars under `<stage>/logs`; bf16 where supported."""
    cpu = cfg.run.device == "cpu" or not torch.cuda.is_available()
    mp = cfg.run.mixed_precision
    if mp == "auto":
        mp = "bf16" if (not cpu and torch.cuda.is_bf16_supported()) else "no"
    return Accelerator(cpu=cpu, mixed_precision=mp, gradient_accumulation_steps=grad_accum, log_with="tensorboard",
                       project_config=ProjectConfiguration(project_dir=str(stage_path), logging_dir=str(stage_path)))


def sample_videos(model, table: torch.Tensor, labels: torch.Tensor, frames: int, size: int, attention: str,
                  frames_per_chunk: int, sampler, seed: int, prediction: str = "flow", channels: int = 3) -> torch.Tensor:
    """Sample sprites-like videos `[N, F, 3, S, S]` in [-1, 1] for class ids `labels [N]`."""
    model.eval()
    denoiser = Denoiser(model, attention, frames_per_chunk, prediction, sampler.clip_x0)
    cond = table[labels]
    uncond = table[torch.full_like(labels, NULL_CLASS)]
    lat = generate(denoiser, cond, uncond, (channels, frames, size, size), sampler.kind, sampler.steps,
                   sampler.guidance, sampler.shift, sampler.context_sigma, seed, lag=sampler.lag,
                   max_context_frames=sampler.max_context_frames, sink_frames=sampler.sink_frames)
    return lat.permute(0, 2, 1, 3, 4).clamp(-1, 1).contiguous()


def preview(cfg: Config, model, path: Path, attention: str, sampler, n: int = 12) -> Path:
    labels = balanced_labels(n)
    videos = sample_videos(model, class_table(cfg), labels, cfg.data.frames, cfg.data.size, attention,
                           cfg.data.frames_per_chunk, sampler, seed=cfg.run.seed, prediction=cfg.model.prediction)
    return save_video_grid(videos, path)


def parse_with_overrides(ap: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse flags anywhere on the line; every leftover `key=value` joins `args.overrides`."""
    args, rest = ap.parse_known_args(argv)
    bad = [r for r in rest if r.startswith("-")]
    if bad:
        ap.error(f"unrecognized arguments: {' '.join(bad)}")
    args.overrides += rest
    return args


def stage_main(stage: str, run, argv=None) -> int:
    """`python -m stages.<stage> --config CONFIG [--force] [key=value ...]`."""
    ap = argparse.ArgumentParser(prog=f"python -m stages.{stage}")
    ap.add_argument("--config", required=True)
    ap.add_argument("--force", action="store_true", help="rerun even if the stage is done")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parse_with_overrides(ap, argv)
    try:
        cfg = load_config(args.config, args.overrides)
        run(cfg, force=args.force)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
