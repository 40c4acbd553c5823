"""Captioned video files for prepare_data: a folder of `.mp4` / `.gif` videos, each captioned by the same-named
`.txt` file beside it, read into `[3, frames, H, W]` clips in [-1, 1]."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

VIDEO_SUFFIXES = (".mp4", ".gif")


def list_videos(folder: str | Path) -> list[tuple[Path, str]]:
    """`(video, caption)` for every video of `folder`, sorted by name; captions from `<stem>.txt`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"data.videos: local path not found: {folder}")
    videos = sorted(p for p in folder.iterdir() if p.suffix.lower() in VIDEO_SUFFIXES)
    if not videos:
        raise FileNotFoundError(f"data.videos: no .mp4 or .gif files in {folder}")
    out = []
    for v in videos:
        cap = v.with_suffix(".txt")
        if not cap.is_file():
            raise FileNotFoundError(f"{v.name}: caption file {cap} is missing (one .txt per video, same name)")
        out.append((v, " ".join(cap.read_text().split())))
    return out


def load_video(path: Path, size: tuple[int, int], frames: int) -> torch.Tensor:
    """The first `frames` frames of a video as `[3, frames, H, W]` float32 in [-1, 1], resized so it
    covers `size` (aspect kept) and centre-cropped to it."""
    import imageio.v3 as iio

    try:
        arr = iio.imread(path, index=None)  # [T, H, W, C] (a GIF: pillow; an MP4: imageio-ffmpeg)
    except Exception as e:  # decoders raise many types
        raise ValueError(f"{path}: cannot read video ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
    if arr.ndim == 3:  # grey frames
        arr = arr[..., None].repeat(3, axis=-1)
    if arr.ndim != 4 or len(arr) < frames:
        raise ValueError(f"{path}: has {len(arr) if arr.ndim >= 3 else 0} frames, data.pixel_frames needs {frames}")
    x = torch.from_numpy(arr[:frames, ..., :3].copy()).permute(0, 3, 1, 2).float()  # [T, 3, h, w]
    h, w = x.shape[-2:]
    scale = max(size[0] / h, size[1] / w)
    rh, rw = max(size[0], round(h * scale)), max(size[1], round(w * scale))
    if (rh, rw) != (h, w):
        x = F.interpolate(x, size=(rh, rw), mode="bilinear", antialias=True, align_corners=False)
    top, left = (rh - size[0]) // 2, (rw - size[1]) // 2
    x = x[:, :, top:top + size[0], left:left + size[1]]
    return (x / 127.5 - 1).clamp(-1, 1).permute(1, 0, 2, 3).contiguous()
