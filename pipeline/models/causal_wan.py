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

import functools
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.utils.checkpoint
from torch.nn.attention import SDPBackend, sdpa_kernel
from diffusers import ModelMixin, WanTransformer3DModel  # noqa: F401 (ModelMixin: how DiffusionPipeline.from_pretrained
# finds the load method of a component class from this module, `CausalWanPipeline`)
from diffusers.models.transformers.transformer_wan import WanAttnProcessor, _get_qkv_projections

from pipeline.models.attention import attend, block_causal, block_causal_mask, check_backend, dispatch_backend  # noqa: F401

from pipeline.models.kv_cache import KVCache, StaticKVCache, StaticLayer, StaticPass, rope_at  # noqa: F401 (KVCache: re-exported)
from pipeline.models.kv_cache import apply_rotary as _apply_rotary

ATTENTION_MODES = ("bidirectional", "block_causal")


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
                 tokens_per_frame: int = 1, context_tokens: int = 0, context: tuple | None = None,
                 static_passes: tuple[StaticPass, ...] = ()):
        if encoder_hidden_states is not None:  # cross-attention goes through the stock processor
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        query, key, value = _get_qkv_projections(attn, hidden_states, None)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))
        n = context_tokens
        if static_passes:
            out = self._attend_static(query, key, value, cache, block_index, static_passes)
        elif n:
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

    def _attend_static(self, query, key, value, cache: StaticKVCache | StaticLayer, block_index: int, passes):
        """Attention through a `StaticKVCache` (or this block's `StaticLayer` of it): the call's tokens are split
        into `passes` (a fused context chunk, then the rest), each rotated once at its absolute positions,
        attending over the buffer."""
        outs, start = [], 0
        for p in passes:
            n = p.frames * cache.tokens_per_frame
            q = _apply_rotary(query[:, start:start + n], *p.rope)
            k = _apply_rotary(key[:, start:start + n], *p.rope)
            v = value[:, start:start + n]
            layer = cache if isinstance(cache, StaticLayer) else \
                cache.layer(block_index, k, p.held * cache.tokens_per_frame + n)
            keys, values = layer.attend_inputs(p, k, v)
            outs.append(attend(q, keys, values, p.mask, backend=self._attention_backend))
            layer.commit(p, k, v)
            start += n
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    def _attend(self, query, key, value, mask, rotary_emb, cache, block_index, write_cache, tokens_per_frame):
        """Attention of `query [B, Lq, heads, d]` over `[cached keys, key]` (RoPE over all key positions,
        the queries being the last ones); appends `key`/`value` to the cache when `write_cache`."""
        if cache is not None:
            new_key, new_value = key, value
            key, value = cache.read(block_index, key, value)
            if write_cache:  # after reading: this call still sees the frames the write evicts
                cache.write(block_index, new_key, new_value, tokens_per_frame)
        if rotary_emb is not None:  # (cos, sin) over all key positions; the queries are the last ones
            cos, sin = rotary_emb
            lq = query.shape[1]
            query = _apply_rotary(query, cos[:, -lq:], sin[:, -lq:])
            key = _apply_rotary(key, cos, sin)
        # `_attention_backend`: our `attention.BACKENDS` name (set by `set_attention_backend`; None = auto).
        return attend(query, key, value, mask, backend=self._attention_backend)


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
        self.attention_backend = "auto"

    def enable_gradient_checkpointing(self, gradient_checkpointing_func=None) -> None:
        """diffusers' gradient checkpointing, by default through `checkpoint_under_forward_kernels`."""
        super().enable_gradient_checkpointing(gradient_checkpointing_func or checkpoint_under_forward_kernels)

    def set_attention_backend(self, backend: str) -> None:
        """Choose how attention is computed: a name of `attention.BACKENDS` (auto, dense, flex, flash,
        cudnn, ...; `model.attention_backend` in the config).

        Replaces diffusers' method of the same name, which knows neither our masked path (dense or
        FlexAttention) nor our names, and also sets a process-wide default. Self-attention processors get
        the name; the stock cross-attention ones the diffusers backend of unmasked calls.

        Raises:
            ValueError: an unknown backend, or one whose package is not installed (one line).
        """
        try:
            name = check_backend(backend)
        except ValueError as e:
            raise ValueError(f"attention backend: {e}") from None
        for module in self.modules():
            processor = getattr(module, "processor", None)
            if isinstance(processor, CausalWanAttnProcessor):
                processor._attention_backend = None if name == "auto" else name  # None: diffusers' own default
            elif processor is not None and hasattr(processor, "_attention_backend"):
                processor._attention_backend = dispatch_backend(name)
        self.attention_backend = name

    def _rope(self, num_frames: int, height: int, width: int, device):
        """RoPE (cos, sin) `[1, F*h*w, 1, head_dim]` for latent frames `0 .. num_frames-1`."""
        # diffusers' rope reads only the shape of its input: an uninitialised one, on the device, where a
        # CPU-offloaded model's hooks can move it (a meta tensor cannot be moved)
        shape_only = torch.empty((1, 1, num_frames * self.config.patch_size[0], height, width), device=device)
        cos, sin = self.rope(shape_only)
        return cos.to(device), sin.to(device)

    @staticmethod
    def _mask(offset: int, frames: int, cached: bool, frames_per_chunk: int, tokens_per_frame: int, device):
        """Block-causal mask description (`attention.BlockCausalMask`) of `frames` query frames starting at
        `offset` over the cache and themselves (None when every key is visible: plain attention, faster).
        Only a description: each backend realises it (dense boolean mask, FlexAttention block mask) on the
        device of the attention call; `device` is unused."""
        return block_causal(q_offset=offset if cached else 0, q_frames=frames, frames_per_chunk=frames_per_chunk,
                            tokens_per_frame=tokens_per_frame)

    def _static_passes(self, cache: StaticKVCache, frames: int, context_frames: int, write_cache: bool,
                       attention: str, frames_per_chunk: int, pph: int, ppw: int, device) -> tuple:
        """The attention passes of one call over a `StaticKVCache` (the fused context chunk first), with
        their RoPE tables, masks and cache slots; advances the cache's frame counts."""
        tpf = pph * ppw

        def mask_fn(held, n):
            return self._mask(held, n, True, frames_per_chunk, tpf, device) if attention == "block_causal" else None

        kw = dict(mask_fn=mask_fn, pph=pph, ppw=ppw, rope_module=self.rope, device=device)
        passes = [cache.plan(context_frames, True, **kw)] if context_frames else []
        return (*passes, cache.plan(frames - context_frames, write_cache, **kw))

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
        features_at: int | None = None,
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
            features_at: return the hidden states after block `features_at` instead, `[B, F·T, D]` (T tokens
                per frame; the blocks after it are not run): the discriminator's features (DMD2 reads its
                classifier off the fake score's features).
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

        static = isinstance(kv_cache, StaticKVCache)
        if static and torch.is_grad_enabled():
            raise ValueError("a StaticKVCache is for inference (its buffers are written in place): use KVCache "
                             "when gradients flow")
        # Frames after the context ones see the cache as the context write leaves it (rolled).
        offset_after = offset + cf if kv_cache is None or kv_cache.max_frames is None else \
            min(offset + cf, kv_cache.max_frames)
        absolute = kv_cache is not None and kv_cache.rope == "absolute"
        if not (static or absolute) and max(offset + cf, offset_after + ppf - cf) > self.config.rope_max_seq_len:
            raise ValueError(f"{offset_after + ppf - cf} latent frames in attention exceed rope_max_seq_len "
                             f"({self.config.rope_max_seq_len}); stream with a rolling KVCache(max_frames=...)")
        # keys: cached + this call's (non-context) frames
        rotary_emb = static_passes = None
        if static:
            static_passes = self._static_passes(kv_cache, ppf, cf, write_cache, attention, frames_per_chunk,
                                                pph, ppw, hidden_states.device)
        elif absolute:  # cached frames at their absolute indices: sinks, then the window shifted by evictions
            shift = kv_cache.seen_frames + cf - offset_after
            rotary_emb = rope_at(self.rope, _key_positions(offset_after, ppf - cf, shift, kv_cache.sink_frames),
                                 pph, ppw)
        else:
            rotary_emb = self._rope(offset_after + ppf - cf, h, w, hidden_states.device)
        device = hidden_states.device
        mask = None
        if attention == "block_causal" and not static:
            mask = self._mask(offset_after, ppf - cf, kv_cache is not None, frames_per_chunk, tokens_per_frame, device)
        context_attn = None
        if cf and not static:
            ctx_rope = self._rope(offset + cf, h, w, device) if not absolute else rope_at(
                self.rope, _key_positions(offset, cf, kv_cache.seen_frames - offset, kv_cache.sink_frames), pph, ppw)
            context_attn = (self._mask(offset, cf, True, frames_per_chunk, tokens_per_frame, device), ctx_rope)

        checkpointing = torch.is_grad_enabled() and self.gradient_checkpointing
        cache = kv_cache
        if checkpointing and kv_cache is not None and not write_cache:
            # The backward pass recomputes these blocks after later chunks have changed the cache:
            # recompute against the entries this call saw (a shallow copy; entries are replaced, never
            # modified in place).
            cache = kv_cache.snapshot()
        denoise = self._denoise
        if static and kv_cache.pool is not None and not kv_cache.keys:  # a new stream's first call: a freed stream's
            # buffers (then it too can run compiled)
            # the keys' dtype: autocast's, else the key projection's (RMSNorm and RoPE keep their input's dtype)
            autocast = torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type)
            dtype = torch.get_autocast_dtype(device.type) if autocast else self.blocks[0].attn1.to_k.weight.dtype
            kv_cache.adopt_pooled(static_passes, blocks=len(self.blocks), batch=b, device=device, dtype=dtype,
                                  heads=self.config.num_attention_heads, head_dim=self.config.attention_head_dim)
        if static and self._steady_step is not None and kv_cache.compiled_call(static_passes):
            denoise = self._steady_step  # the window is full (or empty): every call of this kind has the same shapes
            # One call, one CUDA-graph step: its block graphs chain (block i's output feeds block i + 1 inside one
            # generation of torch's CUDA-graph trees; else each compiled block call would start a generation and
            # free the previous block's output before reading it); the last call's outputs are released.
            torch.compiler.cudagraph_mark_step_begin()
        if features_at is not None and (static or cf or not 0 <= features_at < len(self.blocks)):
            raise ValueError(f"features_at={features_at}: a block index below {len(self.blocks)}, on a call "
                             "without a static cache or context frames")
        out = denoise(hidden_states, timestep, encoder_hidden_states, rotary_emb, mask, context_attn,
                      static_passes or (), cache, write_cache, cf, *(() if features_at is None else (features_at,)))
        if kv_cache is not None and not static and (write_cache or cf):
            written = ppf if write_cache else cf
            kv_cache.seen_frames += written
            kv_cache.num_frames = min(kv_cache.num_frames + written, kv_cache.max_frames or 1 << 62)
        return out

    def compile_steady_state(self, mode: str | None = None, scope: str = "blocks") -> None:
        """Compile the network pass that streaming calls make once a `StaticKVCache` window is full.

        From then on every call of a kind (the fused context + chunk call, a denoising call, a cache
        write) has the same shapes, and everything that changes between calls (RoPE tables, cache
        slots) arrives as tensors prepared outside it, so `torch.compile` traces it once per kind. The
        first chunk's calls (over an empty cache) are compiled too: every stream repeats them (its very first
        call too where the cache's `BufferPool` holds a freed stream's buffers: `StaticKVCache.adopt_pooled`).
        `mode`: torch.compile's; default "reduce-overhead" on CUDA (CUDA-graph capture; the cache
        buffers are marked static addresses), None elsewhere. Other calls run eagerly.
        `scope`: "blocks" (regional compilation: one transformer block is compiled and serves all of
        them, each getting its own weights and cache buffers as inputs: a kind compiles one block instead
        of the whole network, ~1/num_layers of the compile time; the embeddings and head run eagerly; with
        "reduce-overhead" each block call replays its own CUDA graph) or "full" (the whole pass, one graph).
        """
        if scope not in ("blocks", "full"):
            raise ValueError(f"scope must be 'blocks' or 'full', got {scope!r}")
        if mode is None and next(self.parameters()).device.type == "cuda":
            mode = "reduce-overhead"
        # Kinds x batch sizes x models share the compiled function's cache: room past Dynamo's default of 8,
        # beyond which calls would silently run eagerly.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        if scope == "full":
            compiled = torch.compile(self._denoise, mode=mode, dynamic=False)
            # its output is the CUDA graph's own buffer, which the next call's replay overwrites: a sampler may
            # keep it (an x0 prediction, unclipped) across calls
            self._steady_step = lambda *args: compiled(*args).clone()
        else:
            self._steady_step = functools.partial(
                self._denoise, steady_block=torch.compile(_block_forward, mode=mode, dynamic=False))

    _steady_step = None

    def _denoise(self, hidden_states, timestep, encoder_hidden_states, rotary_emb, mask, context_attn, static_passes,
                 cache, write_cache: bool, cf: int, features_at: int | None = None, *,
                 steady_block=None) -> torch.Tensor:
        """The network pass of `forward` once positions, masks and cache slots are prepared: patch
        embedding, per-frame modulation, the blocks, the output head. Shapes as `forward`.
        `steady_block`: the compiled `_block_forward` of `compile_steady_state(scope="blocks")`."""
        b, _, f, h, w = hidden_states.shape
        p_t, p_h, p_w = self.config.patch_size
        ppf, pph, ppw = f // p_t, h // p_h, w // p_w
        tokens_per_frame = pph * ppw
        checkpointing = torch.is_grad_enabled() and self.gradient_checkpointing
        x = self.patch_embedding(hidden_states).flatten(2).transpose(1, 2).contiguous()  # [B, L, D]

        # Per-frame modulation: temb [B, F, D], timestep_proj [B, F, 6, D].
        temb, timestep_proj, context, _ = self.condition_embedder(
            timestep.flatten(), encoder_hidden_states, None, timestep_seq_len=ppf)
        timestep_proj = timestep_proj.unflatten(2, (6, -1))
        # A model trained with checkpointing caches no bf16 casts of its blocks' weights, in its gradient-free
        # calls too (the rollout's steps before its exit): see `checkpoint_under_forward_kernels`. (Not inside a
        # compiled step: a streaming model, which trains no longer.)
        uncached = self.gradient_checkpointing and not torch.compiler.is_compiling()
        with _BlockContext() if uncached else nullcontext():
            for i, block in enumerate(self.blocks):
                # The compiled block gets the block's cache buffers, not its index (it would specialise on it).
                block_cache, index = (cache, i) if steady_block is None else (cache.layer(i), 0)
                attn_kwargs = dict(cache=block_cache, block_index=index, write_cache=write_cache,
                                   tokens_per_frame=tokens_per_frame, context_tokens=cf * tokens_per_frame,
                                   context=context_attn, static_passes=static_passes)
                if checkpointing:
                    x = self._gradient_checkpointing_func(
                        _block_forward, block, x, context, timestep_proj, rotary_emb, mask, attn_kwargs, ppf)
                else:
                    x = (steady_block or _block_forward)(block, x, context, timestep_proj, rotary_emb, mask,
                                                         attn_kwargs, ppf)
                if i == features_at:
                    return x

        # Output modulation, per frame: [B, F, 1, D] broadcast over the frame's tokens.
        shift, scale = (self.scale_shift_table.unsqueeze(0) + temb[:, cf:].unsqueeze(2)).chunk(2, dim=2)
        x = x.unflatten(1, (ppf, tokens_per_frame))[:, cf:]
        x = (self.norm_out(x.float()) * (1 + scale) + shift).type_as(x)
        x = self.proj_out(x.flatten(1, 2))

        x = x.reshape(b, ppf - cf, pph, ppw, p_t, p_h, p_w, -1)
        out = x.permute(0, 7, 1, 4, 2, 5, 3, 6).flatten(6, 7).flatten(4, 5).flatten(2, 3)
        return out


