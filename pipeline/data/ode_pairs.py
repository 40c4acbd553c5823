"""The teacher's ODE trajectories, stored for CausVid's student initialisation.

The teacher samples from noise with its many-step ODE sampler (guidance included); its path is made to
pass exactly through the student's few-step levels (`sampling.schedule_through`) and the states there
are kept with the clean end point. Pairs live in safetensors shards under one folder:

    shard_00000.safetensors   states  [N, K+1, C, F, H, W]  at the student's K levels, then σ=0
                              sigmas  [K+1]                 those levels (last 0)
                              context [N, L, D]             the prompt each pair was sampled with
                              labels  [N]                   class ids (-1 without classes)

Shard i draws its noise from a generator seeded by (seed, i) alone and is written under a temporary
name then renamed, so a crash loses at most the shard in progress and a resumed run writes exactly
the shards an uninterrupted one would have.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from pipeline.data import shard
from pipeline.io.guard import replacing
from pipeline.data.shard_files import shard_path
from pipeline.training.checkpoint import read_safetensors
from pipeline.diffusion.sampling import Denoiser, sample_autoregressive, sample_synchronous

# (first pair index, count) -> (context [n, L, D], labels [n]); the prompts of pairs start..start+n-1.
Conditions = Callable[[int, int], tuple[torch.Tensor, torch.Tensor]]


def _complete(path: Path, sigmas: torch.Tensor, count: int, provenance: dict | None = None) -> bool:
    """Whether a shard on disk is whole and made for these levels and settings; raises if it was made for
    others (shards of an older version carry no provenance: only their levels are checked)."""
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            stored = f.get_tensor("sigmas")
            n = f.get_slice("states").get_shape()[0]
            made_with = json.loads((f.metadata() or {}).get("provenance", "null"))
    except Exception:  # a torn write from outside the atomic rename: make it again
        return False
    if stored.shape != sigmas.shape or not torch.allclose(stored, sigmas.float(), atol=1e-6):
        raise ValueError(f"{path} holds ODE states at levels {stored.tolist()}, the config asks for "
                         f"{sigmas.tolist()}; rerun the stage with --force")
    if made_with is not None and provenance is not None:
        now = json.loads(json.dumps(provenance))
        diff = [k for k in sorted(set(made_with) | set(now)) if made_with.get(k) != now.get(k)]
        if diff:
            k = diff[0]
            raise ValueError(f"{path} was made with {k}={json.dumps(made_with.get(k))}, the run now has "
                             f"{json.dumps(now.get(k))}; rerun the stage with --force (the old folder is moved aside)")
    return n == count


def pairs_missing(folder: str | Path, num_pairs: int, shard_size: int, student_sigmas: torch.Tensor,
                  provenance: dict | None = None) -> bool:
    """Whether some shard of `write_ode_pairs(folder, ...)` with these settings is not (whole) on disk."""
    keep = torch.cat([student_sigmas.float(), torch.zeros(1)])
    return not all(_complete(shard_path(folder, i), keep, min(shard_size, num_pairs - s), provenance)
                   for i, s in enumerate(range(0, num_pairs, shard_size)))


@torch.no_grad()
def write_ode_pairs(folder: str | Path, teacher: Denoiser, conditions: Conditions, uncond: torch.Tensor | None,
                    num_pairs: int, shard_size: int, latent_shape: tuple, student_sigmas: torch.Tensor, sampler,
                    seed: int, device="cpu", rank: int = 0, world: int = 1, batch_size: int | None = None,
                    provenance: dict | None = None) -> list[Path]:
    """Sample `num_pairs` teacher ODE trajectories into shards, skipping shards already on disk.

    With `world` processes, process `rank` makes shards `rank, rank + world, ...` (a shard's noise
    depends on its index only, so the shards are the same whatever the process count); the caller
    waits for all processes before reading them.

    Args:
        teacher: the teacher's denoiser (its attention, `clip_x0`).
        conditions: gives the prompts of a range of pairs (see `Conditions`).
        uncond: `[1, L, D]` null prompt for guidance (None: no guidance).
        latent_shape: `(C, F, H, W)` of one video.
        student_sigmas: `[K]` the student's levels (decreasing, first usually 1).
        sampler: the teacher's `SamplerConfig` (kind, steps, shift, guidance, lag, window).
        seed: base seed; shard i uses `seed * 1_000_003 + i`.
        batch_size: videos sampled at once (None: the whole shard); a sampler that re-noises its context
            (`context_sigma` > 0) draws in another order with another value.
        provenance: JSON-able record of what made the pairs (teacher, sampler, levels, seed), stored in each
            shard's metadata; a shard on disk made with another record is refused, never reused.
    Returns:
        the shard paths, in order.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    keep = torch.cat([student_sigmas.float(), torch.zeros(1)])
    counts = [min(shard_size, num_pairs - s) for s in range(0, num_pairs, shard_size)]
    paths = [shard_path(folder, i) for i in range(len(counts))]
    todo = [i for i, (p, n) in enumerate(zip(paths, counts))
            if i % world == rank and not _complete(p, keep, n, provenance)]
    for i in tqdm(todo, desc="ODE pairs (shards)", disable=not todo or rank != 0):
        gen = torch.Generator().manual_seed(seed * 1_000_003 + i)
        context, labels = conditions(i * shard_size, counts[i])
        noise = torch.randn((counts[i], *latent_shape), generator=gen)
        parts, step = [], batch_size or counts[i]
        for j in range(0, counts[i], step):  # the shard's videos in batches: the KV cache of `step` videos
            sl = slice(j, j + step)
            null = None if uncond is None else uncond.expand(len(noise[sl]), *uncond.shape[1:]).to(device)
            if sampler.kind == "synchronous":
                _, states = sample_synchronous(teacher, noise[sl].to(device), context[sl].to(device), null,
                                               steps=sampler.steps, guidance=sampler.guidance, shift=sampler.shift,
                                               keep_sigmas=keep)
            else:
                _, states = sample_autoregressive(
                    teacher, noise[sl].to(device), context[sl].to(device), null, steps=sampler.steps,
                    guidance=sampler.guidance, shift=sampler.shift, context_sigma=sampler.context_sigma, generator=gen,
                    lag=sampler.lag, max_context_frames=sampler.max_context_frames, sink_frames=sampler.sink_frames,
                    keep_sigmas=keep)
            parts.append(states.cpu())
        states = torch.cat(parts, dim=1)
        with replacing(paths[i]) as tmp:
            save_file({"states": states.transpose(0, 1).float().cpu().contiguous(), "sigmas": keep,
                       "context": context.float().cpu().contiguous(), "labels": labels.long().cpu()}, str(tmp),
                      metadata=None if provenance is None else {"provenance": json.dumps(provenance, sort_keys=True)})
    return paths


