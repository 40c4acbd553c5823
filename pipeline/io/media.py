"""Previews: video grids as GIF/MP4 and PNG plots."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.io.guard import replacing


def video_grid(videos: torch.Tensor, cols: int | None = None, scale: int = 4, pad: int = 1) -> np.ndarray:
    """Tile videos `[N, F, 3, S, S]` in [-1, 1] into frames `[F, H, W, 3]` uint8 (nearest upscaling)."""
    n, f, _, s, _ = videos.shape
    cols = cols or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    img = ((videos.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    img = img.repeat_interleave(scale, dim=3).repeat_interleave(scale, dim=4)
    cell = s * scale + pad
    grid = torch.full((f, 3, rows * cell + pad, cols * cell + pad), 255, dtype=torch.uint8)
    for i in range(n):
        r, c = divmod(i, cols)
        grid[:, :, pad + r * cell: pad + r * cell + s * scale, pad + c * cell: pad + c * cell + s * scale] = img[i]
    return grid.permute(0, 2, 3, 1).numpy()


def save_video_grid(videos: torch.Tensor, path: str | Path, fps: int = 6, force: bool = True, **kw) -> Path:
    """Write a GIF or MP4 (by suffix) preview of videos `[N, F, 3, S, S]` (under a temporary name, then
    renamed; an existing file is replaced only with `force`, see `pipeline.io.guard.replacing`)."""
    import imageio.v3 as iio

    path = Path(path)
    frames = video_grid(videos, **kw)
    with replacing(path, force, "preview") as tmp:
        if path.suffix == ".gif":
            iio.imwrite(tmp, frames, duration=1000 / fps, loop=0, extension=".gif")
        else:  # mp4 through imageio-ffmpeg (libx264 needs even sizes: padded)
            import imageio.v2 as iio2

            iio2.mimwrite(tmp, list(frames), fps=fps, macro_block_size=2)
    return path


def save_curves(path: str | Path, x, curves: dict[str, list], xlabel: str, ylabel: str, title: str = "") -> Path:
    """Line plot of named curves against x, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, ys in curves.items():
        ax.plot(x[: len(ys)], ys, marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with replacing(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return Path(path)


def save_samples(path: str | Path, videos: torch.Tensor, labels: torch.Tensor, preview: int = 36,
                 force: bool = True, schedule: torch.Tensor | None = None) -> Path:
    """A samples file (INTERFACE.md: `videos [N, F, 3, S, S]` float32 in [-1, 1], `labels [N]` int64; switched
    videos also `schedule [N, F]` int64, the class of every frame) and a GIF grid of its first `preview` videos
    next to it; returns the GIF's path. Both are written under temporary names and renamed; existing ones are
    replaced only with `force`."""
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {"videos": videos.float().contiguous(), "labels": labels.long().contiguous()}
    if schedule is not None:
        tensors["schedule"] = schedule.long().contiguous()
    with replacing(path, force, "--out") as tmp:
        save_file(tensors, str(tmp))
    return save_video_grid(videos[:preview], path.with_suffix(".gif"), force=force)
