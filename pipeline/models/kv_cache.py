"""A static KV cache for streaming inference: preallocated, written in place, keys rotated once.

`causal_wan.KVCache` (the reference) keeps keys *before* RoPE and concatenates every call: each call
copies every block's whole K/V and re-rotates every cached key. `StaticKVCache` holds, per block, one
preallocated buffer `[B, slots, heads, head_dim]` laid out as

    [ sink frames | rolling window (a ring of whole chunks) | scratch: this call's frames ]

Keys are stored *after* RoPE, rotated once at their absolute frame index `a` (the frames ever seen
before them). A call writes its own keys/values into the scratch slots that follow the held frames,
attends over the buffer's prefix, and, when it writes the cache, copies them into the ring slots of
the oldest chunk (`slot = sinks + (a - sinks) mod (window - sinks)`): only the new chunk is copied.
The order of keys inside the buffer does not matter to attention; the block-causal mask only has to
separate the scratch frames, which sit after every cached one.

Two RoPE semantics (`rope`):
- "relative" (ours, `KVCache`'s): cached frames take positions `0 .. held-1` inside the window, the
  new frames follow. Once the window has rolled by `shift = seen - held` frames, a window frame's
  position is `a - shift` and a query's `a_q - shift`: the same *differences* as the absolute indices,
  so queries and window keys are rotated at absolute indices. Only the sink frames (position `a`,
  not `a - shift`) need a correction: they are kept unrotated-by-shift in a small side store and
  rotated by `shift` frames into the sink slots when the shift changes (sink tokens only).
- "absolute" (Self-Forcing's and LongLive's caches): every key keeps its absolute index; no correction.
  Their `local_attn_size` counts the current chunk: our `max_frames` = `local_attn_size - frames_per_chunk`.

Frame positions past the model's RoPE table (`rope_max_seq_len`) are computed with diffusers'
`get_1d_rotary_pos_embed`, the function that built the table, so a stream never runs out of positions.
For training rollouts (gradients through the current chunk, block recomputation) use `KVCache`: it
never modifies a tensor that autograd saved.
"""

from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass, field

import torch

ROPE_MODES = ("relative", "absolute")
CACHE_KINDS = ("auto", "static", "dynamic")


def new_kv_cache(kind: str = "auto", *, max_frames: int | None = None, sink_frames: int = 0, rope: str = "relative",
                 device=None, pool: "BufferPool | None" = None):
    """A cache for one stream: `static` (`StaticKVCache`, its buffers from `pool` if given), `dynamic`
    (`KVCache`, the reference), or `auto`: static on CUDA, dynamic elsewhere (CPU runs stay bit-identical to
    the reference). A rollout that carries gradients (grad mode on when the cache is made) always gets the
    dynamic one."""
    if kind not in CACHE_KINDS:
        raise ValueError(f"kv_cache must be one of {CACHE_KINDS}, got {kind!r}")
    if kind == "auto":
        kind = "static" if device is not None and torch.device(device).type == "cuda" else "dynamic"
    if kind == "static" and not torch.is_grad_enabled():
        return StaticKVCache(max_frames=max_frames, sink_frames=sink_frames, rope=rope, pool=pool)
    return KVCache(max_frames=max_frames, sink_frames=sink_frames, rope=rope)


