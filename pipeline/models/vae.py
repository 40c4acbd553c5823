"""The frozen VAE of the real-scale path: diffusers' `AutoencoderKLWan` from a LOCAL folder.

Latents are normalised per channel with the VAE config's `latents_mean` / `latents_std`, the exact inverse
of what diffusers' `WanPipeline.__call__` does before decoding (diffusers 0.42,
`diffusers/pipelines/wan/pipeline_wan.py`):

    latents = latents / (1 / latents_std) + latents_mean      # pipeline, before vae.decode

so `encode` returns `(mode(q(z|x)) - latents_mean) / latents_std` (the posterior's mode, deterministic)
and `decode` undoes it before `vae.decode`. Wan's VAE compresses 4x in time (first frame kept:
T pixel frames -> 1 + (T - 1) / 4 latent frames) and 8x in space.

Streaming: `WanVAE.stream()` returns a `StreamingDecoder` that decodes a latent video chunk by chunk as
the causal sampler finishes it (first latent frame -> 1 pixel frame, each later one -> 4), carrying the
decoder's causal-convolution cache between chunks, so the frames equal those of `decode` on the whole video.
`WanVAE.stream(overlap=True)` decodes on a CUDA stream of its own (`StreamingDecoder.submit`), so a chunk's
decode runs beside the next chunk's denoising instead of after it.
"""

from __future__ import annotations

import inspect
import time
from pathlib import Path

import torch

from pipeline.models.device import dtype_of, resolve_device
from pipeline.models.text_encoder import resolve_component


class WanVAE:
    """Encode videos `[B, 3, T, H, W]` in [-1, 1] to normalised latents `[B, z, F, H/8, W/8]` and back."""

    def __init__(self, path: str | Path, dtype: str = "fp32", device: str | torch.device = "cpu"):
        from diffusers import AutoencoderKLWan

        folder = resolve_component(path, "vae", "components.vae")
        vae = AutoencoderKLWan.from_pretrained(folder, torch_dtype=dtype_of(dtype, "components.vae_dtype"),
                                               local_files_only=True)
        self._adopt(vae.to(torch.device(device)))

    @classmethod
    def wrap(cls, vae) -> "WanVAE":
        """A `WanVAE` around an `AutoencoderKLWan` already loaded (a `CausalWanPipeline`'s `vae`), on its own
        device and in its own dtype."""
        self = cls.__new__(cls)
        self._adopt(vae)
        return self

    def _adopt(self, vae) -> None:
        self.vae = vae.eval().requires_grad_(False)
        p = next(vae.parameters())
        self.device, self.dtype = p.device, p.dtype
        c = self.vae.config
        self.z_dim = c.z_dim
        self.scale_temporal, self.scale_spatial = c.scale_factor_temporal, c.scale_factor_spatial
        self.mean = torch.tensor(c.latents_mean, dtype=torch.float32).view(1, c.z_dim, 1, 1, 1)
        self.std = torch.tensor(c.latents_std, dtype=torch.float32).view(1, c.z_dim, 1, 1, 1)
        # on the device once: no host-to-device copy (which waits for the queued work) in every chunk's decode
        self._mean_dev, self._std_dev = self.mean.to(self.device), self.std.to(self.device)

    @classmethod
    def from_config(cls, cfg) -> "WanVAE":
        c = cfg.components
        return cls(c.vae, c.vae_dtype, resolve_device(c.device, "components.device"))

    def latent_frames(self, pixel_frames: int) -> int:
        """Latent frames of a `pixel_frames`-frame video (which must be 1 + a multiple of the stride)."""
        if (pixel_frames - 1) % self.scale_temporal:
            raise ValueError(f"data.pixel_frames ({pixel_frames}) must be 1 + a multiple of {self.scale_temporal} "
                             "for this VAE")
        return 1 + (pixel_frames - 1) // self.scale_temporal

    @torch.no_grad()
    def encode(self, videos: torch.Tensor) -> torch.Tensor:
        """Normalised latents `[B, z, F, h, w]` float32 (CPU) of videos `[B, 3, T, H, W]` in [-1, 1]:
        the posterior's mode, so encoding is deterministic."""
        x = videos.to(self.device, self.dtype)
        z = self.vae.encode(x).latent_dist.mode().float().cpu()
        return (z - self.mean) / self.std

    def denormalise(self, latents: torch.Tensor) -> torch.Tensor:
        """The VAE's raw latents `[B, z, F, h, w]` (its device and dtype) of normalised ones: `z·std + mean`
        in float32, then cast. Shared by `decode` and the streaming decoder so both see the same input."""
        z = latents.to(self.device, torch.float32)  # elementwise fp32 ops: the same bits on any device
        return (z * self._std_dev + self._mean_dev).to(self.dtype)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Videos `[B, 3, T, H, W]` float32 (CPU) in [-1, 1] of normalised latents `[B, z, F, h, w]`."""
        out = self.vae.decode(self.denormalise(latents)).sample
        return out.float().cpu().clamp(-1, 1)

    def stream(self, batch_size: int | None = None, overlap: bool = False) -> "StreamingDecoder":
        """A `StreamingDecoder` for one video batch at a time (see there); `batch_size` caps the videos per
        decoder call (None: the whole batch at once); `overlap`: decode on a CUDA stream of its own."""
        return StreamingDecoder(self, batch_size, overlap=overlap)


# ---------------------------------------------------------------------------------------------------------
# The ONE place coupled to diffusers' private `AutoencoderKLWan` internals (checked against diffusers 0.42,
# `diffusers/models/autoencoders/autoencoder_kl_wan.py`). `AutoencoderKLWan._decode(z)` is:
#
#     self.clear_cache()                        # _feat_map = [None] * (number of WanCausalConv3d in decoder)
#     x = self.post_quant_conv(z)               # a 1x1x1 causal conv: frame by frame
#     for i in range(num_frame):                # ONE latent frame per decoder call
#         self._conv_idx = [0]
#         out_i = self.decoder(x[:, :, i:i+1], feat_cache=self._feat_map, feat_idx=self._conv_idx,
#                              first_chunk=(i == 0))    # frame 0 -> 1 pixel frame, later ones -> 4
#     out = unpatchify(cat(out_i), patch_size) if patch_size else cat(out_i);  clamp(-1, 1)
#
# `feat_cache` (a list, one slot per WanCausalConv3d; each used slot holds the last CACHE_T=2 input frames of
# its conv, or the string "Rep" for a temporal upsampler that has seen only the first frame; the 1x1x1
# residual shortcuts leave theirs unused) is all the decoder carries between frames; `feat_idx[0]` walks
# the slots in call order. So a stream that keeps its OWN such list
# between calls and feeds frames in order reproduces `_decode` exactly. (Own list rather than the model's
# `_feat_map`: any other `vae.encode` / `vae.decode` in between calls `clear_cache()` and would wipe it.)
# `_check_decoder` verifies this shape of things once; `_decode_frame` re-checks the slots walked and the
# output length every call, so a changed diffusers fails with `DiffusersInternalsChanged`, never silently.
# ---------------------------------------------------------------------------------------------------------

class DiffusersInternalsChanged(RuntimeError):
    """diffusers' AutoencoderKLWan no longer has the private decode structure the streaming decoder drives."""


