"""Score videos (real or generated) against the rules of the `sprites` data set (SPRITES.md).

Videos are ``[N, F, 3, S, S]`` with labels ``[N]`` in 0..5. Generated videos are continuous, so each
channel is binarised at 0 (on iff value > 0). Three levels are checked:

- frame: exactly one sprite of the labelled colour, shape and size, fully inside the frame;
  labels are per video ``[N]`` or, for switched videos, per frame ``[N, F]``;
- transition ``t -> t+1``: both frames valid and the move obeys the bounce physics, with a velocity
  consistent with the previous lawful transition;
- data set: every class shows every motion mode.

The transition rule is implemented here independently of the generator's ``trajectory`` so that
the two check each other; only the shape masks and constants are shared.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F_

from pipeline.data.sprites import NUM_CLASSES, NUM_MODES, SIZES, shape_mask

# (vx, vy) signs of motion modes 0..3, restated here to keep the checker independent.
_MODE_OF_SIGNS = {(1, 1): 0, (1, -1): 1, (-1, -1): 2, (-1, 1): 3}


def _check_inputs(
    videos: torch.Tensor, labels: torch.Tensor, allow_schedule: bool = False
) -> tuple[torch.Tensor, int]:
    """Validate videos ``[N, F, 3, S, S]`` and labels ``[N]`` (or, with ``allow_schedule``, a per-frame
    schedule ``[N, F]``); return the labels as int64 on the videos' device and the frame size S."""
    if not isinstance(videos, torch.Tensor) or videos.dim() != 5:
        got = list(videos.shape) if isinstance(videos, torch.Tensor) else type(videos).__name__
        raise ValueError(f"videos must be [N, F, 3, S, S], got {got}")
    n, f, c, h, w = videos.shape
    if c != 3 or h != w:
        raise ValueError(f"videos must be [N, F, 3, S, S], got {list(videos.shape)}")
    if h not in SIZES:
        raise ValueError(f"frame size S must be one of {SIZES}, got {h}")
    if f < 1:
        raise ValueError(f"videos must have at least one frame, got {list(videos.shape)}")
    labels = torch.as_tensor(labels)
    if labels.shape != (n,) and not (allow_schedule and labels.shape == (n, f)):
        also = f" or a per-frame schedule [{n}, {f}]" if allow_schedule else ""
        raise ValueError(f"labels must be [{n}]{also} to match videos {list(videos.shape)}, "
                         f"got {list(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    if n and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        bad = sorted({int(v) for v in labels.reshape(-1).tolist() if not 0 <= v < NUM_CLASSES})
        raise ValueError(f"labels must be in 0..{NUM_CLASSES - 1}, got {bad}")
    return labels.to(device=videos.device, dtype=torch.long), h


def _box(flat: torch.Tensor, s: int, clamp_corner: bool = False):
    """The on-set's bounding-box corner of frames ``flat [M, S, S]`` (bool) and the ``s x s`` window of
    pixels from it (indices clamped to the frame): ``x0 [M]``, ``y0 [M]``, ``window [M, s, s]``.
    An empty frame's corner is (0, 0); `clamp_corner` keeps the window inside the frame."""
    size = flat.shape[-1]
    y0 = flat.any(dim=2).int().argmax(dim=1)  # first on row (0 when the frame is empty)
    x0 = flat.any(dim=1).int().argmax(dim=1)  # first on column
    if clamp_corner:
        x0, y0 = x0.clamp(max=size - s), y0.clamp(max=size - s)
    ar = torch.arange(s, device=flat.device)
    rows = (y0[:, None] + ar).clamp(max=size - 1)  # [M, s]
    cols = (x0[:, None] + ar).clamp(max=size - 1)
    window = flat[torch.arange(len(flat), device=flat.device)[:, None, None], rows[:, :, None], cols[:, None, :]]
    return x0, y0, window


def check_frames(videos: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Frame validity of videos ``[N, F, 3, S, S]`` with labels ``[N]`` or a per-frame schedule ``[N, F]``.

    A frame is valid iff the pixels with any channel on are exactly its class's shape mask (side
    ``s = S / 4``) placed at some integer ``(x, y)``, ``0 <= x, y <= S - s``, and each of those pixels
    has exactly its class's colour channel on (all other pixels all off). The class of frame ``f`` of
    video ``n`` is ``labels[n]``, or ``labels[n, f]`` for a schedule (switched videos, SPRITES.md addendum).

    Returns ``valid`` BoolTensor ``[N, F]`` and ``positions`` LongTensor ``[N, F, 2]`` (x, y of the
    sprite box; -1 where invalid), on the videos' device.
    """
    labels, size = _check_inputs(videos, labels, allow_schedule=True)
    n, f = videos.shape[:2]
    s = size // 4
    dev = videos.device
    # Per-video labels are the constant schedule; everything below works per frame.
    sched = labels[:, None].expand(n, f) if labels.dim() == 1 else labels  # [N, F]
    on = videos > 0  # [N, F, 3, S, S]
    any_on = on.any(dim=2)  # [N, F, S, S]

    colour = F_.one_hot(sched // 2, 3).bool()  # [N, F, 3]
    expected = any_on[:, :, None] & colour[..., None, None]
    colour_ok = (on == expected).flatten(2).all(dim=2)  # [N, F]

    shape = (sched % 2).reshape(n * f)  # [N*F]
    masks = torch.stack([shape_mask(0, s), shape_mask(1, s)]).to(dev)  # [2, s, s]
    # Both masks touch all four sides of their box, so a placed mask's top-left corner is the
    # top-left of the on-set's bounding box: one candidate placement per frame, no search needed.
    assert masks[:, 0].any(1).all() and masks[:, :, 0].any(1).all()
    area = masks.flatten(1).sum(1)[shape]  # [N*F] pixel count of each frame's shape
    flat = any_on.reshape(n * f, size, size)
    count = flat.flatten(1).sum(1)  # [N*F]
    x0, y0, window = _box(flat, s)
    inside = (x0 <= size - s) & (y0 <= size - s)
    want = masks[shape]  # [N*F, s, s]
    # The window equals the mask and no pixel lies outside it, so the on-set is exactly the placed mask.
    shape_ok = inside & (window == want).flatten(1).all(1) & (count == area)
    valid = shape_ok.reshape(n, f) & colour_ok
    positions = torch.stack([x0, y0], dim=-1).reshape(n, f, 2).long()
    positions = torch.where(valid[..., None], positions, torch.full_like(positions, -1))
    return valid, positions


def _step_candidates(p: torch.Tensor, lim: int, k: int) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """For each incoming velocity ``v`` in (+k, -k): (next position, resulting velocity, v)."""
    out = []
    for v in (k, -k):
        q = p + v
        w = torch.full_like(p, v)
        under = q < 0
        w = torch.where(under, -w, w)
        q = torch.where(under, -q, q)
        over = q > lim
        w = torch.where(over, -w, w)
        q = torch.where(over, 2 * lim - q, q)
        out.append((q, w, v))
    return out


def check_transitions(
    valid: torch.Tensor, positions: torch.Tensor, size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lawfulness of each transition ``t -> t+1`` of frame results from :func:`check_frames`.

    ``valid`` is ``[N, F]``, ``positions`` ``[N, F, 2]`` (x, y), F >= 2. A transition is lawful iff both
    frames are valid and on each axis some incoming velocity ``v`` in {+k, -k} maps ``p_t`` to
    ``p_{t+1}`` under the bounce rule and, if transition ``t-1 -> t`` was lawful, ``v`` equals the
    velocity that transition resulted in. After an unlawful transition the next is judged afresh.

    At a wall two incoming velocities can reach the same position (e.g. S - s = 12, k = 1: 12 -> 11
    with v = +1 or v = -1); either may satisfy the consistency condition. The resulting velocity is
    nevertheless unique given ``(p_t, p_{t+1})``, so it is well defined.

    Returns ``lawful`` BoolTensor ``[N, F-1]`` and ``velocities`` LongTensor ``[N, F-1, 2]`` (vx, vy
    resulting from each transition; 0 where the transition is unlawful).
    """
    if size not in SIZES:
        raise ValueError(f"frame size S must be one of {SIZES}, got {size}")
    if valid.dim() != 2 or positions.shape != (*valid.shape, 2):
        raise ValueError(
            f"valid must be [N, F] and positions [N, F, 2], "
            f"got {list(valid.shape)} and {list(positions.shape)}"
        )
    n, f = valid.shape
    if f < 2:
        raise ValueError(f"transitions need at least 2 frames, got F={f}")
    s, k = size // 4, size // 16
    lim = size - s
    positions = positions.long()
    lawful = torch.zeros(n, f - 1, dtype=torch.bool, device=valid.device)
    velocities = torch.zeros(n, f - 1, 2, dtype=torch.long, device=valid.device)
    prev_ok = torch.zeros(n, dtype=torch.bool, device=valid.device)
    prev_v = torch.zeros(n, 2, dtype=torch.long, device=valid.device)
    for t in range(f - 1):
        p, q = positions[:, t], positions[:, t + 1]  # [N, 2]
        ok = valid[:, t] & valid[:, t + 1]
        out_v = torch.zeros_like(p)
        axis_ok = torch.zeros_like(p, dtype=torch.bool)
        for q_c, w_c, v in _step_candidates(p, lim, k):
            good = (q_c == q) & (~prev_ok[:, None] | (prev_v == v))
            out_v = torch.where(good, w_c, out_v)
            axis_ok |= good
        ok &= axis_ok.all(dim=1)
        lawful[:, t] = ok
        velocities[:, t] = torch.where(ok[:, None], out_v, torch.zeros_like(out_v))
        prev_ok, prev_v = ok, out_v
    return lawful, velocities


def video_modes(lawful: torch.Tensor, velocities: torch.Tensor) -> torch.Tensor:
    """Motion mode of each video: LongTensor ``[N]``, -1 where the first transition is unlawful.

    The mode is read from the velocity *resulting* from the first transition: a video starting at a
    wall (e.g. x = 0) is ambiguous about its initial velocity on that axis, the resulting one is not.
    Mode 0 (+k, +k), 1 (+k, -k), 2 (-k, -k), 3 (-k, +k).
    """
    sx = velocities[:, 0, 0].sign()
    sy = velocities[:, 0, 1].sign()
    modes = torch.full_like(sx, -1)
    for (a, b), m in _MODE_OF_SIGNS.items():
        modes = torch.where((sx == a) & (sy == b), torch.full_like(modes, m), modes)
    return torch.where(lawful[:, 0], modes, torch.full_like(modes, -1))


def mode_histogram(labels: torch.Tensor, modes: torch.Tensor) -> torch.Tensor:
    """LongTensor ``[6, 4]``: number of videos of each class showing each mode (mode -1 ignored)."""
    labels = torch.as_tensor(labels).long().cpu().reshape(-1)
    modes = torch.as_tensor(modes).long().cpu().reshape(-1)
    if labels.shape != modes.shape:
        raise ValueError(f"labels and modes must have the same shape [N], "
                         f"got {list(labels.shape)} and {list(modes.shape)}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"labels must be in 0..{NUM_CLASSES - 1}, "
                         f"got range [{int(labels.min())}, {int(labels.max())}]")
    if modes.numel() and (modes.min() < -1 or modes.max() >= NUM_MODES):
        raise ValueError(f"modes must be in -1..{NUM_MODES - 1}, "
                         f"got range [{int(modes.min())}, {int(modes.max())}]")
    keep = modes >= 0
    flat = labels[keep] * NUM_MODES + modes[keep]
    return torch.bincount(flat, minlength=NUM_CLASSES * NUM_MODES).reshape(NUM_CLASSES, NUM_MODES)


def mode_coverage(labels: torch.Tensor, modes: torch.Tensor) -> float:
    """Mean over the 6 classes of (distinct modes seen among that class's videos) / 4, in [0, 1]."""
    hist = mode_histogram(labels, modes)
    return float((hist > 0).sum(dim=1).float().mean() / NUM_MODES)


def predict_classes(videos: torch.Tensor) -> torch.Tensor:
    """The class each video shows, read from its pixels without its label: LongTensor ``[N]``.

    Per frame (pixels on iff > 0): the colour is the channel with most on pixels; the shape is the mask
    (square or disk, placed at the top-left of the on-set's bounding box) with the larger intersection
    over union with the on-set. A video's class is the most frequent class among its non-empty frames
    (ties: the lower class id), -1 if every frame is empty.
    """
    if not isinstance(videos, torch.Tensor) or videos.dim() != 5 or videos.shape[2] != 3:
        raise ValueError(f"videos must be [N, F, 3, S, S], got {getattr(videos, 'shape', type(videos).__name__)}")
    n, f, _, size, _ = videos.shape
    s = size // 4
    on = videos > 0
    any_on = on.any(dim=2).reshape(n * f, size, size)
    colour = on.flatten(3).sum(3).reshape(n * f, 3).argmax(dim=1)
    _, _, window = _box(any_on, s, clamp_corner=True)
    count = any_on.flatten(1).sum(1)
    ious = []
    for m in (shape_mask(0, s), shape_mask(1, s)):
        inter = (window & m.to(videos.device)).flatten(1).sum(1)
        ious.append(inter / (count + m.sum() - inter).clamp_min(1))  # the placed mask lies in the window
    shape = (ious[1] > ious[0]).long()
    cls = (colour * 2 + shape).reshape(n, f)
    empty = ~any_on.flatten(1).any(1).reshape(n, f)
    votes = F_.one_hot(cls, NUM_CLASSES).masked_fill(empty[..., None], 0).sum(1)  # [N, 6]
    return torch.where(votes.sum(1) > 0, votes.argmax(1), torch.full((n,), -1, device=videos.device))


def score(videos: torch.Tensor, labels: torch.Tensor, chunk: int = 256) -> dict[str, Any]:
    """Score videos ``[N, F, 3, S, S]`` (F >= 2) with labels ``[N]``; JSON-serialisable dict.

    Keys: ``valid_frames`` (fraction of frames valid), ``lawful_transitions`` (fraction of all
    transitions lawful), ``valid_videos`` (fraction with every frame valid and every transition
    lawful), ``mode_coverage``, ``mode_undetermined`` (fraction of videos whose first transition is
    unlawful), ``per_frame_valid`` (length F), ``per_frame_lawful`` (length F-1), ``mode_histogram``
    (6 x 4 counts), ``num_videos``, ``num_frames``, ``size``. Videos are processed ``chunk`` at a time.
    """
    labels, size = _check_inputs(videos, labels)
    n, f = videos.shape[:2]
    if f < 2:
        raise ValueError(f"score needs videos with at least 2 frames, got {list(videos.shape)}")
    if n == 0:
        raise ValueError("score needs at least one video, got N=0")
    valid_parts, lawful_parts, mode_parts = [], [], []
    for i in range(0, n, chunk):
        valid, positions = check_frames(videos[i : i + chunk], labels[i : i + chunk])
        lawful, velocities = check_transitions(valid, positions, size)
        valid_parts.append(valid.cpu())
        lawful_parts.append(lawful.cpu())
        mode_parts.append(video_modes(lawful, velocities).cpu())
    valid = torch.cat(valid_parts)
    lawful = torch.cat(lawful_parts)
    modes = torch.cat(mode_parts)
    labels = labels.cpu()
    good = valid.all(dim=1) & lawful.all(dim=1)
    return {
        "valid_frames": float(valid.float().mean()),
        "lawful_transitions": float(lawful.float().mean()),
        "valid_videos": float(good.float().mean()),
        "mode_coverage": mode_coverage(labels, modes),
        "mode_undetermined": float((modes < 0).float().mean()),
        "per_frame_valid": valid.float().mean(dim=0).tolist(),
        "per_frame_lawful": lawful.float().mean(dim=0).tolist(),
        "mode_histogram": mode_histogram(labels, modes).tolist(),
        "num_videos": int(n),
        "num_frames": int(f),
        "size": int(size),
    }
