"""The `sprites` data set: procedurally generated videos of one bouncing sprite.

This module implements /work/shared/SPRITES.md exactly. Summary of the contract:

- A video is float32 ``[F, 3, S, S]`` in {-1, +1}; a batch is ``[N, F, 3, S, S]`` with int64 labels ``[N]``.
  Switched videos (SPRITES.md addendum) carry a per-frame class schedule ``[N, F]`` instead.
- ``S`` is 16 or 32, sprite size ``s = S // 4``, speed unit ``k = S // 16``.
- Class ``c`` in 0..5: colour ``c // 2`` (0 red, 1 green, 2 blue), shape ``c % 2`` (0 square, 1 disk).
  Class 6 is the null class (classifier-free guidance) and never labels a real video.
- Motion modes: 0 ``(+k, +k)``, 1 ``(+k, -k)``, 2 ``(-k, -k)``, 3 ``(-k, +k)`` as ``(vx, vy)``.
- Per frame and axis: ``p' = p + v``; if ``p' < 0``: ``p' = -p'``, ``v = -v``;
  if ``p' > S - s``: ``p' = 2 (S - s) - p'``, ``v = -v``. Frame 0 is the initial position.

Positions are ``(x, y)`` = (column, row) of the sprite box's top-left corner.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

NUM_CLASSES = 6
NULL_CLASS = 6
NUM_MODES = 4
NUM_COLOURS = 3
NUM_SHAPES = 2
SIZES = (16, 32)
COLOUR_NAMES = ("red", "green", "blue")
SHAPE_NAMES = ("square", "disk")

# Velocity signs (vx, vy) of each motion mode, in units of k.
MODE_SIGNS = ((1, 1), (1, -1), (-1, -1), (-1, 1))

_BLOCK = 1024
_MASK64 = (1 << 64) - 1


def check_size(size: int) -> int:
    """Return ``size`` if it is a supported frame size (16 or 32); raise ValueError otherwise."""
    if isinstance(size, bool) or not isinstance(size, int) or size not in SIZES:
        raise ValueError(f"frame size must be one of {SIZES}, got {size!r}")
    return size


def sprite_size(size: int) -> int:
    """Sprite side ``s = S / 4`` for frame size ``S``."""
    return check_size(size) // 4


def speed(size: int) -> int:
    """Speed unit ``k = S / 16`` for frame size ``S``."""
    return check_size(size) // 16


def class_colour(c: int) -> int:
    """Colour index (0 red, 1 green, 2 blue) of class ``c``; works on ints and tensors."""
    return c // 2


def class_shape(c: int) -> int:
    """Shape index (0 square, 1 disk) of class ``c``; works on ints and tensors."""
    return c % 2


def shape_mask(shape: int, s: int) -> torch.Tensor:
    """BoolTensor ``[s, s]`` (row i, column j) of the pixels a sprite of ``shape`` covers in its box.

    ``shape`` 0 is the full square; 1 is the disk
    ``(i + 0.5 - s/2)^2 + (j + 0.5 - s/2)^2 <= (s/2)^2`` (12 pixels for s=4, 52 for s=8).
    """
    if shape not in (0, 1):
        raise ValueError(f"shape must be 0 (square) or 1 (disk), got {shape!r}")
    if isinstance(s, bool) or not isinstance(s, int) or s < 1:
        raise ValueError(f"sprite side must be a positive int, got {s!r}")
    if shape == 0:
        return torch.ones(s, s, dtype=torch.bool)
    # Doubled coordinates keep the test in exact integer arithmetic.
    c = 2 * torch.arange(s) + 1 - s  # = 2 * (i + 0.5 - s/2)
    return c[:, None] ** 2 + c[None, :] ** 2 <= s * s


def sprite_mask(shape: int, size: int) -> torch.Tensor:
    """BoolTensor ``[s, s]`` of ``shape`` (0 square, 1 disk) for frame size ``size`` (s = size / 4)."""
    return shape_mask(shape, sprite_size(size))


def class_masks(size: int) -> torch.Tensor:
    """BoolTensor ``[NUM_CLASSES, s, s]``: the sprite mask of every class for frame size ``size``."""
    return _class_masks(size).clone()


@functools.lru_cache(maxsize=None)
def _class_masks(size: int) -> torch.Tensor:
    s = sprite_size(size)
    return torch.stack([shape_mask(class_shape(c), s) for c in range(NUM_CLASSES)])


def mode_velocity(mode: Any, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Initial velocity ``(vx, vy)`` (int64 tensors shaped like ``mode``) of motion ``mode`` (0..3)."""
    k = speed(size)
    mode = torch.as_tensor(mode, dtype=torch.long)
    if mode.numel() and (mode.min() < 0 or mode.max() >= NUM_MODES):
        raise ValueError(f"motion modes must be in 0..{NUM_MODES - 1}, got {mode.tolist()}")
    signs = torch.tensor(MODE_SIGNS, dtype=torch.long) * k
    return signs[mode, 0], signs[mode, 1]


