"""Score switched videos (prompt switching, SPRITES.md addendum) against the `sprites` rules.

A switched video carries a per-frame class schedule ``[F]`` (a batch: ``[N, F]``); a switch is a frame
``K`` whose scheduled class differs from frame ``K - 1``'s. A model is prompted chunk by chunk
(``frames_per_chunk`` frames at a time), so it can only act on a switch from the first chunk start
``K' = ceil(K / fpc) * fpc >= K`` on: the frames ``[K, K')`` of the chunk in progress at the switch may
show the old or the new class; every other frame must show its scheduled class. Transitions are
judged by the motion rules alone, whatever the classes of the two frames (the switch changes
appearance only), so a sprite that jumps or restarts at a switch is caught.

Like :mod:`pipeline.evaluation.checker`, this module never calls the generator (render/trajectory).
"""

from __future__ import annotations

from typing import Any

import torch

from pipeline.data.sprites import NUM_CLASSES
from pipeline.evaluation.checker import _check_inputs, check_frames, check_transitions

# the headline numbers of a switched rollout (`score_switched`'s keys), as the report and benchmark show them
SWITCH_KEYS = ("post_switch_valid", "first_chunk_valid", "lawful_across_switch", "valid_frames", "lawful_transitions")


def _check_schedule(videos: torch.Tensor, schedule: Any, frames_per_chunk: Any) -> tuple[torch.Tensor, int]:
    """Validate the arguments of :func:`score_switched`; return the schedule int64 ``[N, F]`` (CPU) and S."""
    if not isinstance(videos, torch.Tensor) or videos.dim() != 5:
        got = list(videos.shape) if isinstance(videos, torch.Tensor) else type(videos).__name__
        raise ValueError(f"videos must be [N, F, 3, S, S], got {got}")
    n, f = videos.shape[:2]
    schedule = torch.as_tensor(schedule)
    if schedule.shape != (n, f):
        raise ValueError(f"schedule must be [N, F] = [{n}, {f}] to match videos {list(videos.shape)}, "
                         f"got {list(schedule.shape)}")
    if schedule.dtype.is_floating_point or schedule.dtype.is_complex or schedule.dtype == torch.bool:
        raise ValueError(f"schedule must be integers, got dtype {schedule.dtype}")
    if schedule.numel() and (schedule.min() < 0 or schedule.max() >= NUM_CLASSES):
        bad = sorted({int(v) for v in schedule.reshape(-1).tolist() if not 0 <= v < NUM_CLASSES})
        raise ValueError(f"schedule classes must be in 0..{NUM_CLASSES - 1} (no null class), got {bad}")
    # The videos' layout and frame size are checked exactly as the checker checks them.
    _, size = _check_inputs(videos, schedule, allow_schedule=True)
    if n == 0:
        raise ValueError(f"score_switched needs at least one video, got videos {list(videos.shape)}")
    if f < 2:
        raise ValueError(f"score_switched needs videos with at least 2 frames, got {list(videos.shape)}")
    if isinstance(frames_per_chunk, bool) or not isinstance(frames_per_chunk, int) or frames_per_chunk < 1:
        raise ValueError(f"frames_per_chunk must be a positive int, got {frames_per_chunk!r}")
    if f % frames_per_chunk:
        raise ValueError(f"frames_per_chunk={frames_per_chunk} must divide the number of frames F={f}")
    return schedule.long().cpu(), size


