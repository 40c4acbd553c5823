"""How self-attention is computed: the block-causal mask, described once and realised per backend.

A block-causal attention call is described by `BlockCausalMask` (which query frames, how many key
frames, the chunk size, tokens per frame) rather than by a dense `[Lq, Lk]` boolean tensor, so that
each backend can realise it its own way:

- "dense": the boolean mask through diffusers' `dispatch_attention_fn` (PyTorch SDPA). The reference;
  at Wan scale (32760 tokens) the mask alone is 1 GiB and it rules out the flash kernels.
- "flex": a FlexAttention `BlockMask` (block-sparse: fully masked 128x128 tiles are skipped, fully
  visible ones skip the mask) through a compiled `flex_attention`.

Unmasked calls (bidirectional attention, a chunk over a KV cache it fully sees) always go through
`dispatch_attention_fn` with the chosen diffusers backend. `attend` is the one entry point; the
backend names (`model.attention_backend`) are the keys of `BACKENDS`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch
from diffusers.models.attention_dispatch import (AttentionBackendName, _check_attention_backend_requirements,
                                                 dispatch_attention_fn)
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

# name -> (diffusers `AttentionBackendName` value for unmasked calls, how masked calls run).
# None = diffusers' active backend (native SDPA unless DIFFUSERS_ATTN_BACKEND says otherwise), which
# lets PyTorch pick its flash / cuDNN / efficient kernel. Masked calls: "dense" = boolean mask through
# that same backend; "flex" = FlexAttention block mask (kernels that take no arbitrary mask);
# "auto" = flex on CUDA, dense elsewhere (so CPU numerics are exactly the reference path's).
BACKENDS: dict[str, tuple[str | None, str]] = {
    "auto": (None, "auto"),
    "dense": (None, "dense"),
    "native": ("native", "dense"),
    "math": ("_native_math", "dense"),
    "efficient": ("_native_efficient", "dense"),
    "flex": (None, "flex"),
    "cudnn": ("_native_cudnn", "flex"),
    "native_flash": ("_native_flash", "flex"),
    "flash": ("flash", "flex"),
    "flash3": ("_flash_3", "flex"),
    "sage": ("sage", "flex"),
    "xformers": ("xformers", "flex"),
}
# diffusers' own spellings are accepted too ("_native_cudnn" = "cudnn").
_ALIASES = {unmasked: name for name, (unmasked, _) in BACKENDS.items() if unmasked is not None}

# Compiled once; `dynamic=False` specialises on shapes (a handful per run: the full-sequence training
# forwards). Uncompiled flex_attention materialises the full score matrix.
@functools.cache
def _compiled_flex():
    # Built on first use: creating it imports the compiler stack (seconds per process).
    return torch.compile(flex_attention, dynamic=False)


def backend_name(backend) -> str:
    """Our name of `backend`: a `BACKENDS` key, a diffusers spelling or `AttentionBackendName`, None = auto.

    Raises:
        ValueError: unknown name (one line, listing the accepted ones).
    """
    if backend is None:
        return "auto"
    name = str(getattr(backend, "value", backend)).lower()  # AttentionBackendName hashes by member name
    name = _ALIASES.get(name, name)
    if name not in BACKENDS:
        raise ValueError(f"expected one of {', '.join(BACKENDS)}, got '{backend}'")
    return name


def check_backend(backend) -> str:
    """`backend_name(backend)`, after checking the backend's package is installed.

    Raises:
        ValueError: unknown name, or a backend whose package is missing (one line, from diffusers).
    """
    name = backend_name(backend)
    unmasked, _ = BACKENDS[name]
    if unmasked is not None:
        try:
            _check_attention_backend_requirements(AttentionBackendName(unmasked))
        except RuntimeError as e:
            raise ValueError(f"'{name}' is not available: {str(e).splitlines()[0]}") from None
    return name


def dispatch_backend(backend) -> AttentionBackendName | None:
    """The diffusers backend unmasked calls of `backend` use (for processors that only dispatch)."""
    unmasked, _ = BACKENDS[backend_name(backend)]
    return None if unmasked is None else AttentionBackendName(unmasked)


def block_causal_mask(q_frames: torch.Tensor, k_frames: torch.Tensor, frames_per_chunk: int) -> torch.Tensor:
    """Boolean attention mask: query token may attend key token iff chunk(key) <= chunk(query).

    Args:
        q_frames: `[Lq]` latent-frame index of each query token (position inside the attention window).
        k_frames: `[Lk]` latent-frame index of each key token.
        frames_per_chunk: latent frames per chunk.
    Returns:
        `[Lq, Lk]` bool, True where attention is allowed.
    """
    return (k_frames[None, :] // frames_per_chunk) <= (q_frames[:, None] // frames_per_chunk)


@dataclass(frozen=True)
class BlockCausalMask:
    """Block-causal attention of `q_frames` query frames over `k_frames = q_offset + q_frames` key frames.

    The queries are the last key frames (a chunk over a KV cache, or the whole sequence when
    `q_offset == 0`); key frame `j` is visible to query frame `i` iff `j // frames_per_chunk <=
    i // frames_per_chunk`. Tokens are frame-major: token `n` belongs to frame `n // tokens_per_frame`.
    Hashable (equal descriptions share a cached FlexAttention block mask); `dense()` is memoised on the
    instance, so one description per forward builds its dense mask once for all blocks.
    """

    q_offset: int
    q_frames: int
    frames_per_chunk: int
    tokens_per_frame: int
    _dense: dict = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def k_frames(self) -> int:
        return self.q_offset + self.q_frames

    @property
    def shape(self) -> tuple[int, int]:
        """`(Lq, Lk)` in tokens."""
        return self.q_frames * self.tokens_per_frame, self.k_frames * self.tokens_per_frame

    @property
    def full(self) -> bool:
        """Every query sees every key (all query frames lie in one chunk that ends the keys)."""
        last_key_chunk = (self.k_frames - 1) // self.frames_per_chunk
        return last_key_chunk <= self.q_offset // self.frames_per_chunk

    def dense(self, device) -> torch.Tensor:
        """`[Lq, Lk]` bool, True where attention is allowed (`block_causal_mask` of the token frames)."""
        device = torch.device(device)
        if device not in self._dense:
            tpf = self.tokens_per_frame
            q = torch.arange(self.q_offset, self.k_frames, device=device).repeat_interleave(tpf)
            k = torch.arange(0, self.k_frames, device=device).repeat_interleave(tpf)
            self._dense[device] = block_causal_mask(q, k, self.frames_per_chunk)
        return self._dense[device]

    def block_mask(self, device) -> BlockMask:
        """The FlexAttention `BlockMask` (cached per description and device)."""
        return flex_block_mask(self, torch.device(device))


def block_causal(*, q_offset: int, q_frames: int, frames_per_chunk: int,
                 tokens_per_frame: int) -> BlockCausalMask | None:
    """`BlockCausalMask(...)`, or None when every key is visible (plain attention is then exact and faster)."""
    spec = BlockCausalMask(q_offset, q_frames, frames_per_chunk, tokens_per_frame)
    return None if spec.full else spec


def flex_block_mask(spec: BlockCausalMask, device) -> BlockMask:
    """FlexAttention `BlockMask` of `spec` on `device` (B and heads broadcast), cached per
    (q_frames, k_frames, q_offset, frames_per_chunk, tokens_per_frame, device).

    Token counts need not be multiples of the 128-token block: `create_block_mask` pads and the kernel
    ignores positions past the true lengths.
    """
    return _flex_block_mask(spec.q_frames, spec.k_frames, spec.q_offset, spec.frames_per_chunk,
                            spec.tokens_per_frame, torch.device(device))


# Keyed by plain values, not by the description: that would keep its memoised dense mask alive.
@functools.lru_cache(maxsize=64)
def _flex_block_mask(q_frames: int, k_frames: int, q_offset: int, frames_per_chunk: int, tokens_per_frame: int,
                     device: torch.device) -> BlockMask:
    # The parameters are captured as a tensor, not Python ints: Dynamo would specialise the compiled
    # kernel on ints and recompile for every chunk size / offset; this way equal token counts share one.
    params = torch.tensor([tokens_per_frame, frames_per_chunk, q_offset], device=device)

    def mask_mod(b, h, q_idx, kv_idx):
        tpf, fpc, offset = params[0], params[1], params[2]
        return (kv_idx // tpf) // fpc <= (q_idx // tpf + offset) // fpc

    # Compiled on CUDA: uncompiled, it evaluates mask_mod on the dense Lq x Lk grid (GiBs at Wan scale).
    return create_block_mask(mask_mod, None, None, q_frames * tokens_per_frame, k_frames * tokens_per_frame,
                             device=device, _compile=device.type == "cuda")


def masked_method(backend, device: torch.device, requires_grad: bool) -> str:
    """How a masked call of `backend` runs on `device`: "dense" or "flex".

    FlexAttention has no CPU backward (torch raises), so CPU calls that need gradients use the dense
    mask: numerically the same attention.
    """
    _, masked = BACKENDS[backend_name(backend)]
    if masked == "auto":
        masked = "flex" if device.type == "cuda" else "dense"
    if masked == "flex" and device.type == "cpu" and requires_grad:
        masked = "dense"
    return masked


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: BlockCausalMask | None = None, *,
           backend=None) -> torch.Tensor:
    """Scaled dot-product attention in diffusers' layout.

    Args:
        query: `[B, Lq, heads, head_dim]`.
        key, value: `[B, Lk, heads, head_dim]`.
        mask: a `BlockCausalMask` with `shape == (Lq, Lk)`, or None (every key visible).
        backend: a `BACKENDS` name (None = "auto"); see the module docstring.
    Returns:
        `[B, Lq, heads, head_dim]`.
    """
    name = backend_name(backend)
    unmasked = dispatch_backend(name)
    if mask is None:
        return dispatch_attention_fn(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                     backend=unmasked)
    if mask.shape != (query.shape[1], key.shape[1]):
        raise ValueError(f"mask of {mask.shape} tokens for attention of {query.shape[1]} queries over "
                         f"{key.shape[1]} keys")
    requires_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value))
    if masked_method(name, query.device, requires_grad) == "flex":
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))  # [B, heads, L, d]
        return _compiled_flex()(q, k, v, block_mask=mask.block_mask(query.device)).transpose(1, 2)
    # The reference path. A 4-D mask: diffusers reads a 2-D [Lq, Lk] one as a [B, Lk] padding mask when B == Lq.
    if unmasked not in (None, AttentionBackendName.NATIVE, AttentionBackendName._NATIVE_MATH,
                        AttentionBackendName._NATIVE_EFFICIENT):
        unmasked = None  # a flex-kind backend falling back to dense (CPU backward): plain SDPA takes the mask
    return dispatch_attention_fn(query, key, value, attn_mask=mask.dense(query.device)[None, None], dropout_p=0.0,
                                 is_causal=False, backend=unmasked)
