"""Samplers: many-step Euler ODE with classifier-free guidance, synchronous or chunk-wise autoregressive.

Guidance combines the two flow predictions as `v = v_uncond + w·(v_cond - v_uncond)` (w = 1: no
guidance, the conditional flow alone). An Euler step from level σ_i to σ_{i+1} is
`x ← x + (σ_{i+1} - σ_i)·v` (σ decreases, so this moves against the flow `ε - x0`).

- `sample_synchronous`: all frames share one level and are denoised together (the BiD diagonal).
- `sample_autoregressive`: chunk after chunk; each chunk is denoised from pure noise while attending
  to the KV cache of finished chunks, then re-encoded at the context noise level `context_sigma`
  (0 = clean context, Teacher-Forcing corner) and appended to the cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from pipeline.data import shard
from pipeline.models.causal_wan import CausalWanTransformer, KVCache
from pipeline.models.kv_cache import BufferPool, StaticKVCache, new_kv_cache
from pipeline.diffusion.flow import (NUM_TRAIN_TIMESTEPS, add_noise, flow_from_x0, sampling_sigmas, shift_sigma, timestep_from_sigma,
                   x0_from_flow)

SIGMA_MIN = 1e-3  # flows from x0 predictions divide by σ


@dataclass
class Denoiser:
    """A transformer with its attention pattern: maps (x_σ, σ per frame, prompt) → flow `ε - x0`.

    Args:
        model: the backbone.
        attention: "bidirectional" or "block_causal".
        frames_per_chunk: latent frames per causal chunk.
        prediction: what the network outputs: "flow" (`ε - x0`, Wan's own) or "x0" (the clean
            latents; converted here to the flow `(x_σ - x̂0)/σ` so every caller sees flows).
        clip_x0: clamp x̂0 to [-clip_x0, clip_x0] (known data range; 0 = off).
        rope: RoPE positions of cached frames, "relative" or "absolute" (see `kv_cache.py`).
        kv_cache: the streaming cache, "static", "dynamic" or "auto" (`kv_cache.new_kv_cache`).
    """

    model: CausalWanTransformer
    attention: str = "block_causal"
    frames_per_chunk: int = 1
    prediction: str = "flow"
    clip_x0: float = 0.0
    rope: str = "relative"
    kv_cache: str = "auto"
    # Where this denoiser's static caches take their buffers and leave them when gone, for its next streams
    # (`kv_cache.BufferPool`; samplers of several streams). None in training: a pool would hold a cache's
    # memory between the steps.
    pool: BufferPool | None = None

    @classmethod
    def of_sampler(cls, model, attention: str, frames_per_chunk: int, prediction: str, sampler) -> "Denoiser":
        """A denoiser as a sampler's settings configure it: `sampler` is a `StudentConfig`, a `SamplerConfig` or
        the pipeline scheduler's config (their `clip_x0`, `rope`, `kv_cache`); its static caches share a
        `BufferPool` (consecutive streams on the same buffers)."""
        return cls(model, attention, frames_per_chunk, prediction, sampler.clip_x0, rope=sampler.rope,
                   kv_cache=sampler.kv_cache, pool=BufferPool())

    def new_cache(self, max_frames: int | None = None, sink_frames: int = 0) -> KVCache | StaticKVCache:
        """An empty KV cache for one stream of this denoiser (kind and RoPE semantics as configured)."""
        device = next(self.model.parameters()).device
        return new_kv_cache(self.kv_cache, max_frames=max_frames, sink_frames=sink_frames, rope=self.rope,
                            device=device, pool=self.pool)

    def raw(self, x, sigma, context, kv_cache=None, write_cache=False, cache_first=None) -> torch.Tensor:
        """The network's own output (flow or x0, by `prediction`).

        `cache_first=(x_ctx [B, C, Fc, H, W], σ_ctx [B, Fc])`: a finished chunk written to `kv_cache`
        in the same network call, before `x` attends to it (see `CausalWanTransformer.forward`'s
        `context_frames`)."""
        t = timestep_from_sigma(sigma)
        n = 0
        if cache_first is not None:
            x_ctx, s_ctx = cache_first
            t = torch.cat([timestep_from_sigma(s_ctx), t if t.ndim == 2 else t[:, None].expand(-1, x.shape[2])], 1)
            x, n = torch.cat([x_ctx, x], dim=2), x_ctx.shape[2]
        return self.model(x, t, context, attention=self.attention, frames_per_chunk=self.frames_per_chunk,
                          kv_cache=kv_cache, write_cache=write_cache, context_frames=n)

    def predict_x0(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor,
                   kv_cache: KVCache | None = None, write_cache: bool = False, cache_first=None) -> torch.Tensor:
        """The clean-latent prediction `x̂0 [B, C, F, H, W]` (clamped by `clip_x0`); shapes as `__call__`,
        `cache_first` as in `raw`."""
        out = self.raw(x, sigma, context, kv_cache, write_cache, cache_first)
        x0 = out if self.prediction == "x0" else x0_from_flow(x, out, sigma)
        return x0.clamp(-self.clip_x0, self.clip_x0) if self.clip_x0 else x0

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor,
                 kv_cache: KVCache | None = None, write_cache: bool = False) -> torch.Tensor:
        """x `[B, C, F, H, W]`, σ `[B, F]` or `[B]`, context `[B, L, D]` → flow `[B, C, F, H, W]`."""
        if self.prediction == "flow" and not self.clip_x0:
            return self.raw(x, sigma, context, kv_cache, write_cache)
        x0 = self.predict_x0(x, sigma, context, kv_cache, write_cache)
        if sigma.ndim == 1:
            sigma = sigma[:, None].expand(x.shape[0], x.shape[2])
        return flow_from_x0(x, x0, sigma.clamp_min(SIGMA_MIN))


def guided_flow(denoiser: Denoiser, x, sigma, cond, uncond, guidance: float, kv_cache=None, write_cache=False):
    """Classifier-free guided flow `v_u + w·(v_c - v_u)`; one batched call of size 2B.

    With guidance, `kv_cache` holds 2B rows (conditional first, then unconditional).
    """
    if guidance == 1.0 or uncond is None:
        return denoiser(x, sigma, cond, kv_cache, write_cache)
    out = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([cond, uncond]), kv_cache, write_cache)
    v_cond, v_uncond = out.chunk(2)
    return v_uncond + guidance * (v_cond - v_uncond)


def staggered_levels(sigmas: torch.Tensor, frames: int, lag: int = 0) -> torch.Tensor:
    """Per-frame noise levels of every Euler iteration, `[I + 1, frames]`.

    Frame j follows the schedule `sigmas` delayed by `j·lag` iterations (Diffusion-Forcing style:
    a frame commits a little after the one before it, which it can attend to at lower noise).
    `lag = 0` is the synchronous schedule. `I = steps + (frames - 1)·lag` model calls.
    """
    steps = len(sigmas) - 1
    it = torch.arange(steps + (frames - 1) * lag + 1)[:, None] - lag * torch.arange(frames)[None, :]
    return sigmas[it.clamp(0, steps)]


def _euler(denoiser, x, cond, uncond, guidance, sigmas, kv_cache=None, lag: int = 0, keep: tuple[int, ...] = ()):
    """Euler steps `x ← x + (σ_{i+1} - σ_i)·v` with per-frame levels (see `staggered_levels`).

    `keep`: indices into `sigmas`; with it, also returns the states every frame had when it stood at
    those levels, `[len(keep), B, C, F, H, W]` (with a lag, frame j gets there `j·lag` iterations late).
    """
    b, f = x.shape[0], x.shape[2]
    levels = staggered_levels(sigmas, f, lag).to(x.device)
    states = x.new_zeros(len(keep), *x.shape) if keep else None
    for i in range(len(levels)):
        for slot, m in enumerate(keep):
            for j in range(f):
                if i - j * lag == m:  # later, frame j's level stays put: this state is final
                    states[slot, :, :, j] = x[:, :, j]
        if i == len(levels) - 1:
            break
        sigma = levels[i][None].expand(b, f)
        v = guided_flow(denoiser, x, sigma, cond, uncond, guidance, kv_cache)
        x = x + (levels[i + 1] - levels[i])[None, None, :, None, None] * v
    return (x, states) if keep else x


def _as_context(x: torch.Tensor, context_sigma: float, generator: torch.Generator | None):
    """A finished chunk `[B, C, fpc, H, W]` as cache context: re-noised to `context_sigma` (0 = clean)."""
    sigma = torch.full((x.shape[0], x.shape[2]), float(context_sigma), device=x.device)
    if context_sigma == 0:
        return x, sigma
    return add_noise(x, _noise(x, generator), sigma), sigma


def _noise(like: torch.Tensor, generator) -> torch.Tensor:
    """Standard normal noise shaped and placed like `like`, drawn from `generator`: on the device itself
    when the generator lives there (no host copy inside a chunk), else drawn where it lives and moved."""
    gen = shard.base(generator)
    if gen is not None and gen.device.type == like.device.type:
        return shard.randn(like.shape, generator, device=like.device)
    return shard.randn(like.shape, generator).to(like.device)


def _chunked(denoiser: Denoiser, noise: torch.Tensor) -> tuple[int, int, int]:
    """`(frames_per_chunk, B, F)` of `noise [B, C, F, H, W]`, F a whole number of chunks."""
    fpc, (b, f) = denoiser.frames_per_chunk, (noise.shape[0], noise.shape[2])
    if f % fpc:
        raise ValueError(f"frames ({f}) must be a multiple of frames_per_chunk ({fpc})")
    return fpc, b, f


def prompt_at(cond: torch.Tensor, switches, start: int) -> torch.Tensor:
    """The prompt in force for the chunk starting at frame `start`: `cond`, or the last of `switches`
    `[(K, cond_K [B, L, D]), ...]` (K increasing) with `K <= start` (a switch inside a chunk takes effect at
    the next chunk: the chunk in progress keeps its prompt, SPRITES.md "Switched videos")."""
    for k, c in switches:
        if k <= start:
            cond = c
    return cond


def check_switches(switches, frames: int) -> list:
    """`switches` as a list `[(K, cond), ...]`, its frames increasing inside `(0, frames)`."""
    switches = [(int(k), c) for k, c in switches]
    ks = [k for k, _ in switches]
    if any(not 0 < k < frames for k in ks) or ks != sorted(set(ks)):
        raise ValueError(f"prompt switches must be at increasing frames in 1..{frames - 1}, got {ks}")
    return switches


class ContextWindow:
    """The finished chunks a KV cache holds, kept as model inputs so the cache can be rebuilt under another
    prompt (LongLive's KV re-cache on a prompt switch): the sink chunks and the last window's chunks.

    `add(start, ctx)`: chunk at absolute frame `start`, `ctx = (x [B, C, fpc, H, W], σ [B, fpc])` as written.
    `rebuild(write, cache)`: an empty cache filled again chunk by chunk, oldest first, by `write(ctx, cache)`
    (one network call each, under the caller's new prompt); each chunk is written at its own absolute frame
    (`seen_frames`), so relative and absolute RoPE caches both hold the positions the stream gave them. The
    first window chunk attends to the sinks only, not to the evicted chunks before it (as LongLive's)."""

    def __init__(self, max_frames: int | None, sink_frames: int):
        self.max_frames, self.sink_frames = max_frames, sink_frames
        self.chunks: list[tuple[int, tuple]] = []

    def add(self, start: int, ctx: tuple) -> None:
        self.chunks.append((start, ctx))
        if self.max_frames is not None:
            end = start + ctx[0].shape[2]
            recent = end - (self.max_frames - self.sink_frames)
            self.chunks = [(a, c) for a, c in self.chunks if a < self.sink_frames or a >= recent]

    def rebuild(self, write, cache):
        for a, ctx in self.chunks:
            cache.seen_frames = a
            write(ctx, cache)
        return cache


def schedule_through(sigmas: torch.Tensor, stops: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Insert the levels `stops` into a decreasing schedule so an Euler path lands exactly on them.

    Returns the merged schedule `[S']` and the index of every stop in it (used to record a teacher's
    ODE states at a student's levels; the clean end σ=0 is always the last entry).
    """
    merged = torch.cat([sigmas.double(), stops.double()]).unique().flip(0)  # unique sorts ascending
    merged = merged[torch.cat([torch.tensor([True]), merged[:-1] - merged[1:] > 1e-6])]  # drop near-duplicates
    idx = tuple(int((merged - s).abs().argmin()) for s in stops.double())
    return merged.float(), idx


@torch.no_grad()
def sample_synchronous(denoiser: Denoiser, noise: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor | None, *,
                       steps: int = 32, guidance: float = 1.0, shift: float = 1.0,
                       keep_sigmas: torch.Tensor | None = None):
    """Denoise all frames together with a shared level.

    Args:
        noise: `[B, C, F, H, W]` starting noise.
        cond, uncond: `[B, L, D]` prompt embeddings (uncond: the null prompt, for guidance).
        keep_sigmas: as in `sample_autoregressive`.
    Returns:
        `[B, C, F, H, W]` samples (with `keep_sigmas`, also the states `[K, B, C, F, H, W]`).
    """
    sigmas, keep = sampling_sigmas(steps, shift), ()
    if keep_sigmas is not None:
        sigmas, keep = schedule_through(sigmas, keep_sigmas)
    return _euler(denoiser, noise, cond, uncond, guidance, sigmas, keep=keep)


@torch.no_grad()
def sample_autoregressive(denoiser: Denoiser, noise: torch.Tensor, cond: torch.Tensor,
                          uncond: torch.Tensor | None, *, steps: int = 32, guidance: float = 1.0,
                          shift: float = 1.0, context_sigma: float = 0.0,
                          generator: torch.Generator | None = None, lag: int = 0,
                          max_context_frames: int | None = None, sink_frames: int = 0,
                          keep_sigmas: torch.Tensor | None = None,
                          on_chunk: Callable[[int, torch.Tensor], None] | None = None,
                          switches=(), recache: bool = False):
    """Chunk-wise autoregressive sampling with a KV cache.

    Args:
        noise: `[B, C, F, H, W]` starting noise; F a multiple of `denoiser.frames_per_chunk`.
        steps: Euler steps per chunk.
        context_sigma: noise level at which finished chunks are written to the cache.
        generator: draws the context re-noising (only used when context_sigma > 0).
        lag: within a chunk, frame j starts `j·lag` Euler iterations after frame 0 (0 = synchronous).
        max_context_frames, sink_frames: a rolling KV window (None = attend to every finished frame).
        keep_sigmas: `[K]` levels to record the ODE path at (inserted into the schedule, see
            `schedule_through`); a student's few-step levels, for ODE-pair regression.
        on_chunk: called as `on_chunk(index, chunk [B, C, fpc, H, W])` when a chunk is finished.
        switches: prompt switches `[(K, cond_K [B, L, D]), ...]`: from the first chunk starting at or after
            frame K, `cond_K` conditions the video (`prompt_at`; the null prompt stays `uncond`).
        recache: on a switch, rebuild the KV window under the new prompt (`ContextWindow`); else keep it.
    Returns:
        `[B, C, F, H, W]` samples; with `keep_sigmas` also the states `[K, B, C, F, H, W]` at those levels.
    """
    fpc, _, f = _chunked(denoiser, noise)
    sigmas, keep = sampling_sigmas(steps, shift), ()
    if keep_sigmas is not None:
        sigmas, keep = schedule_through(sigmas, keep_sigmas)
    switches = check_switches(switches, f)
    cache = denoiser.new_cache(max_context_frames, sink_frames)
    window = ContextWindow(max_context_frames, sink_frames) if recache and switches else None
    chunks, kept, prompt = [], [], cond
    for start in range(0, f, fpc):
        now = prompt_at(cond, switches, start)
        if now is not prompt and window is not None:
            cache = window.rebuild(lambda ctx, kv: guided_flow(denoiser, *ctx, now, uncond, guidance, kv,
                                                               write_cache=True),
                                   denoiser.new_cache(max_context_frames, sink_frames))
        prompt = now
        x = _euler(denoiser, noise[:, :, start:start + fpc], prompt, uncond, guidance, sigmas, cache, lag, keep)
        if keep:
            x, states = x
            kept.append(states)
        chunks.append(x)
        if on_chunk is not None:
            on_chunk(start // fpc, x)
        if start + fpc < f:  # the last chunk is never context
            ctx = _as_context(x, context_sigma, generator)
            guided_flow(denoiser, *ctx, prompt, uncond, guidance, cache, write_cache=True)
            if window is not None:
                window.add(start, ctx)
    out = torch.cat(chunks, dim=2)
    return (out, torch.cat(kept, dim=3)) if keep else out


@torch.no_grad()
def generate(denoiser: Denoiser, cond: torch.Tensor, uncond: torch.Tensor, latent_shape: tuple, *,
             kind: str = "autoregressive", steps: int = 32, guidance: float = 1.0, shift: float = 1.0, context_sigma: float = 0.0,
             seed: int = 0, batch_size: int = 64, lag: int = 0, max_context_frames: int | None = None,
             sink_frames: int = 0, on_chunk: Callable[[int, torch.Tensor], None] | None = None,
             switches=(), recache: bool = False) -> torch.Tensor:
    """Sample `len(cond)` videos in batches with seeded noise.

    Args:
        cond, uncond: `[N, L, D]` prompt embeddings.
        latent_shape: `(C, F, H, W)` of one video.
        kind: "autoregressive" or "synchronous".
        on_chunk: per finished chunk, as in `sample_autoregressive` (synchronous: once, the whole video).
        switches, recache: prompt switches `[(K, cond_K [N, L, D]), ...]` and what the cache does at them
            (`sample_autoregressive`; a synchronous sampler has no chunks to switch between).
    Returns:
        `[N, C, F, H, W]` latents (for sprites: pixels in the model layout).
    """
    def sample(noise, sl, gen):
        c, u = cond[sl].to(noise.device), uncond[sl].to(noise.device)
        sw = [(k, ck[sl].to(noise.device)) for k, ck in switches]
        if kind == "synchronous":
            if switches:
                raise ValueError("prompt switches need a chunk-wise sampler (autoregressive), not synchronous")
            out = sample_synchronous(denoiser, noise, c, u, steps=steps, guidance=guidance, shift=shift)
            if on_chunk is not None:
                on_chunk(0, out)
            return out
        if kind == "autoregressive":
            return sample_autoregressive(denoiser, noise, c, u, steps=steps, guidance=guidance, shift=shift,
                                         context_sigma=context_sigma, generator=gen, lag=lag,
                                         max_context_frames=max_context_frames, sink_frames=sink_frames,
                                         on_chunk=on_chunk, switches=sw, recache=recache)
        raise ValueError(f"unknown sampler {kind!r} (autoregressive, synchronous)")

    return _in_batches(denoiser, len(cond), latent_shape, seed, batch_size, sample)


def _in_batches(denoiser: Denoiser, n: int, latent_shape: tuple, seed: int, batch_size: int, sample) -> torch.Tensor:
    """Draw the noise of `n` videos from `seed` at once (so a video's noise does not depend on the batch
    size), then `sample(noise [b, ...] on the model's device, slice, generator)` batch by batch.

    The generator handed on (re-noising inside the sampler) is the CPU one on a CPU; on an accelerator
    it is a generator on that device seeded from the CPU one, so no draw inside a chunk waits on the host.
    """
    device = next(denoiser.model.parameters()).device
    noise, step_gen = seeded_noise(n, latent_shape, torch.Generator().manual_seed(seed), device)
    out = []
    for i in range(0, n, batch_size):
        sl = slice(i, i + batch_size)
        out.append(sample(noise[sl].to(device), sl, step_gen).cpu())
    return torch.cat(out)


def seeded_noise(n: int, latent_shape: tuple, generator: torch.Generator, device: torch.device
                 ) -> tuple[torch.Tensor, torch.Generator]:
    """The starting noise of `n` videos, `[n, *latent_shape]` on the CPU, drawn from the CPU `generator` at once,
    and the generator the sampler re-noises with: `generator` itself on a CPU, else one on `device` seeded from
    it (no draw inside a chunk waits on the host). `generate` and `CausalWanPipeline` (`generator=`) share it,
    so `seed=S` and `generator=torch.Generator().manual_seed(S)` give the same videos."""
    if generator.device.type != "cpu":
        raise ValueError(f"the noise generator must be a CPU torch.Generator (got one on {generator.device}): "
                         "videos then do not depend on the device they are sampled on")
    noise = torch.randn((n, *latent_shape), generator=generator)
    if torch.device(device).type == "cpu":
        return noise, generator
    return noise, torch.Generator(device=device).manual_seed(int(torch.randint(0, 2 ** 62, (1,), generator=generator)))


def uniform_denoising_steps(k: int) -> list[int]:
    """`k` evenly spaced timesteps from 1000 down (k = 4: `[1000, 750, 500, 250]`)."""
    if k < 1:
        raise ValueError(f"a student needs at least one denoising step, got {k}")
    return [round(NUM_TRAIN_TIMESTEPS * (1 - i / k)) for i in range(k)]


def few_step_sigmas(denoising_steps=(1000, 750, 500, 250), shift: float = 5.0) -> torch.Tensor:
    """A student's few-step schedule, warped by the flow shift as Self-Forcing does.

    Each step `t` (in Wan's 0..1000 units) maps to `σ = shift_sigma(t / 1000, shift)`; with shift 5,
    `[1000, 750, 500, 250]` becomes timesteps `[1000, 937.5, 833.3, 625.0]`. (A scheduler's
    `set_timesteps(4)` spaces steps differently.) Returns σ `[len(denoising_steps)]`.
    """
    t = torch.tensor([float(s) for s in denoising_steps], dtype=torch.float64) / NUM_TRAIN_TIMESTEPS
    return shift_sigma(t, shift).float()


def few_step_rollout(denoiser: Denoiser, noise: torch.Tensor, cond: torch.Tensor, sigmas: torch.Tensor,
                     exit_steps: list[int] | torch.Tensor, *, on_chunk: Callable[[int, torch.Tensor], None] | None = None,
                     **kw) -> torch.Tensor:
    """`few_step_chunks` run to the end: the chunks concatenated, `[B, C, F, H, W]` clean predictions.

    `on_chunk(index, chunk [B, C, fpc, H, W])` is called as soon as a chunk is finished (streaming consumers,
    per-chunk timing), before the next chunk's first network call; the other arguments are `few_step_chunks`'.
    """
    chunks = []
    for c, x0 in enumerate(few_step_chunks(denoiser, noise, cond, sigmas, exit_steps, **kw)):
        chunks.append(x0)
        if on_chunk is not None:
            on_chunk(c, x0)
    return torch.cat(chunks, dim=2)


def few_step_chunks(denoiser: Denoiser, noise: torch.Tensor, cond: torch.Tensor, sigmas: torch.Tensor,
                    exit_steps: list[int] | torch.Tensor, *, context_sigma: float = 0.0,
                    generator: torch.Generator | None = None, max_context_frames: int | None = None,
                    sink_frames: int = 0, fuse_cache_write: bool = True, switches=(), recache: bool = False,
                    grad_from: int = 0) -> Iterator[torch.Tensor]:
    """The few-step student rolled out chunk by chunk on its own outputs (CausVid / Self-Forcing).

    Per chunk c: start from noise at `sigmas[0]`; at each step predict x̂0 and re-noise it to the next
    level with fresh noise (`x ← (1-σ')·x̂0 + σ'·ε'`), stopping at step `exit_steps[c]`, whose x̂0 is
    the chunk. Only that exit call may carry gradients (when grad mode is on, Self-Forcing training);
    the steps before it run under `no_grad`. The finished chunk, detached, is run once more at
    `context_sigma` (no gradients) to write its keys/values into the cache (a rolling window of
    `max_context_frames` with the first `sink_frames` kept), so no gradient crosses chunks. With
    `fuse_cache_write` that write rides along in the next chunk's first gradient-free call (one network
    call of 2 chunks instead of two calls; same result up to float rounding), so every chunk costs
    `exit + 1` calls; without it, or when that first call carries gradients, it is a call of its own.

    A generator: it yields each chunk's clean prediction `[B, C, fpc, H, W]` as soon as the chunk is finished,
    before any network call of the next chunk (a streaming consumer gets chunk c while chunk c + 1 waits);
    grad mode is read when it resumes. `few_step_rollout` runs it to the end.

    Args:
        noise: `[B, C, F, H, W]`, F a multiple of `denoiser.frames_per_chunk`.
        cond: `[B, L, D]` prompt embeddings.
        sigmas: `[K]` decreasing noise levels (see `few_step_sigmas`).
        exit_steps: `[F / frames_per_chunk]` indices into `sigmas` (K-1 everywhere = the full sampler).
        switches: prompt switches `[(K, cond_K [B, L, D]), ...]`: from the first chunk starting at or after
            frame K, `cond_K` conditions the rollout (`prompt_at`).
        recache: on a switch, rebuild the KV window under the new prompt (LongLive's re-cache,
            `ContextWindow`; no gradients); else the cache is kept (the chunk before the switch is written
            under its own prompt, never fused into the new prompt's first call).
        grad_from: chunks before this one are generated without gradients, exit call included (long rollouts:
            only a late window learns, so what autograd keeps does not grow with the rollout).
    """
    fpc, b, f = _chunked(denoiser, noise)
    if len(exit_steps) != f // fpc or not all(0 <= int(k) < len(sigmas) for k in exit_steps):
        raise ValueError(f"exit_steps must hold {f // fpc} indices into {len(sigmas)} levels, got {list(exit_steps)}")
    switches = check_switches(switches, f)
    cache = denoiser.new_cache(max_context_frames, sink_frames)
    window = ContextWindow(max_context_frames, sink_frames) if recache and switches else None
    pending, prompt = None, cond  # pending: the previous chunk as context, not yet in the cache

    def step(x, k):
        nonlocal pending
        sigma = torch.full((b, fpc), float(sigmas[k]), device=x.device)
        if pending is not None and torch.is_grad_enabled():  # never fuse into a call with gradients
            with torch.no_grad():
                denoiser(*pending, prompt, cache, write_cache=True)
            pending = None
        x0 = denoiser.predict_x0(x, sigma, prompt, cache, cache_first=pending)
        pending = None
        return x0

    for c, start in enumerate(range(0, f, fpc)):
        now = prompt_at(cond, switches, start)
        if now is not prompt:
            with torch.no_grad():
                if window is not None:  # the held chunks again, under the new prompt
                    cache = window.rebuild(lambda ctx, kv: denoiser(*ctx, now, kv, write_cache=True),
                                           denoiser.new_cache(max_context_frames, sink_frames))
                elif pending is not None:  # the last chunk under the prompt it was made with
                    denoiser(*pending, prompt, cache, write_cache=True)
            pending, prompt = None, now
        x, exit_k = noise[:, :, start:start + fpc], int(exit_steps[c])
        with torch.no_grad():
            for k in range(exit_k):
                x0 = step(x, k)
                nxt = torch.full((b, fpc), float(sigmas[k + 1]), device=x.device)
                x = add_noise(x0, _noise(x0, generator), nxt)
        with torch.set_grad_enabled(torch.is_grad_enabled() and c >= grad_from):
            x0 = step(x, exit_k)
        yield x0
        if start + fpc < f:  # the last chunk is never context
            pending = _as_context(x0.detach(), context_sigma, generator)
            if window is not None:
                window.add(start, pending)
            if not fuse_cache_write:
                with torch.no_grad():
                    denoiser(*pending, prompt, cache, write_cache=True)
                pending = None


@torch.no_grad()
def sample_few_step(denoiser: Denoiser, noise: torch.Tensor, cond: torch.Tensor, sigmas: torch.Tensor, *,
                    context_sigma: float = 0.0, generator: torch.Generator | None = None,
                    max_context_frames: int | None = None, sink_frames: int = 0,
                    on_chunk: Callable[[int, torch.Tensor], None] | None = None,
                    fuse_cache_write: bool = True, switches=(), recache: bool = False) -> torch.Tensor:
    """Few-step chunk-wise sampling (CausVid / Self-Forcing inference, no guidance): `few_step_rollout`
    with every chunk going through all of `sigmas`. Shapes and arguments as there."""
    exits = [len(sigmas) - 1] * (noise.shape[2] // denoiser.frames_per_chunk)
    return few_step_rollout(denoiser, noise, cond, sigmas, exits, context_sigma=context_sigma, generator=generator,
                            max_context_frames=max_context_frames, sink_frames=sink_frames, on_chunk=on_chunk,
                            fuse_cache_write=fuse_cache_write, switches=switches, recache=recache)


@torch.no_grad()
def stream_few_step(denoiser: Denoiser, noise: torch.Tensor, cond: torch.Tensor, sigmas: torch.Tensor,
                    **kw) -> Iterator[torch.Tensor]:
    """`sample_few_step` as a generator: yields each finished chunk `[B, C, fpc, H, W]` before the next chunk's
    first network call (`few_step_chunks`, every chunk through all of `sigmas`, no gradients; arguments as
    `sample_few_step`'s but `on_chunk`)."""
    exits = [len(sigmas) - 1] * (noise.shape[2] // denoiser.frames_per_chunk)
    yield from few_step_chunks(denoiser, noise, cond, sigmas, exits, **kw)


@torch.no_grad()
def generate_few_step(denoiser: Denoiser, cond: torch.Tensor, latent_shape: tuple, sigmas: torch.Tensor, *,
                      context_sigma: float = 0.0, seed: int = 0, batch_size: int = 64,
                      max_context_frames: int | None = None, sink_frames: int = 0,
                      on_chunk: Callable[[int, torch.Tensor], None] | None = None,
                      fuse_cache_write: bool = True, switches=(), recache: bool = False,
                      rolling: bool = False) -> torch.Tensor:
    """`generate` for a few-step student: `len(cond)` videos `[N, C, F, H, W]` in seeded batches.

    `on_chunk` is passed to `sample_few_step` (chunk indices restart at 0 in every batch); `switches`
    `[(K, cond_K [N, L, D]), ...]` and `recache` as there; `rolling`: `sample_rolling` instead (no switches).
    """
    if rolling and switches:
        raise ValueError("prompt switches are not supported by the rolling-window sampler")

    def sample(noise, sl, gen):
        if rolling:
            return sample_rolling(denoiser, noise, cond[sl].to(noise.device), sigmas, context_sigma=context_sigma,
                                  generator=gen, max_context_frames=max_context_frames, sink_frames=sink_frames,
                                  on_chunk=on_chunk)
        sw = [(k, ck[sl].to(noise.device)) for k, ck in switches]
        return sample_few_step(denoiser, noise, cond[sl].to(noise.device), sigmas, context_sigma=context_sigma,
                               generator=gen, max_context_frames=max_context_frames, sink_frames=sink_frames,
                               on_chunk=on_chunk, fuse_cache_write=fuse_cache_write, switches=sw, recache=recache)

    return _in_batches(denoiser, len(cond), latent_shape, seed, batch_size, sample)


@torch.no_grad()
def sample_rolling(denoiser: Denoiser, noise: torch.Tensor, cond: torch.Tensor, sigmas: torch.Tensor, **kw
                   ) -> torch.Tensor:
    """Rolling-window joint denoising at inference: `rolling_rollout` without gradients (arguments as there)."""
    return rolling_rollout(denoiser, noise, cond, sigmas, **kw)


def rolling_rollout(denoiser: Denoiser, noise: torch.Tensor, cond: torch.Tensor, sigmas: torch.Tensor, *,
                    context_sigma: float = 0.0, generator: torch.Generator | None = None,
                    max_context_frames: int | None = None, sink_frames: int = 0,
                    on_chunk: Callable[[int, torch.Tensor], None] | None = None,
                    calls: list | None = None, exits: list[int] | None = None) -> torch.Tensor:
    """Rolling-window joint denoising (Rolling Forcing; seed 002's cascading noise levels for Diffusion Forcing).

    A window of up to K = len(sigmas) chunks stands at staggered levels, oldest (least noisy) first: every network
    call denoises the whole window at once (block-causal: each chunk attends to the finished chunks in the KV cache
    and to the older chunks of the window), the oldest chunk, at the last level, is finished, every other chunk is
    re-noised one level down (`x ← (1-σ')·x̂0 + σ'·ε'`) and a new chunk enters at `sigmas[0]`. After K - 1 warm-up
    calls each call finishes one chunk: `n + K - 1` calls for n chunks, against `n·K` chunk by chunk, each over up
    to K chunks. A finished chunk enters the cache (at `context_sigma`) fused into the next call. K = 1 is
    `sample_few_step`.

    With grad mode on (training on the student's own rolling rollouts, Rolling Forcing's way), chunk i's output is
    its clean prediction at its exit level `exits[i]` (Self-Forcing's random exit step; None: the last level, the
    finished chunk), and only the calls where some chunk sits at its exit level carry gradients, to those chunks
    alone: every window chunk enters a call detached, the rollout itself (what later chunks see, what the cache
    holds) continues through every level as at inference, and the cache is written without gradients, so no
    gradient crosses chunks. Training only the last level (every exit there) leaves the earlier levels, the ones
    that see noisy older chunks, without a signal of their own.

    Args:
        noise: `[B, C, F, H, W]`, F a multiple of `denoiser.frames_per_chunk`.
        cond: `[B, L, D]`; sigmas `[K]` decreasing levels (`few_step_sigmas`).
        calls: if given, gets one `[levels of the window's chunks]` list per network call (for tests, counts).
        exits: `[n chunks]` level indices whose predictions are the output (None: the last level for each).
    Returns:
        `[B, C, F, H, W]` clean predictions (the finished video when `exits` is None).
    """
    fpc, b, f = _chunked(denoiser, noise)
    n, k_last = f // fpc, len(sigmas) - 1
    exit_at = [k_last] * n if exits is None else [int(k) for k in exits]
    if len(exit_at) != n or not all(0 <= k <= k_last for k in exit_at):
        raise ValueError(f"exits must give one level in 0..{k_last} for each of the {n} chunks, got {exits}")
    outputs: list = [None] * n
    cache = denoiser.new_cache(max_context_frames, sink_frames)
    window: list[list] = []  # [chunk index, level index, x] oldest first
    finished, pending, entered = 0, None, 0
    while finished < n:
        if entered < n:  # a new chunk of pure noise enters at the first level
            window.append([entered, 0, noise[:, :, entered * fpc:(entered + 1) * fpc]])
            entered += 1
        levels = [k for _, k, _ in window]
        if calls is not None:
            calls.append(levels)
        sigma = torch.cat([torch.full((b, fpc), float(sigmas[k]), device=noise.device) for k in levels], dim=1)
        finishes = window[0][1] == k_last
        at_exit = [exit_at[i] == k for i, k, _ in window]
        grad = torch.is_grad_enabled() and any(at_exit)
        if pending is not None and grad:  # never fuse into a call with gradients
            with torch.no_grad():  # (a recomputed block would write the cache again)
                denoiser(*pending, cond, cache, write_cache=True)
            pending = None
        with torch.set_grad_enabled(grad):
            x0 = denoiser.predict_x0(torch.cat([x for _, _, x in window], dim=2), sigma, cond, cache,
                                     cache_first=pending)
        pending = None
        x0 = x0.split(fpc, dim=2)
        for (i, _, _), y, out in zip(window, x0, at_exit):
            if out:
                outputs[i] = y
        if finishes:  # the oldest chunk is finished
            idx, _, _ = window.pop(0)
            done, x0 = x0[0].detach(), x0[1:]
            finished += 1
            if on_chunk is not None:
                on_chunk(idx, done)
            if idx + 1 < n:
                pending = _as_context(done, context_sigma, generator)
        for entry, y in zip(window, x0):  # the others one level down, with fresh noise
            entry[1] += 1
            y = y.detach()
            entry[2] = add_noise(y, _noise(y, generator), torch.full((b, fpc), float(sigmas[entry[1]]), device=y.device))
    return torch.cat(outputs, dim=2)