class BufferPool:
    """The buffers of `StaticKVCache`s that are gone, handed to the next cache in the same roles: block i's key buffer
    becomes the next cache's block i key buffer (and so for values and sink keys), so consecutive streams write
    and read the same addresses in the same places. CUDA graphs recorded over one stream's cache
    (`CausalWanTransformer.compile_steady_state`, whose cache buffers are static inputs) then replay in the next
    instead of being recorded again, and the allocator is not asked for a cache's gigabytes per stream.

    A cache's buffers return to the pool only when the cache object is freed (`weakref.finalize`), so two live
    caches never share one. A reused buffer holds the last stream's values: a cache reads only the slots its own
    stream has written (see `StaticLayer.attend_inputs`), so they are never seen. A request of another shape
    (another batch size) drops the pooled buffers of that role, so the pool never holds more than the caches did.
    """

    def __init__(self):
        self.free: dict[tuple[str, int], list[torch.Tensor]] = {}  # (role, block) -> freed buffers

    def take(self, role: str, block_index: int, shape: tuple, like: torch.Tensor) -> torch.Tensor:
        """Block `block_index`'s `role` buffer ("keys", "values", "sink_keys") of `shape`, `like`'s dtype and
        device: a freed one of that role, or new (zeros)."""
        free = self.free.get((role, block_index), [])
        for i, t in enumerate(free):
            if t.shape == shape and t.dtype == like.dtype and t.device == like.device:
                return free.pop(i)
        free.clear()  # another shape: not kept beside the new one
        return _new_buffer(shape, like)

    def take_set(self, blocks: int, roles: tuple[str, ...], fits) -> dict[str, list[torch.Tensor]] | None:
        """A freed cache's whole set, for a new stream before its first call: for each role and each of `blocks`
        blocks a pooled buffer that `fits(role, buffer)`, the keys and values all of block 0's keys' shape and
        dtype (one set, not pieces of two caches of other sizes), taken together; or None (nothing taken)."""

        def pick(like: torch.Tensor) -> dict | None:
            chosen = {}
            for role in roles:
                for i in range(blocks):
                    t = next((t for t in self.free.get((role, i), []) if fits(role, t) and t.dtype == like.dtype
                              and (role == "sink_keys" or t.shape == like.shape)), None)
                    if t is None:
                        return None
                    chosen[role, i] = t
            return chosen

        for first in self.free.get(("keys", 0), []):
            chosen = pick(first) if fits("keys", first) else None
            if chosen is not None:
                for (role, i), t in chosen.items():
                    self.free[role, i] = [u for u in self.free[role, i] if u is not t]
                return {role: [chosen[role, i] for i in range(blocks)] for role in roles}
        return None

    def give(self, keys: list[torch.Tensor], values: list[torch.Tensor], sink_keys: list[torch.Tensor]) -> None:
        """A freed cache's buffers, by role and block."""
        for role, store in (("keys", keys), ("values", values), ("sink_keys", sink_keys)):
            for i, t in enumerate(store):
                self.free.setdefault((role, i), []).append(t)


def _new_buffer(shape: tuple, like: torch.Tensor) -> torch.Tensor:
    new = like.new_zeros(shape)
    if new.device.type == "cuda":  # a compiled step's CUDA graphs keep reading this address
        torch._dynamo.mark_static_address(new)
    return new


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on `x [B, L, heads, d]` with `cos, sin [1, L, 1, d]`: diffusers' WanAttnProcessor rotation
    (interleaved pairs)."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


def runs(values: list[int]) -> list[tuple[int, int, int]]:
    """`values` as runs `(first, length, step)` of equal steps 1 or 0 (single values otherwise): [3, 4, 5, 0, 0] ->
    [(3, 3, 1), (0, 2, 0)]."""
    out, i = [], 0
    while i < len(values):
        step = values[i + 1] - values[i] if i + 1 < len(values) and values[i + 1] - values[i] in (0, 1) else 1
        j = i + 1
        while j < len(values) and values[j] - values[j - 1] == step:
            j += 1
        out.append((values[i], j - i, step))
        i = j
    return out


def table_rows(table: torch.Tensor, rows: list[tuple[int, int, int]]) -> torch.Tensor:
    """`table[r]` for the host-side row numbers r given as `runs(r)`, made of slices of `table` (views, concatenated on
    its device) instead of an index tensor copied there: on CUDA a copy from pageable host memory waits for every
    queued kernel, a host synchronisation inside a streaming block."""
    parts = [table[a:a + n] if step else table[a:a + 1].expand(n, *table.shape[1:]) for a, n, step in rows]
    if not parts:
        return table[:0]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def slot_index(slots: list[int], tokens: int, device) -> torch.Tensor:
    """Token indices `[len(slots)·tokens]` of the distinct frame slots `slots`, built on `device` by `arange` (no
    host copy)."""
    return torch.cat([torch.arange(a * tokens, (a + n) * tokens, device=device) for a, n, _ in runs(slots)])