def _internals_error(what: str) -> DiffusersInternalsChanged:
    import diffusers

    return DiffusersInternalsChanged(
        f"streaming VAE decode: diffusers {diffusers.__version__} AutoencoderKLWan internals changed ({what}); "
        "pipeline/models/vae.py drives `post_quant_conv` and `decoder(x, feat_cache, feat_idx, first_chunk)` as in "
        "diffusers 0.42 -- update it (or use WanVAE.decode on the whole video)")


def _check_decoder(vae) -> int:
    """Check the pieces of a diffusers `AutoencoderKLWan` the stream drives; returns the number of feature-cache
    slots (causal convs in `vae.decoder`). Raises `DiffusersInternalsChanged` if anything is missing."""
    try:
        from diffusers.models.autoencoders.autoencoder_kl_wan import WanCausalConv3d
    except ImportError as e:
        raise _internals_error(f"cannot import WanCausalConv3d: {e}") from None
    decoder, pqc = getattr(vae, "decoder", None), getattr(vae, "post_quant_conv", None)
    if decoder is None or pqc is None:
        raise _internals_error("no `decoder` / `post_quant_conv`")
    params = inspect.signature(decoder.forward).parameters
    if not {"feat_cache", "feat_idx", "first_chunk"} <= set(params):
        raise _internals_error(f"decoder.forward takes {list(params)}, not feat_cache / feat_idx / first_chunk")
    if not isinstance(pqc, WanCausalConv3d) or tuple(pqc.kernel_size)[0] != 1:
        raise _internals_error("post_quant_conv is no longer a per-frame (temporal kernel 1) causal conv")
    slots = sum(isinstance(m, WanCausalConv3d) for m in decoder.modules())
    cached = getattr(vae, "_cached_conv_counts", {}).get("decoder", slots)  # diffusers' own count, if it keeps one
    if slots == 0 or cached != slots:
        raise _internals_error(f"decoder has {slots} causal convs, diffusers counts {cached}")
    return slots