def _chunk_start(k: int, fpc: int) -> int:
    """First chunk start (a multiple of ``fpc``) at or after frame ``k``."""
    return -(-k // fpc) * fpc


def _allowed_classes(schedule: torch.Tensor, fpc: int) -> torch.Tensor:
    """BoolTensor ``[N, F, 6]``: the classes frame ``f`` of video ``n`` may show.

    Always the scheduled class; in the window ``[K, K')`` of a switch also the class before it. With
    several switches in one chunk, a frame ``f`` after them may thus show any class scheduled in that
    chunk from its start up to ``f``.
    """
    n, f = schedule.shape
    allowed = torch.zeros(n, f, NUM_CLASSES, dtype=torch.bool)
    allowed.scatter_(2, schedule[..., None], True)
    for k in range(1, f):
        kp = min(_chunk_start(k, fpc), f)
        vids = (schedule[:, k] != schedule[:, k - 1]).nonzero().reshape(-1)  # [M] videos switching at k
        if kp > k and len(vids):
            old = schedule[vids, k - 1]  # [M]
            allowed[vids[:, None], torch.arange(k, kp)[None, :], old[:, None]] = True
    return allowed


def _frames_and_transitions(
    videos: torch.Tensor, allowed: torch.Tensor, size: int, chunk: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Frame validity ``[N, F]`` under ``allowed [N, F, 6]`` and transition lawfulness ``[N, F-1]`` (CPU)."""
    n, f = videos.shape[:2]
    valid_parts, lawful_parts = [], []
    for i in range(0, n, chunk):
        v = videos[i : i + chunk]
        m = len(v)
        al = allowed[i : i + chunk].to(v.device)
        valid = torch.zeros(m, f, dtype=torch.bool, device=v.device)
        positions = torch.full((m, f, 2), -1, dtype=torch.long, device=v.device)
        # A frame is valid if it is valid for any class it may show. Where valid, check_frames's position
        # is the on-set's box corner whatever the class, so taking it from any valid class is exact.
        for c in range(NUM_CLASSES):
            if not al[..., c].any():
                continue
            ok, pos = check_frames(v, torch.full((m,), c, dtype=torch.long, device=v.device))
            ok = ok & al[..., c]
            valid |= ok
            positions = torch.where(ok[..., None], pos, positions)
        lawful, _ = check_transitions(valid, positions, size)
        valid_parts.append(valid.cpu())
        lawful_parts.append(lawful.cpu())
    return torch.cat(valid_parts), torch.cat(lawful_parts)


def _fraction(hits: int, total: int) -> float | None:
    return hits / total if total else None


def score_switched(
    videos: torch.Tensor, schedule: torch.Tensor, frames_per_chunk: int, chunk: int = 256
) -> dict[str, Any]:
    """Score switched videos ``[N, F, 3, S, S]`` against their class schedule int64 ``[N, F]``.

    ``frames_per_chunk`` (fpc) must divide F. Per switch ``K`` of a video (``schedule[n, K] !=
    schedule[n, K-1]``), ``K'`` is the first chunk start ``>= K`` and ``K''`` the next switch's ``K'``
    (F if none). Frames are valid as in the module docstring (old or new class in ``[K, K')``); a
    transition is lawful by :func:`check_transitions` on those frames. Returns a JSON-serialisable dict:

    - ``post_switch_valid``: fraction of the frames ``[K', K'')`` that are valid, over all switches of
      all videos, frame-weighted (these frames must show the new class; the grace frames of the next
      switch, inside this window, may also show the next class);
    - ``first_chunk_valid``: the same restricted to the first chunk ``[K', K' + fpc)`` of each window
      ("exactly right within one chunk of the switch");
    - ``lawful_across_switch``: fraction of the lawful transitions ``t -> t+1`` with both frames in
      ``[K' - fpc, K' + fpc)`` (the chunk before ``K'`` and the first after, clipped to the video),
      over all switches, transition-weighted;
    - these three are ``None`` when there is no switch at all (or, for the first two, when every
      switch falls in the last chunk so no frame follows ``K'``);
    - ``pre_switch_valid``: fraction of valid frames before each video's first switch (all frames of a
      video without switch);
    - ``valid_frames``, ``lawful_transitions``: fractions over all frames / transitions;
    - ``per_frame_valid`` (length F), ``num_videos``, ``num_frames``, ``switches`` (number of switches,
      all videos together), ``frames_per_chunk``, ``size``.

    Videos are processed ``chunk`` at a time.
    """
    sched, size = _check_schedule(videos, schedule, frames_per_chunk)
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
        raise ValueError(f"chunk must be a positive int, got {chunk!r}")
    n, f = sched.shape
    fpc = frames_per_chunk
    allowed = _allowed_classes(sched, fpc)
    valid, lawful = _frames_and_transitions(videos, allowed, size, chunk)

    post = [0, 0]  # [valid frames, frames]
    first = [0, 0]
    across = [0, 0]  # [lawful transitions, transitions]
    pre = [0, 0]
    switches = 0
    for i in range(n):
        ks = (sched[i, 1:] != sched[i, :-1]).nonzero().reshape(-1) + 1  # switch frames of video i
        ks = ks.tolist()
        switches += len(ks)
        end_pre = ks[0] if ks else f
        pre[0] += int(valid[i, :end_pre].sum())
        pre[1] += end_pre
        starts = [min(_chunk_start(k, fpc), f) for k in ks]  # K' of each switch
        for j, kp in enumerate(starts):
            kpp = starts[j + 1] if j + 1 < len(starts) else f  # K'': the next switch's K'
            post[0] += int(valid[i, kp:kpp].sum())
            post[1] += kpp - kp
            first_end = min(kp + fpc, kpp)
            first[0] += int(valid[i, kp:first_end].sum())
            first[1] += first_end - kp
            # Transitions t -> t+1 with t, t+1 in [K' - fpc, K' + fpc) clipped to [0, F).
            lo, hi = max(kp - fpc, 0), min(kp + fpc, f)
            across[0] += int(lawful[i, lo : hi - 1].sum())
            across[1] += max(hi - 1 - lo, 0)

    return {
        "post_switch_valid": _fraction(*post),
        "first_chunk_valid": _fraction(*first),
        "lawful_across_switch": _fraction(*across),
        "pre_switch_valid": _fraction(*pre),
        "valid_frames": float(valid.float().mean()),
        "lawful_transitions": float(lawful.float().mean()),
        "per_frame_valid": valid.float().mean(dim=0).tolist(),
        "num_videos": int(n),
        "num_frames": int(f),
        "switches": int(switches),
        "frames_per_chunk": int(fpc),
        "size": int(size),
    }