def rope_at(rope_module, frames: torch.Tensor, pph: int, ppw: int, identity_hw: bool = False):
    """(cos, sin) `[1, len(frames)·pph·ppw, 1, head_dim]` float64 for latent frames at positions `frames [n]`.

    `rope_module`: diffusers' `WanRotaryPosEmbed`. The frame rows come from its table (extended with
    the same function when a position is past it); `identity_hw`: the height/width parts are the
    identity (cos 1, sin 0), i.e. a rotation along the frame axis only (a position shift).
    """
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    t_dim, h_dim, w_dim = rope_module.t_dim, rope_module.h_dim, rope_module.w_dim
    cos_all, sin_all = rope_module.freqs_cos, rope_module.freqs_sin
    rows = runs(frames.tolist())
    need = max((a + (n - 1) * step for a, n, step in rows), default=-1) + 1
    if need > cos_all.shape[0]:  # past the table: the frame rows of a longer table (same function, theta)
        ext = getattr(rope_module, "_frame_rows", None)
        if ext is None or ext[0].shape[0] < need:
            size = max(need, 2 * cos_all.shape[0])
            c, s = get_1d_rotary_pos_embed(t_dim, size, 10000.0, use_real=True, repeat_interleave_real=True,
                                           freqs_dtype=cos_all.dtype)
            rope_module._frame_rows = ext = (c.to(cos_all.device), s.to(cos_all.device))
        cos_t, sin_t = ext
    else:
        cos_t, sin_t = cos_all[:, :t_dim], sin_all[:, :t_dim]
    cf, sf = table_rows(cos_t, rows)[:, None, None], table_rows(sin_t, rows)[:, None, None]  # [n, 1, 1, t_dim]
    n = len(frames)
    if identity_hw:
        ones = cf.new_ones(n, pph, ppw, h_dim + w_dim)
        parts_c = [cf.expand(n, pph, ppw, -1), ones]
        parts_s = [sf.expand(n, pph, ppw, -1), torch.zeros_like(ones)]
    else:
        ch, sh = cos_all[:pph, t_dim:t_dim + h_dim], sin_all[:pph, t_dim:t_dim + h_dim]
        cw, sw = cos_all[:ppw, t_dim + h_dim:], sin_all[:ppw, t_dim + h_dim:]
        parts_c = [cf.expand(n, pph, ppw, -1), ch[None, :, None].expand(n, pph, ppw, -1),
                   cw[None, None].expand(n, pph, ppw, -1)]
        parts_s = [sf.expand(n, pph, ppw, -1), sh[None, :, None].expand(n, pph, ppw, -1),
                   sw[None, None].expand(n, pph, ppw, -1)]
    cos = torch.cat(parts_c, dim=-1).reshape(1, n * pph * ppw, 1, -1)
    sin = torch.cat(parts_s, dim=-1).reshape(1, n * pph * ppw, 1, -1)
    return cos, sin