def trajectory(x: Any, y: Any, vx: Any, vy: Any, frames: int, S: int) -> torch.Tensor:
    """Positions ``(x, y)`` of a bouncing sprite: LongTensor ``[..., frames, 2]``.

    ``x, y, vx, vy`` are ints or int tensors broadcast together to shape ``[...]`` (``[]`` for ints);
    frame 0 is the initial position. Each step applies the bounce rule of SPRITES.md per axis.
    """
    check_size(S)
    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise ValueError(f"frames must be a positive int, got {frames!r}")
    hi = S - sprite_size(S)
    x, y, vx, vy = torch.broadcast_tensors(*(torch.as_tensor(t, dtype=torch.long) for t in (x, y, vx, vy)))
    p = torch.stack([x, y], dim=-1).clone()  # [..., 2]
    v = torch.stack([vx, vy], dim=-1).clone()
    if p.numel() and (p.min() < 0 or p.max() > hi):
        raise ValueError(f"initial positions must be in [0, {hi}], got range [{int(p.min())}, {int(p.max())}]")
    out = torch.empty(*p.shape[:-1], frames, 2, dtype=torch.long)
    out[..., 0, :] = p
    for f in range(1, frames):
        p += v
        low = p < 0
        p = torch.where(low, -p, p)
        v = torch.where(low, -v, v)
        high = p > hi
        p = torch.where(high, 2 * hi - p, p)
        v = torch.where(high, -v, v)
        out[..., f, :] = p
    return out