def _decode_frame(vae, x: torch.Tensor, cache: list, first: bool, stride: int, walk: list) -> torch.Tensor:
    """One latent frame `x [B, z, 1, h, w]` (after post_quant_conv) through `vae.decoder` with the feature
    cache `cache` (updated in place): pixel frames `[B, 3·p², 1 or stride, H/p, W/p]` (p = patch size).
    `walk` is `[slots used per call]` (`[None]` until the first call): every call must use the same number."""
    idx, slots = [0], len(cache)
    out = vae.decoder(x, feat_cache=cache, feat_idx=idx, first_chunk=first)
    # diffusers allots a slot per causal conv but the 1x1x1 residual shortcuts take none: <= slots, constant
    if len(cache) != slots or not 0 < idx[0] <= slots or walk[0] not in (None, idx[0]):
        raise _internals_error(f"decoder walked {idx[0]} of {slots} cache slots (before: {walk[0]}; cache now "
                               f"{len(cache)})")
    walk[0] = idx[0]
    if out.dim() != 5 or out.shape[2] != (1 if first else stride):
        raise _internals_error(f"one latent frame gave output {list(out.shape)}, expected "
                               f"{1 if first else stride} frames")
    return out


def _unpatchify(vae, out: torch.Tensor) -> torch.Tensor:
    """Undo the output patching of Wan2.2-style VAEs (`config.patch_size`), as `_decode` does."""
    if vae.config.get("patch_size") is None:
        return out
    from diffusers.models.autoencoders.autoencoder_kl_wan import unpatchify

    return unpatchify(out, patch_size=vae.config.patch_size)

# ------------------------------------------- end of the coupling -------------------------------------------