def _sdpa_kernels() -> list[SDPBackend]:
    """The SDPA kernels enabled now (`sdpa_kernel` sets these flags)."""
    enabled = {SDPBackend.FLASH_ATTENTION: torch.backends.cuda.flash_sdp_enabled(),
               SDPBackend.EFFICIENT_ATTENTION: torch.backends.cuda.mem_efficient_sdp_enabled(),
               SDPBackend.CUDNN_ATTENTION: torch.backends.cuda.cudnn_sdp_enabled(),
               SDPBackend.MATH: torch.backends.cuda.math_sdp_enabled(),
               # (other devices' kernels: no public getter; entering `sdpa_kernel` without it would turn it off)
               SDPBackend.OVERRIDEABLE: getattr(torch._C, "_get_overrideable_sdp_enabled", lambda: False)()}
    return [k for k, on in enabled.items() if on]


def checkpoint_under_forward_kernels(function, *args):
    """diffusers' default checkpointing (non-reentrant `torch.utils.checkpoint`), whose recomputation in the
    backward runs under the SDPA kernels the forward ran under. A pass that picks a kernel (the GAN's R1 pass:
    SDPA's math kernel, the only one with a double backward) would otherwise recompute with another, which
    saves other tensors (a `CheckpointError`) and has no double backward.

    The block runs with autocast's cast cache off (the forward: the blocks loop's `_BlockContext`; the
    recomputation: its context here): the recomputation casts its
    weights again anyway (the step's autocast, and its cache, ended with the forward), so caching the forward's
    casts only held 2 bytes per block weight until the forward ended (2.6 GiB at Wan2.1-1.3B, at the
    sf_dmd generator update's peak). A block called several times with gradients in one step (the rollout's
    exit calls) now sums its weights' gradients over the calls in fp32, where one shared cached cast summed them
    in bf16. The weights outside the blocks stay cached (one copy shared by the calls)."""
    return torch.utils.checkpoint.checkpoint(function, *args, use_reentrant=False,
                                             context_fn=lambda: (nullcontext(), _BlockContext(_sdpa_kernels())))