@dataclass
class KVCache:
    """Keys/values of finished frames, one entry per transformer block, optionally a rolling window.

    Keys are kept *before* RoPE: positions are re-indexed inside the cache at every call (cached
    frames take positions `0 .. num_frames-1`, the new chunk follows), so a stream of any length never
    leaves the RoPE table and a bounded window means a bounded cost per chunk. Without eviction the
    positions equal the absolute frame indices, i.e. exactly a block-causal forward over all frames.

    Each block's entry is a list of segments, one per write (a chunk), concatenated when read: a
    training rollout whose exit calls recompute their blocks in the backward pass (gradient
    checkpointing) keeps the segments each call read alive (`snapshot`), and segments are shared
    between snapshots, so that costs one cache, not one cache per chunk.

    Attributes:
        k_segments, v_segments: per block, a list of `[B, L_i, heads, head_dim]` (keys after q/k-norm,
            before RoPE); `keys` / `values` give them concatenated, `[B, L_cached, heads, head_dim]`.
        num_frames: latent frames held (the RoPE offset of the next chunk).
        max_frames: window size in latent frames (`local_attn_frames`); None = keep everything.
            With block-causal attention it and `sink_frames` must be multiples of frames_per_chunk.
        sink_frames: the first frames of the video, always kept when the window rolls.
        seen_frames: frames ever written (absolute position of the next chunk).
        rope: "relative" (the above) or "absolute": cached keys keep their absolute frame index, as in
            Self-Forcing's and LongLive's caches.
    """

    k_segments: list = field(default_factory=list)
    v_segments: list = field(default_factory=list)
    num_frames: int = 0
    max_frames: int | None = None
    sink_frames: int = 0
    seen_frames: int = 0
    rope: str = "relative"

    def __post_init__(self):
        if self.rope not in ROPE_MODES:
            raise ValueError(f"rope must be one of {ROPE_MODES}, got {self.rope!r}")
        if self.max_frames is not None and not 0 <= self.sink_frames < self.max_frames:
            raise ValueError(f"sink_frames ({self.sink_frames}) must be < max_frames ({self.max_frames})")

    def __len__(self) -> int:
        return self.num_frames

    @property
    def keys(self) -> list[torch.Tensor]:
        return [torch.cat(s, dim=1) for s in self.k_segments]

    @property
    def values(self) -> list[torch.Tensor]:
        return [torch.cat(s, dim=1) for s in self.v_segments]

    def snapshot(self) -> "KVCache":
        """A copy that keeps reading the segments held now (later writes and evictions replace list
        entries, never modify a segment), for recomputation in the backward pass."""
        return dataclasses.replace(self, k_segments=[list(s) for s in self.k_segments],
                                   v_segments=[list(s) for s in self.v_segments])

    def read(self, block_index: int, key: torch.Tensor, value: torch.Tensor):
        """`[cached, key]` and `[cached, value]` of one block, `[B, L_cached + L, heads, head_dim]`."""
        if block_index >= len(self.k_segments):
            return key, value
        return (torch.cat([*self.k_segments[block_index], key], dim=1),
                torch.cat([*self.v_segments[block_index], value], dim=1))

    def write(self, block_index: int, key: torch.Tensor, value: torch.Tensor, tokens_per_frame: int) -> None:
        """Append one block's new `key`/`value` `[B, L, heads, head_dim]` (detached), then drop the oldest
        non-sink frames beyond `max_frames` (before `num_frames` is advanced by the caller)."""
        if block_index == len(self.k_segments):
            self.k_segments.append([])
            self.v_segments.append([])
        self.k_segments[block_index].append(key.detach())
        self.v_segments[block_index].append(value.detach())
        held = self.num_frames + key.shape[1] // tokens_per_frame
        if self.max_frames is None or held <= self.max_frames:
            return
        sink = self.sink_frames * tokens_per_frame
        recent = (self.max_frames - self.sink_frames) * tokens_per_frame
        for store in (self.k_segments, self.v_segments):
            store[block_index] = _token_range(store[block_index], 0, sink) + \
                _token_range(store[block_index], held * tokens_per_frame - recent, held * tokens_per_frame)


def _token_range(segments: list[torch.Tensor], start: int, stop: int) -> list[torch.Tensor]:
    """The tokens `[start, stop)` of a list of segments (dim 1), as views of them (whole segments when
    the range covers them)."""
    out, pos = [], 0
    for seg in segments:
        n = seg.shape[1]
        lo, hi = max(start, pos), min(stop, pos + n)
        if lo < hi:
            out.append(seg if (lo, hi) == (pos, pos + n) else seg[:, lo - pos:hi - pos])
        pos += n
    return out