@functools.lru_cache(maxsize=None)
def _row_spans(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per class and box row, first and last on column: two LongTensors ``[NUM_CLASSES, s]``.

    Both shapes are row-convex (each row's on pixels are one run), so a row span describes the mask
    exactly; rendering then needs only per-row gathers instead of a per-pixel one.
    """
    masks = class_masks(size)
    s = masks.shape[-1]
    cols = torch.arange(s)
    first = torch.where(masks, cols, s).amin(-1)
    last = torch.where(masks, cols, -1).amax(-1)
    rebuilt = (cols >= first[..., None]) & (cols <= last[..., None])
    assert torch.equal(rebuilt, masks), "sprite masks must be row-convex"
    return first, last


def render(positions: torch.Tensor, labels: torch.Tensor, size: int) -> torch.Tensor:
    """Render sprites: positions LongTensor ``[N, F, 2]`` (x, y), labels int64 ``[N]`` or ``[N, F]`` (0..5).

    Labels ``[N]`` give each video one class; ``[N, F]`` is a per-frame schedule (the class of every
    frame, SPRITES.md addendum: switched videos). Returns float32 ``[N, F, 3, size, size]`` with values
    exactly -1 (off) or +1 (on).
    """
    s = sprite_size(size)
    positions = torch.as_tensor(positions, dtype=torch.long)
    labels = torch.as_tensor(labels, dtype=torch.long)
    if positions.dim() != 3 or positions.shape[-1] != 2:
        raise ValueError(f"positions must be [N, F, 2], got {list(positions.shape)}")
    n, frames = positions.shape[:2]
    if labels.shape not in ((n,), (n, frames)):
        raise ValueError(f"labels must be [{n}] or a per-frame schedule [{n}, {frames}], got {list(labels.shape)}")
    if labels.numel() and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"labels must be in 0..{NUM_CLASSES - 1}, got {labels.unique().tolist()}")
    if positions.numel() and (positions.min() < 0 or positions.max() > size - s):
        lo, hi = int(positions.min()), int(positions.max())
        raise ValueError(f"positions must be in [0, {size - s}], got range [{lo}, {hi}]")
    # One code path: a per-video label is the constant schedule (pure indexing, so bit-identical).
    sched = labels[:, None].expand(n, frames) if labels.dim() == 1 else labels  # [N, F]
    first, last = _row_spans(size)
    grid = torch.arange(size)
    x = positions[..., 0, None]  # [N, F, 1]
    i = grid - positions[..., 1, None]  # [N, F, S] row inside the box
    inside = (i >= 0) & (i < s)
    ic = i.clamp(0, s - 1)
    lab = sched[:, :, None]  # [N, F, 1] class of each frame
    lo = x + first[lab, ic]  # [N, F, S] first on column of each frame row
    hi = torch.where(inside, x + last[lab, ic], -1)
    on = (grid >= lo[..., None]) & (grid <= hi[..., None])  # [N, F, S, S]
    out = torch.full((n, frames, NUM_COLOURS, size, size), -1.0)
    out[torch.arange(n)[:, None], torch.arange(frames)[None, :], class_colour(sched)] = on.float() * 2 - 1
    return out


def _check_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    return value


def switch_schedule(labels: torch.Tensor, frames: int, at: Any, to: Any = "shift") -> torch.Tensor:
    """Per-frame class schedule LongTensor ``[N, frames]`` of videos switching class at frames ``at``.

    ``labels`` int64 ``[N]`` is each video's class from frame 0 (c0); ``at`` is one switch frame ``K1`` or
    an increasing sequence ``K1 < K2 < ...`` with ``0 < K1`` and ``Ki < frames``. From frame ``Ki`` on the
    class is ``ci``, chosen by ``to``:

    - ``"shift"`` (default): each switch moves the class on by one, ``ci = (c{i-1} + 1) mod 6``;
    - an int in 0..5: every switch of every video goes to that class (a video already in that class
      then keeps it, so its schedule shows no change there);
    - a sequence of ints in 0..5, one per switch: switch ``i`` goes to ``to[i]`` for every video.

    The null class (6) never appears.
    """
    labels = torch.as_tensor(labels)
    if labels.dim() != 1:
        raise ValueError(f"labels must be [N], got {list(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be integers, got dtype {labels.dtype}")
    labels = labels.long()
    if labels.numel() and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"labels must be in 0..{NUM_CLASSES - 1}, got {labels.unique().tolist()}")
    _check_int("frames", frames)
    if frames < 1:
        raise ValueError(f"frames must be a positive int, got {frames!r}")
    if isinstance(at, int) and not isinstance(at, bool):
        ks = [at]
    elif isinstance(at, (list, tuple, range)) and len(at):
        ks = list(at)
    else:
        raise ValueError(f"at must be a switch frame or a non-empty sequence of them, got {at!r}")
    for k in ks:
        _check_int("at", k)
    if ks[0] <= 0 or ks[-1] >= frames or any(a >= b for a, b in zip(ks, ks[1:])):
        raise ValueError(f"at must satisfy 0 < K1 < K2 < ... < frames={frames}, got {ks}")
    if isinstance(to, str):
        if to != "shift":
            raise ValueError(f"to must be 'shift', a class or a sequence of classes, got {to!r}")
        targets = None
    elif isinstance(to, int) and not isinstance(to, bool):
        targets = [to] * len(ks)
    elif isinstance(to, (list, tuple)):
        targets = list(to)
        if len(targets) != len(ks):
            raise ValueError(f"to must give one class per switch ({len(ks)}), got {targets}")
    else:
        raise ValueError(f"to must be 'shift', a class or a sequence of classes, got {to!r}")
    if targets is not None:
        for c in targets:
            _check_int("to", c)
            if not 0 <= c < NUM_CLASSES:
                raise ValueError(f"to must hold classes in 0..{NUM_CLASSES - 1}, got {to!r}")
    out = labels[:, None].repeat(1, frames)  # [N, F]
    cur = labels.clone()
    for i, k in enumerate(ks):
        cur = (cur + 1) % NUM_CLASSES if targets is None else torch.full_like(cur, targets[i])
        out[:, k:] = cur[:, None]
    return out


def make_switched_videos(params: "SpriteParams", frames: int, size: int, schedule: torch.Tensor) -> torch.Tensor:
    """Switched videos float32 ``[N, frames, 3, size, size]``: the motion of ``params``, appearance per frame.

    ``schedule`` int64 ``[N, frames]`` (see :func:`switch_schedule`) gives the class of every frame; the
    positions are exactly those of ``make_videos(params, frames, size)`` (a switch changes appearance only),
    and ``params.cls`` is not used. A constant schedule equal to ``params.cls`` gives ``make_videos``'s videos.
    """
    _check_int("frames", frames)
    schedule = torch.as_tensor(schedule)
    if schedule.shape != (len(params), frames):
        raise ValueError(f"schedule must be [N, F] = [{len(params)}, {frames}], got {list(schedule.shape)}")
    if schedule.dtype.is_floating_point or schedule.dtype.is_complex or schedule.dtype == torch.bool:
        raise ValueError(f"schedule must be integers, got dtype {schedule.dtype}")
    vx, vy = mode_velocity(params.mode, size)
    positions = trajectory(params.x, params.y, vx, vy, frames, size)
    return render(positions, schedule, size)


@dataclass
class SpriteParams:
    """Per-sample parameters, each a LongTensor ``[N]``: class (0..5), mode (0..3), x, y (0..S-s)."""

    cls: torch.Tensor
    mode: torch.Tensor
    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        self.cls, self.mode, self.x, self.y = (
            torch.as_tensor(t, dtype=torch.long).reshape(-1) for t in (self.cls, self.mode, self.x, self.y)
        )
        n = self.cls.numel()
        if not (self.mode.numel() == self.x.numel() == self.y.numel() == n):
            raise ValueError(
                f"SpriteParams fields must have equal length, got cls={n}, mode={self.mode.numel()}, "
                f"x={self.x.numel()}, y={self.y.numel()}"
            )

    def __len__(self) -> int:
        return self.cls.numel()

    def __getitem__(self, idx: Any) -> "SpriteParams":
        return SpriteParams(self.cls[idx], self.mode[idx], self.x[idx], self.y[idx])

    @staticmethod
    def cat(parts: list["SpriteParams"]) -> "SpriteParams":
        return SpriteParams(*(torch.cat([getattr(p, f) for p in parts]) for f in ("cls", "mode", "x", "y")))


def sample_params(generator: torch.Generator, n: int, size: int = 16) -> SpriteParams:
    """Draw ``n`` samples of (class, mode, x, y), each uniform and independent, from a CPU generator.

    Draw order (part of the reproducibility contract): all ``n`` classes, then modes, then x, then y.
    """
    hi = size - sprite_size(size)
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    cls = torch.randint(0, NUM_CLASSES, (n,), generator=generator)
    mode = torch.randint(0, NUM_MODES, (n,), generator=generator)
    x = torch.randint(0, hi + 1, (n,), generator=generator)
    y = torch.randint(0, hi + 1, (n,), generator=generator)
    return SpriteParams(cls, mode, x, y)


def _make(params: SpriteParams, frames: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Videos ``[N, F, 3, S, S]`` and positions ``[N, F, 2]`` of ``params``."""
    vx, vy = mode_velocity(params.mode, size)
    positions = trajectory(params.x, params.y, vx, vy, frames, size)
    return render(positions, params.cls, size), positions


def make_videos(params: SpriteParams, frames: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Videos float32 ``[N, frames, 3, size, size]`` in {-1, +1} and labels int64 ``[N]`` of ``params``."""
    videos, _ = _make(params, frames, size)
    return videos, params.cls.clone()


def balanced_labels(n: int, num_classes: int = NUM_CLASSES) -> torch.Tensor:
    """Int64 ``[n]`` labels cycling over the classes: 0, 1, ..., num_classes-1, 0, 1, ..."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    return torch.arange(n, dtype=torch.long) % num_classes


def _splitmix64(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def block_seed(seed: int, block: int) -> int:
    """Generator seed of parameter block ``block`` of stream ``seed`` (63-bit, platform independent)."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (block & _MASK64)) >> 1


class SpritesStream:
    """Seeded, unbounded stream of sprite videos; deterministic and independent of batch boundaries.

    Counter-based scheme: sample ``i`` of stream ``seed`` belongs to block ``b = i // 1024`` at offset
    ``i % 1024``. A block's parameters are ``sample_params(g, 1024, size)`` with
    ``g = torch.Generator().manual_seed(block_seed(seed, b))``, where ``block_seed`` hashes
    ``(seed, b)`` with splitmix64. Sample ``i`` is thus a pure function of ``(seed, size, i)``, so the
    batch sizes used to walk the stream do not matter, and the state is just ``(seed, index)``.
    The current block is cached, so consecutive batches cost one block draw per 1024 samples.
    """

    block_size = _BLOCK

    def __init__(self, size: int = 16, frames: int = 12, seed: int = 0) -> None:
        check_size(size)
        if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
            raise ValueError(f"frames must be a positive int, got {frames!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.size = size
        self.frames = frames
        self.seed = seed
        self.index = 0  # number of samples drawn so far
        self._cache: tuple[int, SpriteParams] | None = None

    def _block(self, b: int) -> SpriteParams:
        if self._cache is None or self._cache[0] != b:
            g = torch.Generator().manual_seed(block_seed(self.seed, b))
            self._cache = (b, sample_params(g, self.block_size, self.size))
        return self._cache[1]

    def params_at(self, start: int, n: int) -> SpriteParams:
        """Parameters of samples ``start .. start+n-1`` (does not move the stream)."""
        parts = []
        i, end = start, start + n
        while i < end:
            b, off = divmod(i, self.block_size)
            take = min(self.block_size - off, end - i)
            parts.append(self._block(b)[off : off + take])
            i += take
        if not parts:
            return SpriteParams(*(torch.zeros(0, dtype=torch.long) for _ in range(4)))
        return parts[0] if len(parts) == 1 else SpriteParams.cat(parts)

    def next_params(self, n: int) -> SpriteParams:
        """Parameters of the next ``n`` samples; advances the stream."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        params = self.params_at(self.index, n)
        self.index += n
        return params

    def next_batch(self, n: int, frames: int | None = None) -> dict[str, torch.Tensor]:
        """Next ``n`` videos of the stream (``frames`` defaults to the stream's).

        Returns ``videos`` float32 ``[n, F, 3, S, S]``, ``labels`` int64 ``[n]``, ``modes`` int64 ``[n]``
        (initial motion mode) and ``positions`` int64 ``[n, F, 2]`` (x, y).
        """
        params = self.next_params(n)
        videos, positions = _make(params, self.frames if frames is None else frames, self.size)
        return dict(videos=videos, labels=params.cls.clone(), modes=params.mode.clone(), positions=positions)

    def state_dict(self) -> dict[str, int]:
        return dict(seed=self.seed, size=self.size, frames=self.frames, index=self.index)

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Resume at ``state``; its ``size`` must match this stream's (it changes what x, y mean)."""
        if int(state["size"]) != self.size:
            raise ValueError(f"state is for frame size {state['size']}, this stream has size {self.size}")
        self.seed = int(state["seed"])
        self.index = int(state["index"])
        self.frames = int(state.get("frames", self.frames))
        self._cache = None
