"""A causal, KV-cached video transformer on top of diffusers' `WanTransformer3DModel`.

`CausalWanTransformer` is a subclass with the *same* constructor and state-dict keys, so a diffusers
Wan2.1 checkpoint loads unchanged (`CausalWanTransformer.from_pretrained(...)`) and a trained model
saves back to the diffusers format (`save_pretrained`). What it adds:

- per-frame timesteps `[B, F]`: the adaLN modulation is computed once per frame and broadcast over the
  frame's tokens (diffusers' own 2-D timestep path builds a `[B, seq_len, 6, D]` tensor per token,
  which is large at real scale);
- attention mode `bidirectional` or `block_causal`: in block-causal mode a token of chunk `c`
  (chunk = `frames_per_chunk` consecutive latent frames) sees every token of chunks `<= c`;
- streaming with a `KVCache`: the keys/values of finished chunks are kept per block and read by the
  next chunk, whose RoPE positions start at its first frame (diffusers' RoPE always starts at 0).

Mask and cache live in a custom attention processor because the stock block calls self-attention with
`attention_mask=None`; the block loop is re-stated here (a few lines) so the processor can be given the
mask and the cache, and so modulation can stay per frame.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import WanTransformer3DModel
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.transformers.transformer_wan import WanAttnProcessor, _get_qkv_projections

ATTENTION_MODES = ("bidirectional", "block_causal")


@dataclass
class KVCache:
    """Keys/values of finished frames, one entry per transformer block, optionally a rolling window.

    Keys are kept *before* RoPE: positions are re-indexed inside the cache at every call (cached
    frames take positions `0 .. num_frames-1`, the new chunk follows), so a stream of any length never
    leaves the RoPE table and a bounded window means a bounded cost per chunk. Without eviction the
    positions equal the absolute frame indices, i.e. exactly a block-causal forward over all frames.

    Attributes:
        keys, values: per block, `[B, L_cached, heads, head_dim]` (keys after q/k-norm, before RoPE).
        num_frames: latent frames held (the RoPE offset of the next chunk).
        max_frames: window size in latent frames (`local_attn_frames`); None = keep everything.
            With block-causal attention it and `sink_frames` must be multiples of frames_per_chunk.
        sink_frames: the first frames of the video, always kept when the window rolls.
        seen_frames: frames ever written (absolute position of the next chunk).
    """

    keys: list = field(default_factory=list)
    values: list = field(default_factory=list)
    num_frames: int = 0
    max_frames: int | None = None
    sink_frames: int = 0
    seen_frames: int = 0

    def __post_init__(self):
        if self.max_frames is not None and not 0 <= self.sink_frames < self.max_frames:
            raise ValueError(f"sink_frames ({self.sink_frames}) must be < max_frames ({self.max_frames})")

    def __len__(self) -> int:
        return self.num_frames

    def evict(self, new_frames: int, tokens_per_frame: int, block_index: int) -> None:
        """Drop the oldest non-sink frames of one block's entry so it holds at most `max_frames`."""
        held = self.num_frames + new_frames
        if self.max_frames is None or held <= self.max_frames:
            return
        sink = self.sink_frames * tokens_per_frame
        recent = (self.max_frames - self.sink_frames) * tokens_per_frame
        for store in (self.keys, self.values):
            t = store[block_index]
            store[block_index] = torch.cat([t[:, :sink], t[:, t.shape[1] - recent:]], dim=1)


