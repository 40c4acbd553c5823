"""Quality metrics of generated sprites videos: the checker's rules, mode balance, drift and a Fréchet
distance, all from one samples file (`videos [N, F, 3, S, S]`, `labels [N]`).

- `mode_balance_tv`: per class, the total-variation distance between the distribution of motion modes
  its videos show and the uniform one, `TV = ½·Σ_m |p(m) − ¼|` (0 = balanced; 0.75 = a single mode,
  also used for a class none of whose videos has a readable mode), averaged over the classes. L2
  (forward KL) training should cover the modes; DMD (reverse KL) may collapse onto some (seed 002).
- `drift_slope`: least-squares slope of the valid-frame fraction against the frame index, per frame
  (0 = no drift; negative = quality decays along the rollout).
- `video_features` / `frechet_distance`: a Fréchet distance between Gaussians fitted to 16 hand-made
  features per video (below), generated vs real videos of the same length. It is deterministic: the
  features have no learned part and the real videos come from a seeded stream.
"""

from __future__ import annotations

import torch

from pipeline.evaluation.checker import predict_classes, score
from pipeline.data.sprites import NUM_MODES

FEATURES = ("mean_red", "mean_green", "mean_blue", "ink", "centre_x", "centre_y", "spread_x", "spread_y",
            "centre_std_x", "centre_std_y", "speed_x", "speed_y", "accel_x", "accel_y", "start_vx", "start_vy")


def mode_balance_tv(histogram) -> float:
    """Mean over classes of the TV distance from uniform of the class's mode counts `[classes, modes]`."""
    h = torch.as_tensor(histogram, dtype=torch.float64)
    total = h.sum(1, keepdim=True)
    p = h / total.clamp_min(1)
    tv = 0.5 * (p - 1 / NUM_MODES).abs().sum(1)
    tv = torch.where(total[:, 0] > 0, tv, torch.full_like(tv, 1 - 1 / NUM_MODES))
    return float(tv.mean())


def drift_slope(per_frame: list[float]) -> float:
    """Least-squares slope of a per-frame curve against the frame index (per frame)."""
    y = torch.tensor(per_frame, dtype=torch.float64)
    if len(y) < 2:
        return 0.0
    x = torch.arange(len(y), dtype=torch.float64)
    x = x - x.mean()
    return float((x * (y - y.mean())).sum() / (x * x).sum())


def video_features(videos: torch.Tensor) -> torch.Tensor:
    """Features `[N, 16]` (names in `FEATURES`) of videos `[N, F, 3, S, S]` in [-1, 1], F >= 3.

    On intensities `a = (v + 1)/2` with ink `w = mean over channels of a` per pixel: per frame the
    mean of each channel, the total ink, the ink-weighted centre (x, y) and spread (std x, y), in
    pixels / S; averaged over frames. Then the motion of the centre: its std over frames, mean absolute
    velocity and acceleration per axis, and the mean velocity over the first two transitions (the
    motion mode's sign).
    """
    if videos.dim() != 5 or videos.shape[1] < 3:
        raise ValueError(f"features need videos [N, F >= 3, 3, S, S], got {list(videos.shape)}")
    n, f, _, size, _ = videos.shape
    a = ((videos.double() + 1) / 2).clamp(0, 1)
    w = a.mean(dim=2)  # [N, F, S, S]
    mass = w.flatten(2).sum(2).clamp_min(1e-6)  # [N, F]
    grid = (torch.arange(size, dtype=torch.float64) + 0.5) / size
    px = w.sum(2) / mass[..., None]  # [N, F, S] marginal over x
    py = w.sum(3) / mass[..., None]
    cx, cy = (px * grid).sum(2), (py * grid).sum(2)  # [N, F]
    sx = ((px * (grid - cx[..., None]) ** 2).sum(2)).sqrt()
    sy = ((py * (grid - cy[..., None]) ** 2).sum(2)).sqrt()
    centre = torch.stack([cx, cy], dim=-1)  # [N, F, 2]
    vel = centre[:, 1:] - centre[:, :-1]
    acc = vel[:, 1:] - vel[:, :-1]
    per_frame = torch.stack([a[:, :, 0].mean((2, 3)), a[:, :, 1].mean((2, 3)), a[:, :, 2].mean((2, 3)),
                             w.mean((2, 3)), cx, cy, sx, sy], dim=-1).mean(1)  # [N, 8]
    motion = torch.cat([centre.std(1), vel.abs().mean(1), acc.abs().mean(1), vel[:, :2].mean(1)], dim=-1)
    return torch.cat([per_frame, motion], dim=-1).float()


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to feature rows `a [N, D]` and `b [M, D]`:
    `|μa − μb|² + tr Σa + tr Σb − 2·tr (Σa^½ Σb Σa^½)^½` (in float64, through eigendecompositions)."""
    a, b = a.double(), b.double()
    if a.shape[0] < 2 or b.shape[0] < 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"Fréchet distance needs [N >= 2, D] and [M >= 2, D], got {list(a.shape)} and {list(b.shape)}")
    mu = (a.mean(0) - b.mean(0)).pow(2).sum()
    ca, cb = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    ea, va = torch.linalg.eigh(ca)
    root_a = va @ torch.diag(ea.clamp_min(0).sqrt()) @ va.T
    cross = torch.linalg.eigvalsh(root_a @ cb @ root_a).clamp_min(0).sqrt().sum()
    return float(mu + ca.trace() + cb.trace() - 2 * cross)


def quality(videos: torch.Tensor, labels: torch.Tensor, real_features: torch.Tensor) -> dict:
    """Every quality number of one set of videos `[N, F, 3, S, S]` with labels `[N]`.

    `real_features`: `video_features` of real videos of the same length. Returns the checker's `score`
    (valid_frames, lawful_transitions, valid_videos, mode_coverage, per-frame curves, mode_histogram,
    ...) plus `mode_balance_tv`, `class_accuracy` (the class read from the pixels equals the label),
    `drift_slope` (of `per_frame_valid`) and `frechet` (features vs `real_features`).
    """
    out = score(videos, labels)
    labels = torch.as_tensor(labels).long()
    out["mode_balance_tv"] = mode_balance_tv(out["mode_histogram"])
    out["class_accuracy"] = float((predict_classes(videos).cpu() == labels.cpu()).float().mean())
    out["drift_slope"] = drift_slope(out["per_frame_valid"])
    out["frechet"] = frechet_distance(video_features(videos), real_features)
    return out