class OdePairs:
    """All shards of a folder in memory, drawn in random batches (the caller's generator: resumable).

    Attributes:
        states: `[N, K+1, C, F, H, W]`; sigmas: `[K+1]`; context: `[N, L, D]`; labels: `[N]`.
    """

    def __init__(self, folder: str | Path, paths: list[Path] | None = None):
        """All shards of `folder`, or exactly `paths` (the ones `write_ode_pairs` made: no leftovers of a run
        that asked for more pairs)."""
        shards = list(paths) if paths is not None else sorted(Path(folder).glob("shard_*.safetensors"))
        if not shards:
            raise FileNotFoundError(f"no ODE-pair shards (shard_*.safetensors) in {folder}")
        parts = [read_safetensors(p) for p in shards]
        for p, part in zip(shards, parts):
            if not {"states", "sigmas", "context", "labels"} <= part.keys():
                raise ValueError(f"{p}: an ODE-pair shard needs states, sigmas, context and labels")
        self.states = torch.cat([p["states"] for p in parts])
        self.context = torch.cat([p["context"] for p in parts])
        self.labels = torch.cat([p["labels"] for p in parts])
        self.sigmas = parts[0]["sigmas"]

    def __len__(self) -> int:
        return len(self.states)

    def next_batch(self, n: int, generator: torch.Generator, device="cpu") -> dict[str, torch.Tensor]:
        """`{"states": [n, K+1, C, F, H, W], "context": [n, L, D], "labels": [n]}`, drawn with replacement."""
        idx = shard.randint(0, len(self), (n,), generator)
        return {"states": self.states[idx].to(device), "context": self.context[idx].to(device),
                "labels": self.labels[idx]}