def _apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # Same real-valued rotation as diffusers' WanAttnProcessor (interleaved pairs).
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class CausalWanAttnProcessor(WanAttnProcessor):
    """Self-attention processor with an attention mask and an optional KV cache.

    Called as `attn(x, None, mask, rotary_emb, cache=..., block_index=..., write_cache=...)`.
    With a cache, the queries of the current chunk attend to `[cached keys, own keys]`; with
    `write_cache=True` the chunk's keys/values are appended after use (the chunk is then "finished").
    With `context_tokens=n` (and `context=(mask, rotary)` for them) the first n tokens are a finished
    chunk: they attend and are written first, then the remaining tokens attend to the updated cache
    with `attention_mask`/`rotary_emb` (two attention calls, one pass through the rest of the block).
    """

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None,
                 cache: KVCache | None = None, block_index: int = 0, write_cache: bool = False,
                 tokens_per_frame: int = 1, context_tokens: int = 0, context: tuple | None = None):
        if encoder_hidden_states is not None:  # cross-attention goes through the stock processor
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        n = context_tokens
        if n:
            ctx_out = self._attend(query[:, :n], key[:, :n], value[:, :n], *context, cache, block_index, True,
                                   tokens_per_frame)
            out = self._attend(query[:, n:], key[:, n:], value[:, n:], attention_mask, rotary_emb, cache, block_index,
                               write_cache, tokens_per_frame)
            out = torch.cat([ctx_out, out], dim=1)
        else:
            out = self._attend(query, key, value, attention_mask, rotary_emb, cache, block_index, write_cache,
                               tokens_per_frame)
        out = out.flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))

    def _attend(self, query, key, value, mask, rotary_emb, cache, block_index, write_cache, tokens_per_frame):
        """Attention of `query [B, Lq, heads, d]` over `[cached keys, key]` (RoPE over all key positions,
        the queries being the last ones); appends `key`/`value` to the cache when `write_cache`."""
        if cache is not None:
            if block_index < len(cache.keys):
                key = torch.cat([cache.keys[block_index], key], dim=1)
                value = torch.cat([cache.values[block_index], value], dim=1)
            if write_cache:
                if block_index < len(cache.keys):
                    cache.keys[block_index], cache.values[block_index] = key.detach(), value.detach()
                else:
                    cache.keys.append(key.detach())
                    cache.values.append(value.detach())
                cache.evict(query.shape[1] // tokens_per_frame, tokens_per_frame, block_index)
        if rotary_emb is not None:  # (cos, sin) over all key positions; the queries are the last ones
            cos, sin = rotary_emb
            lq = query.shape[1]
            query = _apply_rotary(query, cos[:, -lq:], sin[:, -lq:])
            key = _apply_rotary(key, cos, sin)
        return dispatch_attention_fn(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False,
                                     backend=self._attention_backend)


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


class CausalWanTransformer(WanTransformer3DModel):
    """`WanTransformer3DModel` with per-frame timesteps, block-causal attention and a KV cache.

    Constructor arguments and weights are exactly those of `WanTransformer3DModel`.
    """

    # Same signature as the parent (diffusers matches config.json keys against it in from_pretrained).
    @functools.wraps(WanTransformer3DModel.__init__)
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        for block in self.blocks:
            block.attn1.set_processor(CausalWanAttnProcessor())

    def _rope(self, num_frames: int, height: int, width: int, device):
        """RoPE (cos, sin) `[1, F*h*w, 1, head_dim]` for latent frames `0 .. num_frames-1`."""
        # diffusers' rope reads only the shape of its input; a meta tensor costs nothing.
        shape_only = torch.empty((1, 1, num_frames * self.config.patch_size[0], height, width), device="meta")
        cos, sin = self.rope(shape_only)
        return cos.to(device), sin.to(device)

    @staticmethod
    def _mask(offset: int, frames: int, cached: bool, frames_per_chunk: int, tokens_per_frame: int, device):
        """Block-causal mask of `frames` query frames starting at `offset` over the cache and themselves
        (None when every key is visible: plain attention, faster)."""
        q_frames = torch.arange(offset, offset + frames, device=device).repeat_interleave(tokens_per_frame)
        k_frames = torch.arange(0, offset + frames, device=device).repeat_interleave(tokens_per_frame)
        mask = block_causal_mask(q_frames, q_frames if not cached else k_frames, frames_per_chunk)
        return None if bool(mask.all()) else mask

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention: str = "block_causal",
        frames_per_chunk: int = 1,
        kv_cache: KVCache | None = None,
        write_cache: bool = False,
        context_frames: int = 0,
    ) -> torch.Tensor:
        """The network's prediction for every latent frame: the flow `ε - x0` for Wan checkpoints (our
        `Denoiser` also supports x0-predicting networks, see `sampling.Denoiser.prediction`).

        Args:
            hidden_states: `[B, C, F, H, W]` noisy latents (F latent frames of this call).
            timestep: `[B]` (one level for all frames) or `[B, F]` (per frame), in Wan units
                `1000·σ`.
            encoder_hidden_states: `[B, L, text_dim]` prompt embeddings.
            attention: "bidirectional" or "block_causal".
            frames_per_chunk: latent frames per causal chunk (block-causal mode).
            kv_cache: finished frames to attend to; this call's frames start at `len(kv_cache)`.
            write_cache: append this call's keys/values to `kv_cache` (the call's frames become context).
            context_frames: the first `context_frames` latent frames are a finished chunk (at its
                context level in `timestep`): they are written to `kv_cache` first and the other
                frames then attend to the updated cache. The result equals a `write_cache=True` call
                on those frames followed by a call on the rest, in one network pass (a streaming
                sampler makes one call fewer per chunk). Needs `kv_cache`, block-causal attention,
                whole chunks; not with `write_cache` or gradient checkpointing.
        Returns:
            `[B, C_out, F - context_frames, H, W]` flow prediction (the context frames' own output
            is dropped).
        """
        if attention not in ATTENTION_MODES:
            raise ValueError(f"attention must be one of {ATTENTION_MODES}, got {attention!r}")
        if hidden_states.ndim != 5:
            raise ValueError(f"hidden_states must be [B, C, F, H, W], got shape {tuple(hidden_states.shape)}")
        b, _, f, h, w = hidden_states.shape
        p_t, p_h, p_w = self.config.patch_size
        ppf, pph, ppw = f // p_t, h // p_h, w // p_w
        tokens_per_frame = pph * ppw
        if timestep.ndim == 1:
            timestep = timestep[:, None].expand(b, ppf)
        if timestep.shape != (b, ppf):
            raise ValueError(f"timestep must be [B] or [B, F]=[{b}, {ppf}], got {tuple(timestep.shape)}")
        offset = kv_cache.num_frames if kv_cache is not None else 0
        cf = context_frames // p_t
        if context_frames:
            if kv_cache is None or attention != "block_causal" or write_cache or context_frames % frames_per_chunk \
                    or not 0 < context_frames < f:
                raise ValueError(f"context_frames ({context_frames}) needs a kv_cache, block-causal attention, "
                                 f"write_cache=False and whole chunks ({frames_per_chunk} frames) before >= 1 frame")
            if torch.is_grad_enabled() and self.gradient_checkpointing:
                raise ValueError("context_frames cannot be used with gradient checkpointing")
        if kv_cache is not None and kv_cache.max_frames is not None and attention == "block_causal" and (
                kv_cache.max_frames % frames_per_chunk or kv_cache.sink_frames % frames_per_chunk):
            raise ValueError(f"a rolling window must hold whole chunks: max_frames ({kv_cache.max_frames}) and "
                             f"sink_frames ({kv_cache.sink_frames}) must be multiples of {frames_per_chunk}")

        # Frames after the context ones see the cache as the context write leaves it (rolled).
        offset_after = offset + cf if kv_cache is None or kv_cache.max_frames is None else \
            min(offset + cf, kv_cache.max_frames)
        if max(offset + cf, offset_after + ppf - cf) > self.config.rope_max_seq_len:
            raise ValueError(f"{offset_after + ppf - cf} latent frames in attention exceed rope_max_seq_len "
                             f"({self.config.rope_max_seq_len}); stream with a rolling KVCache(max_frames=...)")
        # keys: cached + this call's (non-context) frames
        rotary_emb = self._rope(offset_after + ppf - cf, h, w, hidden_states.device)
        x = self.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()  # [B, L, D]

        # Per-frame modulation: temb [B, F, D], timestep_proj [B, F, 6, D].
        temb, timestep_proj, context, _ = self.condition_embedder(
            timestep.flatten(), encoder_hidden_states, None, timestep_seq_len=ppf)
        timestep_proj = timestep_proj.unflatten(2, (6, -1))

        mask = None
        if attention == "block_causal":
            mask = self._mask(offset_after, ppf - cf, kv_cache is not None, frames_per_chunk, tokens_per_frame,
                              x.device)
        context_attn = None
        if cf:
            context_attn = (self._mask(offset, cf, True, frames_per_chunk, tokens_per_frame, x.device),
                            self._rope(offset + cf, h, w, hidden_states.device))

        checkpointing = torch.is_grad_enabled() and self.gradient_checkpointing
        cache = kv_cache
        if checkpointing and kv_cache is not None and not write_cache:
            # The backward pass recomputes these blocks after later chunks have changed the cache:
            # recompute against the entries this call saw (a shallow copy; entries are replaced, never
            # modified in place).
            cache = dataclasses.replace(kv_cache, keys=list(kv_cache.keys), values=list(kv_cache.values))
        for i, block in enumerate(self.blocks):
            attn_kwargs = dict(cache=cache, block_index=i, write_cache=write_cache,
                               tokens_per_frame=tokens_per_frame, context_tokens=cf * tokens_per_frame,
                               context=context_attn)
            if checkpointing:
                x = self._gradient_checkpointing_func(
                    _block_forward, block, x, context, timestep_proj, rotary_emb, mask, attn_kwargs, ppf)
            else:
                x = _block_forward(block, x, context, timestep_proj, rotary_emb, mask, attn_kwargs, ppf)
        if kv_cache is not None and (write_cache or cf):
            written = ppf if write_cache else cf
            kv_cache.seen_frames += written
            kv_cache.num_frames = min(kv_cache.num_frames + written, kv_cache.max_frames or 1 << 62)

        # Output modulation, per frame: [B, F, 1, D] broadcast over the frame's tokens.
        shift, scale = (self.scale_shift_table.unsqueeze(0) + temb[:, cf:].unsqueeze(2)).chunk(2, dim=2)
        x = x.unflatten(1, (ppf, tokens_per_frame))[:, cf:]
        x = (self.norm_out(x.float()) * (1 + scale) + shift).type_as(x)
        x = self.proj_out(x.flatten(1, 2))

        x = x.reshape(b, ppf - cf, pph, ppw, p_t, p_h, p_w, -1)
        out = x.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)
        return out


