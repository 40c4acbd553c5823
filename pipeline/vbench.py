"""Generated videos in the layout VBench reads, so text-conditioned models can be scored with VBench
(not installed here).

VBench's prompt suite asks for `<out>/<prompt>-<index>.mp4`, `index` = 0, 1, ... per prompt (5 samples
per prompt in its standard protocol), one folder per model (and per dimension, if sampling per
dimension). Prompt file names longer than 180 characters are cut to 180, as VBench-2.0 does; a `/`
(which cannot be in a file name) becomes `_`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .media import save_video_grid

MAX_NAME = 180


def vbench_name(prompt: str, index: int) -> str:
    """File name of sample `index` of `prompt`: `<prompt[:180]>-<index>.mp4`."""
    if index < 0:
        raise ValueError(f"sample index must be >= 0, got {index}")
    return f"{prompt.replace('/', '_')[:MAX_NAME]}-{index}.mp4"


def write_vbench_videos(out: str | Path, videos: torch.Tensor, prompts: list[str], indices: list[int],
                        fps: int = 16) -> list[Path]:
    """Write one MP4 per video: `videos [N, F, 3, H, W]` in [-1, 1], `prompts [N]`, `indices [N]`
    (the sample number of each video within its prompt). Refuses to overwrite a file written earlier in
    the same call (two videos with the same prompt and index). Returns the paths in order."""
    if videos.dim() != 5 or videos.shape[2] != 3:
        raise ValueError(f"videos must be [N, F, 3, H, W], got {list(videos.shape)}")
    if not len(videos) == len(prompts) == len(indices):
        raise ValueError(f"need one prompt and index per video, got {len(videos)} videos, {len(prompts)} prompts, "
                         f"{len(indices)} indices")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / vbench_name(p, int(i)) for p, i in zip(prompts, indices)]
    if len(set(paths)) != len(paths):
        raise ValueError("two videos map to the same VBench file name (same prompt and index)")
    for v, path in zip(videos, paths):
        save_video_grid(v[None], path, fps=fps, scale=1, pad=0)
    return paths