@dataclass
class StaticPass:
    """One attention pass over a `StaticKVCache` (prepared outside the blocks, so a compiled step sees
    tensors of fixed shapes only).

    Attributes:
        held: frames in the cache when this pass attends (its scratch starts at `held·T`).
        frames: query frames of the pass.
        rope: (cos, sin) `[1, frames·T, 1, d]` at the frames' absolute positions (queries and new keys).
        sink_rope: relative mode, window rolled: the frame shift rotation of the sink keys, else None.
        commit: write the pass's keys/values into the cache after attending.
        commit_index: `[frames·T]` token slots to copy them to (None: they stay where the scratch is).
        sink_tokens: tokens of this pass that are sink frames (also written to the side store) ...
        sink_start: ... from this token of the store.
        mask: block-causal mask over `[0, (held + frames)·T)`, or None.
    """

    held: int
    frames: int
    rope: tuple
    sink_rope: tuple | None
    commit: bool
    commit_index: torch.Tensor | None
    sink_tokens: int
    sink_start: int
    mask: object


class StaticKVCache:
    """Preallocated per-block K/V for streaming (see the module docstring). Same constructor arguments
    and `num_frames` / `seen_frames` / `max_frames` / `sink_frames` meaning as `causal_wan.KVCache`.

    Buffers `keys[i], values[i]` `[B, slots, heads, head_dim]` are allocated at the first call (batch,
    dtype and device of the model; or, with a pool, a freed stream's taken before it: `adopt_pooled`) and grow (rarely; never in a full rolling window) when a call needs
    more slots.
    """

    def __init__(self, max_frames: int | None = None, sink_frames: int = 0, rope: str = "relative",
                 pool: BufferPool | None = None):
        if max_frames is not None and not 0 <= sink_frames < max_frames:
            raise ValueError(f"sink_frames ({sink_frames}) must be < max_frames ({max_frames})")
        if rope not in ROPE_MODES:
            raise ValueError(f"rope must be one of {ROPE_MODES}, got {rope!r}")
        self.max_frames, self.sink_frames, self.rope = max_frames, sink_frames, rope
        self.num_frames = 0  # frames held
        self.seen_frames = 0  # frames ever written
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.sink_keys: list[torch.Tensor] = []  # relative mode: sinks rotated at their own positions
        self.tokens_per_frame = 0
        self.pool = pool
        if pool is not None:  # the buffers held when this cache is freed go back to the pool
            weakref.finalize(self, pool.give, self.keys, self.values, self.sink_keys)

    def __len__(self) -> int:
        return self.num_frames

    @property
    def full(self) -> bool:
        """The window holds `max_frames`: every later call has the same shapes (a compiled step's state)."""
        return self.max_frames is not None and self.num_frames == self.max_frames

    def steady(self, passes) -> bool:
        """Whether a call's `passes` are of the steady state: the window full (and, with relative RoPE and
        sinks, rolled, so the sinks get their shift rotation): every such call has the same shapes."""
        rotate = self.rope == "relative" and self.sink_frames > 0
        return self.max_frames is not None and all(
            p.held == self.max_frames and (p.sink_rope is not None) == rotate for p in passes)

    def compiled_call(self, passes) -> bool:
        """Whether a compiled step serves a call of these `passes` (`CausalWanTransformer.compile_steady_state`):
        one every stream repeats with the same shapes (the steady state's, or the first chunk's over an empty
        cache: the first-chunk latency) whose slots the buffers already hold (a compiled call cannot allocate or
        grow them: a stream's first call, unless `adopt_pooled` found it a freed stream's buffers, or one longer than
        those before, runs eagerly)."""
        need = max((p.held + p.frames) * self.tokens_per_frame for p in passes)
        return bool(self.keys) and min(k.shape[1] for k in self.keys) >= need and (
            self.steady(passes) or all(p.held == 0 for p in passes))

    def adopt_pooled(self, passes, *, blocks: int, batch: int, heads: int, head_dim: int, dtype: torch.dtype,
                     device) -> None:
        """Before a stream's first call: a freed cache's whole set of buffers from the pool, where the pool holds
        one that fits (batch, heads, head_dim, device, room for this call's `passes`), so that the first call too
        runs compiled (it counts in the first-chunk latency; without buffers it would allocate them eagerly), and
        an unbounded cache starts with the room its predecessor grew to (no regrowth copies).
        `dtype`: the keys' the call will compute (the buffers hold them as they are; `StaticLayer.attend_inputs`
        refuses keys of another). Nothing happens without a pool, once buffers are held, or where no set fits."""
        if self.pool is None or self.keys:
            return
        t = self.tokens_per_frame
        need = max((p.held + p.frames) * t for p in passes)
        roles = ("keys", "values") + (("sink_keys",) if self.rope == "relative" and self.sink_frames else ())

        def fits(role: str, buf: torch.Tensor) -> bool:
            slots_ok = buf.shape[1] == self.sink_frames * t if role == "sink_keys" else buf.shape[1] >= need
            return slots_ok and (buf.shape[0], *buf.shape[2:]) == (batch, heads, head_dim) and \
                buf.device == torch.device(device) and buf.dtype == dtype

        taken = self.pool.take_set(blocks, roles, fits)
        if taken is not None:  # in place: `weakref.finalize` gives these very lists back
            for role, store in (("keys", self.keys), ("values", self.values), ("sink_keys", self.sink_keys)):
                store.extend(taken.get(role, []))

    def _slot(self, a: int) -> int:
        """Frame slot of absolute frame `a` (sinks first, then a ring of the window)."""
        s = self.sink_frames
        if self.max_frames is None or a < s:
            return a
        return s + (a - s) % (self.max_frames - s)

    def _buffers(self, block_index: int, like: torch.Tensor, need: int):
        """Block `block_index`'s buffers with room for `need` tokens, allocated (or grown) after `like`
        `[B, L, H, d]`: a window's whole size at once, an unbounded cache doubling."""
        if block_index < len(self.keys) and self.keys[block_index].shape[1] >= need:
            return self.keys[block_index], self.values[block_index]
        b, _, h, d = like.shape
        old = self.keys[block_index].shape[1] if block_index < len(self.keys) else 0
        if self.max_frames is None:
            size = max(need, 2 * old)
        else:
            size = max(need, (self.max_frames + like.shape[1] // self.tokens_per_frame) * self.tokens_per_frame)
        for role, store in (("keys", self.keys), ("values", self.values)):
            new = self._allocate(role, block_index, (b, size, h, d), like)
            if block_index < len(store):
                new[:, :old] = store[block_index]
                store[block_index] = new
            else:
                if block_index != len(store):
                    raise ValueError(f"StaticKVCache: block {block_index} written before block {len(store)}")
                store.append(new)
        if self.rope == "relative" and self.sink_frames and block_index == len(self.sink_keys):
            self.sink_keys.append(self._allocate("sink_keys", block_index,
                                                   (b, self.sink_frames * self.tokens_per_frame, h, d), like))
        return self.keys[block_index], self.values[block_index]

    def _allocate(self, role: str, block_index: int, shape: tuple, like: torch.Tensor) -> torch.Tensor:
        shape = torch.Size(shape)
        return self.pool.take(role, block_index, shape, like) if self.pool is not None else _new_buffer(shape, like)

    def plan(self, frames: int, commit: bool, *, mask_fn, pph: int, ppw: int, rope_module, device) -> StaticPass:
        """The next pass of `frames` frames of `pph x ppw` tokens, and (when `commit`) the cache state after it.

        `rope_module`: the model's `WanRotaryPosEmbed` (RoPE at absolute frame positions, `rope_at`);
        `mask_fn(held, frames)`: the block-causal mask (or None).
        """
        tokens_per_frame = pph * ppw
        if self.tokens_per_frame and tokens_per_frame != self.tokens_per_frame:
            raise ValueError(f"a StaticKVCache holds frames of {self.tokens_per_frame} tokens, got {tokens_per_frame}")
        self.tokens_per_frame = t = tokens_per_frame
        held, seen = self.num_frames, self.seen_frames
        positions = torch.arange(seen, seen + frames)
        sink_rope = None
        shift = seen - held
        if self.rope == "relative" and self.sink_frames and shift and held >= self.sink_frames:
            sink_rope = rope_at(rope_module, torch.full((self.sink_frames,), shift), pph, ppw, identity_hw=True)
        index = None
        sink_tokens = max(0, min(self.sink_frames, seen + frames) - seen) * t
        if commit:
            slots = [self._slot(a) for a in range(seen, seen + frames)]
            if self.max_frames is not None and frames > self.max_frames - self.sink_frames and seen + frames > \
                    self.max_frames:
                raise ValueError(f"a StaticKVCache write of {frames} frames overflows its window "
                                 f"({self.max_frames} frames, {self.sink_frames} sinks)")
            if slots != list(range(held, held + frames)):
                index = slot_index(slots, t, device)
            self.seen_frames = seen + frames
            self.num_frames = min(held + frames, self.max_frames or 1 << 62)
        return StaticPass(held=held, frames=frames, rope=rope_at(rope_module, positions, pph, ppw), sink_rope=sink_rope, commit=commit,
                          commit_index=index, sink_tokens=sink_tokens, sink_start=seen * t if sink_tokens else 0, mask=mask_fn(held, frames))

    def layer(self, block_index: int, like: torch.Tensor | None = None, need: int = 0) -> "StaticLayer":
        """Block `block_index`'s buffers, with room for `need` tokens (allocated or grown after `like`
        `[B, L, H, d]`, the pass's keys; without `like` they must exist: the steady state's)."""
        if like is not None:
            self._buffers(block_index, like, need)
        sink_keys = self.sink_keys[block_index] if block_index < len(self.sink_keys) else None
        return StaticLayer(self.keys[block_index], self.values[block_index], sink_keys, self.tokens_per_frame,
                           self.sink_frames)


@dataclass
class StaticLayer:
    """One block's part of a `StaticKVCache`: what a block's attention reads and writes. It holds the
    block's buffers themselves, not a block index, so one compiled block serves every block (regional
    compilation, `CausalWanTransformer.compile_steady_state`) without specialising on the index.

    Attributes:
        keys, values: `[B, slots, heads, head_dim]` (see the module docstring for the layout).
        sink_keys: relative RoPE with sinks: the sinks' keys rotated at their own positions, else None.
    """

    keys: torch.Tensor
    values: torch.Tensor
    sink_keys: torch.Tensor | None
    tokens_per_frame: int
    sink_frames: int

    def attend_inputs(self, p: StaticPass, key: torch.Tensor, value: torch.Tensor):
        """Write this pass's rotated `key`, `value` `[B, frames·T, H, d]` into the scratch slots and return
        the keys/values to attend over, `[B, (held + frames)·T, H, d]` (views of the buffers)."""
        t = self.tokens_per_frame
        s0, n = p.held * t, key.shape[1]
        keys, values = self.keys, self.values
        if key.dtype != keys.dtype:  # (a static check under torch.compile) buffers from a stream of other precision
            raise ValueError(f"StaticKVCache buffers hold {keys.dtype} keys, this call computes {key.dtype}")
        if p.sink_rope is not None:  # relative positions: sinks sit `shift` frames further than stored
            keys[:, :self.sink_frames * t] = apply_rotary(self.sink_keys, *p.sink_rope)
        keys[:, s0:s0 + n] = key
        values[:, s0:s0 + n] = value
        return keys[:, :s0 + n], values[:, :s0 + n]

    def commit(self, p: StaticPass, key: torch.Tensor, value: torch.Tensor) -> None:
        """After attending: keep the pass's keys/values (`attend_inputs`' arguments) in their cache slots."""
        if not p.commit:
            return
        if p.sink_tokens and self.sink_keys is not None:
            self.sink_keys[:, p.sink_start:p.sink_start + p.sink_tokens] = key[:, :p.sink_tokens]
        if p.commit_index is not None:
            self.keys.index_copy_(1, p.commit_index, key)
            self.values.index_copy_(1, p.commit_index, value)