def _block_forward(block, x, context, timestep_proj, rotary_emb, mask, attn_kwargs, num_frames):
    """One `WanTransformerBlock` with per-frame modulation `timestep_proj [B, F, 6, D]`.

    Mirrors diffusers' block (adaLN self-attention, cross-attention, adaLN feed-forward) with the
    modulation broadcast per frame instead of per token, and the mask/cache passed to self-attention.
    """
    mod = (block.scale_shift_table.unsqueeze(0) + timestep_proj.float()).unsqueeze(3)  # [B, F, 6, 1, D]
    shift_msa, scale_msa, gate_msa, c_shift, c_scale, c_gate = mod.unbind(2)  # each [B, F, 1, D]

    def per_frame(t):  # [B, L, D] -> [B, F, T, D]
        return t.unflatten(1, (num_frames, -1))

    norm_x = (per_frame(block.norm1(x.float())) * (1 + scale_msa) + shift_msa).flatten(1, 2).type_as(x)
    attn_out = block.attn1(norm_x, None, mask, rotary_emb, **attn_kwargs)
    x = (per_frame(x.float()) + per_frame(attn_out) * gate_msa).flatten(1, 2).type_as(x)

    norm_x = block.norm2(x.float()).type_as(x)
    x = x + block.attn2(norm_x, context, None, None)

    norm_x = (per_frame(block.norm3(x.float())) * (1 + c_scale) + c_shift).flatten(1, 2).type_as(x)
    ff = block.ffn(norm_x)
    x = (per_frame(x.float()) + per_frame(ff.float()) * c_gate).flatten(1, 2).type_as(x)
    return x