class StreamingDecoder:
    """Decodes one batch of latent videos chunk by chunk, in order, as a causal sampler finishes them.

    `decode_chunk(latents [B, z, f, h, w])` (normalised latents, any f >= 1, any device) returns the pixel
    frames `[B, 3, T, H, W]` float32 (CPU) in [-1, 1] those f latent frames add: T = 1 + 4·(f - 1) for the
    video's first chunk, 4·f for later ones. The concatenation over chunks equals `WanVAE.decode` of the whole
    video (the same per-frame decoder calls, the causal-conv cache carried between chunks). `reset()` starts
    a new video (batch); B must stay fixed in between.

    `submit(latents)` starts the same decode and returns `PendingFrames` at once, whose `result()` gives the
    frames: with `overlap` on a CUDA VAE the decode runs on a CUDA stream of its own (after the work queued so far
    on the current stream, which made the latents), then copies into pinned host memory, so the caller can queue
    the next chunk's denoising beside it and collect these frames afterwards (decode ∥ denoise: the end-to-end
    rate approaches the slower of the two instead of their sum). Elsewhere `submit` decodes at once.

    `push(latents)` is how a consumer streams either way: it returns the frames now due (this chunk's, or with
    `overlap` the previous chunk's, None for a video's first, this one decoding beside the caller's next work) and
    `flush()` the last chunk's.

    Timing: `times` holds the seconds of every chunk's decode since creation (`reset` keeps them), `last_seconds`
    the latest: wall-clock of `decode_chunk` (the returned CPU tensor makes it include the device's work), or with
    `overlap` the decode's own time on its stream (CUDA events), recorded when its `result()` is collected.
    """

    def __init__(self, vae: WanVAE, batch_size: int | None = None, overlap: bool = False):
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1 or None, got {batch_size}")
        self.wan, self.batch_size = vae, batch_size
        self.side = torch.cuda.Stream(vae.device) if overlap and vae.device.type == "cuda" else None
        self.slots = _check_decoder(vae.vae)
        self.walk = [None]  # cache slots one decoder call uses (checked constant, see `_decode_frame`)
        self.times: list[float] = []
        self.last_seconds = 0.0
        self.reset()

    def reset(self) -> None:
        """Forget the current video: drop the feature caches (frees their memory); the next chunk is a first one."""
        if getattr(self, "pending", None) is not None:
            raise RuntimeError("reset() with a pushed chunk not flushed: its frames would be lost")
        self.pending = None  # an overlapping `push`'s chunk not yet handed over
        self.caches: list[list] | None = None  # one diffusers feat_cache list per batch slice
        self.batch: int | None = None
        self.latent_frames = 0  # latent frames decoded of the current video

    @torch.no_grad()
    def decode_chunk(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixel frames `[B, 3, T, H, W]` float32 (CPU) in [-1, 1] of the next normalised latent frames
        `[B, z, f, h, w]` of the current video (see the class docstring for T)."""
        if self.side is not None:
            return self.submit(latents).result()
        start = time.perf_counter()
        out = self._decode(latents).float().cpu().clamp(-1, 1)  # (`_decode`'s clamp, then WanVAE.decode's)
        self.last_seconds = time.perf_counter() - start
        self.times.append(self.last_seconds)
        return out

    @torch.no_grad()
    def submit(self, latents: torch.Tensor) -> "PendingFrames":
        """The next chunk's decode started (see the class docstring): `.result()` gives what `decode_chunk` would
        return. Chunks must be collected or not, but submitted, in order; the latents are copied at once, so the
        caller may reuse them."""
        if self.side is None:
            return PendingFrames(self.decode_chunk(latents))
        side = self.side
        latents = latents.clone()  # the caller's tensor as it is now, whatever happens to it later
        side.wait_stream(torch.cuda.current_stream(side.device))  # the latents' producers
        with torch.cuda.stream(side):
            if latents.device.type == "cuda":  # the allocator must not hand its memory on before the decode reads it
                latents.record_stream(side)
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record(side)
            out = self._decode(latents).float().clamp(-1, 1)
            host = torch.empty(out.shape, dtype=out.dtype, pin_memory=True)
            host.copy_(out, non_blocking=True)
            end.record(side)

        def timed():
            self.last_seconds = begin.elapsed_time(end) / 1e3
            self.times.append(self.last_seconds)

        return PendingFrames(host, end, timed)

    def push(self, latents: torch.Tensor) -> torch.Tensor | None:
        """The next chunk decoded (`decode_chunk`), or with `overlap` started (`submit`): returns the frames now due,
        this chunk's, or the previous chunk's (None for a video's first); `flush()` gives the last."""
        if self.side is None:
            return self.decode_chunk(latents)
        started = self.submit(latents)
        due = self.flush()
        self.pending = started
        return due

    def flush(self) -> torch.Tensor | None:
        """An overlapping `push`'s last chunk, waited for (None if there is none)."""
        pending, self.pending = self.pending, None
        return None if pending is None else pending.result()

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """The next chunk's pixel frames on the VAE's device, in its dtype (clamped as diffusers' `_decode`)."""
        vae = self.wan.vae
        if getattr(vae, "use_tiling", False):  # tiled decode blends tiles over the whole video: not streamable
            raise ValueError("streaming decode does not support the VAE's tiling (vae.disable_tiling())")
        if latents.dim() != 5 or latents.shape[1] != self.wan.z_dim or latents.shape[2] < 1:
            raise ValueError(f"latents must be [B, {self.wan.z_dim}, f>=1, h, w], got {list(latents.shape)}")
        b = latents.shape[0]
        if self.batch is None:
            step = self.batch_size or b
            self.batch, self.slices = b, [slice(i, i + step) for i in range(0, b, step)]
            self.caches = [[None] * self.slots for _ in self.slices]
        elif b != self.batch:
            raise ValueError(f"chunk of {b} videos after chunks of {self.batch}: call reset() for a new batch")
        x = vae.post_quant_conv(self.wan.denormalise(latents))
        outs = []
        for sl, cache in zip(self.slices, self.caches):
            frames = [_decode_frame(vae, x[sl, :, i:i + 1], cache, self.latent_frames + i == 0,
                                    self.wan.scale_temporal, self.walk) for i in range(x.shape[2])]
            outs.append(torch.cat(frames, 2))
        self.latent_frames += x.shape[2]
        return _unpatchify(vae, torch.cat(outs)).clamp(-1, 1)


class PendingFrames:
    """One chunk's pixel frames on their way (`StreamingDecoder.submit`): `result()` waits for them and returns
    `[B, 3, T, H, W]` float32 in [-1, 1] on the CPU (pinned memory when they came from a CUDA stream);
    `ready()` says without waiting whether they are there."""

    def __init__(self, frames: torch.Tensor, done=None, on_done=None):
        self._frames, self._done, self._on_done = frames, done, on_done

    def ready(self) -> bool:
        return self._done is None or self._done.query()

    def result(self) -> torch.Tensor:
        if self._done is not None:
            self._done.synchronize()
            self._done = None
            self._on_done()
        return self._frames