class _BlockContext:
    """autocast caching no weight casts, and `sdpa_kernel(kernels)` if given; can be entered again (a
    recomputation runs once per backward pass through it: R1's inner gradient, then the loss's)."""

    def __init__(self, kernels: list[SDPBackend] | None = None):
        self.kernels, self.held = kernels, []

    def __enter__(self):
        kernels = sdpa_kernel(self.kernels) if self.kernels is not None else nullcontext()
        self.held.append((kernels, torch.is_autocast_cache_enabled()))
        torch.set_autocast_cache_enabled(False)
        kernels.__enter__()

    def __exit__(self, *exc):
        kernels, cache = self.held.pop()
        torch.set_autocast_cache_enabled(cache)
        return kernels.__exit__(*exc)


def _key_positions(held: int, new: int, shift: int, sinks: int) -> torch.Tensor:
    """Absolute frame index of every key frame `[held + new]`: the cache's frames (the first `sinks` at
    their own index, the window `shift` frames later than its place) then the `new` ones."""
    pos = torch.arange(held + new)
    pos[sinks:] += shift
    return pos


def _block_forward(block, x, context, timestep_proj, rotary_emb, mask, attn_kwargs, num_frames):
    """One `WanTransformerBlock` with per-frame modulation `timestep_proj [B, F, 6, D]`.

    Mirrors diffusers' block (adaLN self-attention, cross-attention, adaLN feed-forward) with the
    modulation broadcast per frame instead of per token, and the mask/cache passed to self-attention.
    """
    # A block of a model under accelerate's `cpu_offload` (distill.teacher_offload) gets its own weights
    # (the modulation table; its submodules fetch theirs) from its hook, which `block.forward` would run.
    hook = getattr(block, "_hf_hook", None)
    if hook is not None:
        hook.pre_forward(block)
    x = _block_body(block, x, context, timestep_proj, rotary_emb, mask, attn_kwargs, num_frames)
    return x if hook is None else hook.post_forward(block, x)


def _block_body(block, x, context, timestep_proj, rotary_emb, mask, attn_kwargs, num_frames):
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
    folder `model_cfg.pretrained` (a pipeline folder: its `transformer/`), attending with
    `model_cfg.attention_backend`."""
    if model_cfg.pretrained:
        path = Path(model_cfg.pretrained)
        if (path / "transformer" / "config.json").is_file():
            path = path / "transformer"
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"model.pretrained: no diffusers transformer (config.json) at local path {path}")
        model = CausalWanTransformer.from_pretrained(path)
    else:
        model = CausalWanTransformer(**wan_config(model_cfg))
    model.set_attention_backend(getattr(model_cfg, "attention_backend", "auto"))
    return model