def wan_config(model_cfg) -> dict:
    """`WanTransformer3DModel` constructor arguments of a `config.ModelConfig`."""
    return dict(patch_size=tuple(model_cfg.patch_size), num_attention_heads=model_cfg.num_attention_heads,
                attention_head_dim=model_cfg.attention_head_dim, in_channels=model_cfg.in_channels,
                out_channels=model_cfg.out_channels, text_dim=model_cfg.text_dim, freq_dim=model_cfg.freq_dim,
                ffn_dim=model_cfg.ffn_dim, num_layers=model_cfg.num_layers, cross_attn_norm=model_cfg.cross_attn_norm,
                rope_max_seq_len=model_cfg.rope_max_seq_len)


def build_transformer(model_cfg) -> CausalWanTransformer:
    """A randomly initialised `CausalWanTransformer` from `config.ModelConfig`, or the diffusers
    folder `model_cfg.pretrained` (a pipeline folder: its `transformer/`)."""
    if model_cfg.pretrained:
        path = Path(model_cfg.pretrained)
        if (path / "transformer" / "config.json").is_file():
            path = path / "transformer"
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model.pretrained: no diffusers transformer (config.json) at local path {path}")
        return CausalWanTransformer.from_pretrained(path)
    return CausalWanTransformer(**wan_config(model_cfg))
