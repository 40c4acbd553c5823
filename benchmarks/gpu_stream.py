"""Streaming speed of the few-step causal student, and its training step costs, in the figures speed claims are
compared by: GPU, dtype, block size, window, denoise-only vs end-to-end.

    python benchmarks/gpu_stream.py                               # Wan2.1-1.3B shape, random weights (a GPU)
    python benchmarks/gpu_stream.py --checkpoint FOLDER           # a diffusers (pipeline) folder's transformer
    python benchmarks/gpu_stream.py --config configs/tiny.yaml    # any config's shape (tiny: runs on a CPU)
    options: --dtype bf16|fp32  --frames 21  --window 21  --sinks 3  --steps 4  --kv-cache auto|static|dynamic
             --compile [--compile-mode M] [--compile-scope blocks|full]  --attention-backend NAME  --skip-training  --skip-vae
             --vae FOLDER  --vae-random auto|wan2.1|tiny  --vae-dtype D  --device auto|cuda|cpu
             --repeats 3  --warmup N  --train-repeats 2  --train-batch 1  --stream-frames N  --batch 1
             --peak-n N  --json OUT  [key=value ...]

Default shape (built in, `WAN21_13B`): Wan2.1-T2V-1.3B (30 layers, 12 heads x 128, ffn 8960, text 4096 x 512
tokens, patch (1,2,2)), latents 16 x 60 x 104 (480 x 832 px: 1560 tokens per latent frame), chunks of 3 latent
frames (12 video frames), 4 steps [1000, 750, 500, 250] with shift 5, a KV window of 21 frames with 3 sinks.
`key=value` overrides apply to the config (e.g. `model.num_layers=2` for a partial model on a laptop).

Window convention: `--window W --sinks S` are our `KVCache(max_frames=W, sink_frames=S)` (student.max_context_frames
and sink_frames): W cached latent frames, sinks included, the chunk being denoised NOT counted. Self-Forcing's and
LongLive's `local_attn_size` counts the current chunk: `local_attn_size = W + chunk`. Both are printed.

What is measured (medians over `--repeats` after warm-up rollouts; on a GPU every figure is bracketed by
`torch.cuda.synchronize`):
- a denoise-only stream (the streaming sampler `sample_few_step`, cache writes fused into the next chunk's first
  call, the default) long enough to fill the window and then run >= 3 blocks at full window (`--stream-frames`,
  default max(frames, window + 4 chunks)): the time of every block (chunk finished to chunk finished);
  steady state = median over the steady blocks: those whose cache write (of the chunk before) and denoising
  calls both run with the window full (block c with (c - 1)·chunk >= window);
- the same stream unfused (`fuse_cache_write=False`), every network call timed on its own: per block the DiT
  time (its denoising calls) and the cache-write time (the call writing the previous chunk, which the block pays);
- the `--frames` video end to end: the stream with each chunk decoded as it is finished by the Wan VAE's
  streaming decoder (`WanVAE.stream()`, random weights of the Wan2.1 VAE, or a tiny one for a tiny latent, or
  `--vae` / the checkpoint's `vae/`), in sequence: first-chunk latency to latents and to pixels, VAE time per
  block, FPS end to end = pixel frames (Wan rule: latent frame 0 -> 1 frame, each later one -> 4; 21 -> 81) /
  wall time, and FPS denoise-only over the video; then the same video with each chunk's decode on the VAE's own
  CUDA stream beside the next chunk's denoising (`WanVAE.stream(overlap=True)`, as
  `CausalWanPipeline.stream(overlap_decode=True)`): FPS end to end, first chunk to pixels, decode time per block
  on its stream (CUDA events);
- FLOPs of each block (`FlopCounterMode`, one eager rollout with the dense attention backend, so every kernel
  has a formula) and the `--dtype` matmul rate (n x n, best of 5): floor = FLOPs of a full-window block / rate,
  ratio = steady ms / floor ms;
- training (unless `--skip-training`), batch `--train-batch` x `--frames` frames, fp32 weights under bf16 autocast
  (`--dtype bf16`, as the stages train), gradient checkpointing, AdamW: a DF+L2 step (`flow_matching_loss` on
  per-frame levels) with block-causal and with bidirectional attention, and an `sf_dmd` generator step
  (`SelfForcingDMD.generator_loss`: rollout, critic and guided teacher x0, backward; the teacher's matmul weights
  held in bf16, as the distill stage holds them), timed at every exit step
  (the mean = the expected step under uniform exits); peak memory of each (`torch.cuda.max_memory_allocated`;
  on a CPU the process's max RSS so far, a proxy, and said so), each beside what the `--dry-run` estimate's rules
  give for that step (`step_estimates`).
The goals of the issue are printed next to the measured values; met / not met only on a GPU at the Wan2.1-1.3B
shape with 3-frame chunks and a 21-frame video.
Progress goes to stderr, the figures to stdout (and all of them to `--json OUT`).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import matmul_rate, register_cpu_sdpa_flops, sync  # noqa: E402
from pipeline.models.causal_wan import build_transformer  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.methods.dmd import SelfForcingDMD  # noqa: E402
from pipeline.diffusion.losses import flow_matching_loss  # noqa: E402
from pipeline.diffusion.sampling import Denoiser, few_step_sigmas, sample_few_step, uniform_denoising_steps  # noqa: E402
from pipeline.models.kv_cache import BufferPool  # noqa: E402
from pipeline.training.optim import hold_frozen  # noqa: E402

# The built-in shape: Wan2.1-T2V-1.3B at 480 x 832, Self-Forcing's student (configs/wan2.1-t2v-1.3b/student.yaml).
WAN21_13B = {
    "data": {"kind": "latents", "frames": 21, "frames_per_chunk": 3, "latent_size": [60, 104]},
    "model": {"patch_size": [1, 2, 2], "num_attention_heads": 12, "attention_head_dim": 128, "in_channels": 16,
              "out_channels": 16, "text_dim": 4096, "freq_dim": 256, "ffn_dim": 8960, "num_layers": 30,
              "cross_attn_norm": True, "prediction": "flow"},
    "student": {"denoising_steps": [1000, 750, 500, 250], "shift": 5.0, "max_context_frames": 21, "sink_frames": 3},
    "distill": {"real_guidance": 4.0, "sigma_shift": 5.0, "batch_size": 1, "gradient_checkpointing": True},
    "components": {"max_sequence_length": 512},
}
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
GIB = 2 ** 30

# The goals (H200, Wan2.1-1.3B shape): (key, text, op, bound, unit).
GOALS = [
    ("steady_ms_per_block", "steady state per 12-frame block (DiT + cache write)", "<=", 360.0, "ms"),
    ("first_chunk_ms", "first-chunk latency (latents)", "<=", 150.0, "ms"),
    ("fps_end_to_end", "end to end with streaming decode, 81 frames", ">=", 30.0, "FPS"),
    ("fps_end_to_end_overlapped", "... with each decode beside the next chunk's denoising", ">=", 30.0, "FPS"),
    ("df_l2_ratio", "DF+L2 step block-causal / bidirectional", "<=", 1.0, "x"),
    ("sf_dmd_generator_s", "sf_dmd generator step", "<=", 5.0, "s"),
    ("sf_dmd_peak_gib", "sf_dmd generator step peak memory", "<=", 40.0, "GiB"),
]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------
# Model, dtype and the timed denoiser
# ----------------------------------------------------------------------------------------------------------

def cast_like_diffusers(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """Parameters to `dtype` except those of `_keep_in_fp32_modules` (rope, time embedder, modulation tables,
    norms), buffers untouched: what `from_pretrained(torch_dtype=dtype)` gives (Wan pipelines in bf16)."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, p in model.named_parameters():
        if p.is_floating_point() and not keep & set(name.split(".")):
            p.data = p.data.to(dtype)
    return model


class CallTimer:
    """Wall time of every network call, synchronised before and after: `records` of (block, kind, seconds)."""

    def __init__(self, device):
        self.device, self.block, self.records = device, 0, []

    def time(self, kind: str, fn):
        sync(self.device)
        t = time.perf_counter()
        out = fn()
        sync(self.device)
        self.records.append((self.block, kind, time.perf_counter() - t))
        return out


@dataclass
class StreamDenoiser(Denoiser):
    """A `Denoiser` that feeds the network `dtype` inputs (bf16 weights take bf16 latents; its outputs come back
    as float32, as the sampler's own arithmetic is) and, with a `timer`, times every network call."""

    dtype: torch.dtype | None = None
    timer: CallTimer | None = None
    cache_kinds: list = field(default_factory=list)

    def new_cache(self, max_frames=None, sink_frames=0):
        cache = super().new_cache(max_frames, sink_frames)
        self.cache_kinds.append(type(cache).__name__)
        return cache

    def raw(self, x, sigma, context, kv_cache=None, write_cache=False, cache_first=None):
        if self.dtype is not None:
            x, context = x.to(self.dtype), context.to(self.dtype)
            if cache_first is not None:
                cache_first = (cache_first[0].to(self.dtype), cache_first[1])

        def call():
            return super(StreamDenoiser, self).raw(x, sigma, context, kv_cache, write_cache, cache_first)

        if self.timer is None:
            out = call()
        else:
            out = self.timer.time("write" if write_cache else "fused" if cache_first is not None else "denoise", call)
        return out if self.dtype is None else out.float()


# ----------------------------------------------------------------------------------------------------------
# Streams
# ----------------------------------------------------------------------------------------------------------

@dataclass
class Setup:
    denoiser: StreamDenoiser
    cond: torch.Tensor
    sigmas: torch.Tensor
    window: int | None
    sinks: int
    context_sigma: float
    latent: tuple  # (C, H, W)
    batch: int
    device: torch.device

    def noise(self, frames: int, seed: int) -> torch.Tensor:
        g = torch.Generator(self.device).manual_seed(seed)
        return torch.randn(self.batch, self.latent[0], frames, *self.latent[1:], generator=g, device=self.device)

    def stream(self, frames: int, seed: int, on_chunk=None, fuse: bool = True) -> float:
        """One rollout of `frames` latent frames; returns its wall seconds (synchronised)."""
        gen = torch.Generator(self.device).manual_seed(seed + 1000)
        sync(self.device)
        t0 = time.perf_counter()
        sample_few_step(self.denoiser, self.noise(frames, seed), self.cond, self.sigmas,
                        context_sigma=self.context_sigma, generator=gen, max_context_frames=self.window,
                        sink_frames=self.sinks, on_chunk=on_chunk, fuse_cache_write=fuse)
        sync(self.device)
        return time.perf_counter() - t0


def block_times(s: Setup, frames: int, seed: int, fuse: bool = True) -> list[float]:
    """Seconds of every block of a denoise-only stream: chunk finished to chunk finished (the first from the start)."""
    marks = []

    def on_chunk(i, chunk):
        sync(s.device)
        marks.append(time.perf_counter())

    sync(s.device)
    t0 = time.perf_counter()
    s.stream(frames, seed, on_chunk, fuse)
    return [b - a for a, b in zip([t0, *marks], marks)]


def unfused_breakdown(s: Setup, frames: int, seed: int) -> tuple[list[float], list[float]]:
    """Per block (DiT seconds, cache-write seconds) of an unfused stream, every network call timed on its own.
    The write of chunk c runs after chunk c is finished: block c + 1 pays it (block 0 pays none)."""
    timer = CallTimer(s.device)
    s.denoiser.timer = timer

    def on_chunk(i, chunk):
        timer.block = i + 1

    try:
        s.stream(frames, seed, on_chunk, fuse=False)
    finally:
        s.denoiser.timer = None
    n = frames // s.denoiser.frames_per_chunk
    dit, write = [0.0] * n, [0.0] * n
    for block, kind, sec in timer.records:
        if kind == "fused":
            raise AssertionError("an unfused stream made a fused call")
        (write if kind == "write" else dit)[block] += sec
    return dit, write


def video_end_to_end(s: Setup, frames: int, seed: int, vae) -> dict:
    """The `frames`-frame video, each chunk decoded (if `vae`) as soon as it is finished, in sequence."""
    dec = vae.stream() if vae is not None else None
    lat, pix, vae_s, px = [], [], [], []

    def on_chunk(i, chunk):
        sync(s.device)
        lat.append(time.perf_counter())
        if dec is not None:
            out = dec.decode_chunk(chunk)  # a CPU tensor: the device's work is done
            px.append(out.shape[2])
            pix.append(time.perf_counter())
            vae_s.append(pix[-1] - lat[-1])

    sync(s.device)
    t0 = time.perf_counter()
    s.stream(frames, seed, on_chunk)
    wall = time.perf_counter() - t0
    starts = [t0, *(pix if dec is not None else lat)][:len(lat)]  # a block's DiT starts when the last decode ends
    return {"wall": wall, "dit": [b - a for a, b in zip(starts, lat)], "vae": vae_s, "pixel_frames": sum(px),
            "first_latents": lat[0] - t0, "first_pixels": (pix[0] - t0) if pix else None}


def video_overlapped(s: Setup, frames: int, seed: int, vae) -> dict:
    """The `frames`-frame video with each chunk's decode on the VAE's own CUDA stream beside the next chunk's
    denoising (`StreamingDecoder.push`), a chunk's frames collected once the next chunk is queued, as
    `CausalWanPipeline.stream(overlap_decode=True)` does; nothing synchronises but the frames' collection. (Off CUDA
    `submit` decodes at once: the sequential figure again.)"""
    dec = vae.stream(overlap=True)
    ready, px = [], []

    def collect(out):
        if out is not None:
            px.append(out.shape[2])
            ready.append(time.perf_counter())

    sync(s.device)
    t0 = time.perf_counter()
    s.stream(frames, seed, lambda i, chunk: collect(dec.push(chunk)))
    collect(dec.flush())
    return {"wall": time.perf_counter() - t0, "pixel_frames": sum(px), "first_pixels": ready[0] - t0,
            "vae": list(dec.times)}


def flops_per_block(s: Setup, frames: int, model) -> list[float]:
    """FLOPs of every block of one fused denoise-only stream (the write of a chunk counts in the next block),
    counted with the dense attention backend (formulas for every kernel; no compiled FlexAttention)."""
    from torch.utils.flop_counter import FlopCounterMode

    register_cpu_sdpa_flops()
    backend = getattr(model, "attention_backend", None)
    if backend is not None and backend not in ("dense", "native", "math", "efficient"):
        model.set_attention_backend("dense")
    marks = []
    try:
        with FlopCounterMode(display=False) as counter:
            s.stream(frames, 0, lambda i, chunk: marks.append(counter.get_total_flops()))
    finally:
        if backend is not None and model.attention_backend != backend:
            model.set_attention_backend(backend)
    return [float(b - a) for a, b in zip([0, *marks], marks)]


# ----------------------------------------------------------------------------------------------------------
# VAE
# ----------------------------------------------------------------------------------------------------------

def make_vae(args, latent, device, dtype_name: str, tmp: Path):
    """`WanVAE` of `--vae`, else of the checkpoint's `vae/`, else random weights saved to `tmp`: the Wan2.1 VAE
    (diffusers' defaults) for a 16-channel latent of >= 32 x 32, a tiny one (z = the latent channels) otherwise."""
    from diffusers import AutoencoderKLWan

    from pipeline.models.vae import WanVAE

    folder = args.vae
    if folder is None and args.checkpoint and (Path(args.checkpoint) / "vae" / "config.json").is_file():
        folder = args.checkpoint
    if folder is not None:
        return WanVAE(folder, dtype_name, device), f"weights of {folder}"
    z, h, w = latent
    kind = args.vae_random
    if kind == "auto":
        kind = "wan2.1" if z == 16 and min(h, w) >= 32 else "tiny"
    torch.manual_seed(0)
    with torch.device(device):
        if kind == "wan2.1":
            vae = AutoencoderKLWan()
        else:
            vae = AutoencoderKLWan(base_dim=8, z_dim=z, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                   latents_mean=[0.0] * z, latents_std=[1.0] * z)
    params = sum(p.numel() for p in vae.parameters())
    vae.save_pretrained(tmp / "vae")
    del vae
    return WanVAE(tmp, dtype_name, device), f"random {kind} ({params / 1e6:.1f}M parameters)"


# ----------------------------------------------------------------------------------------------------------
# Training steps
# ----------------------------------------------------------------------------------------------------------

def peak_gib(device) -> float:
    """Peak memory since the last reset: CUDA's allocator; on a CPU the process's max RSS (a proxy)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GIB
    import resource  # Unix only; read only on a CPU

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (GIB if sys.platform == "darwin" else 2 ** 20)


def reset_peak(device, free: bool = False) -> None:
    """Start a new peak (CUDA); `free`: first return unreferenced memory to the device (between phases only: a
    timed step after `empty_cache` would pay fresh allocations)."""
    if free:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def timed_step(loss_fn, opt, device, autocast: bool) -> float:
    """Seconds of one optimiser step as the stages take it (`Method.optimize`): the loss under autocast, whose
    cache of bf16 weight copies ends with it, then the backward, `opt.step()` and `zero_grad` outside."""
    sync(device)
    t = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        loss = loss_fn()
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    sync(device)
    return time.perf_counter() - t


def step_estimates(model, cfg, device, autocast: bool, shape: tuple, batch: int) -> dict:
    """The `--dry-run` rules (`pipeline.training.memory`) applied to this script's steps, GiB: the DF+L2 step as
    pretrain_teacher's training phase without an EMA copy; the sf_dmd generator step as distill's generator
    update without an EMA copy and with the critic frozen here (no AdamW moments). Beside the measured peaks they
    check the estimate at this shape (on a GPU; the CPU's peak figure is only a proxy)."""
    from pipeline.models.attention import masked_method
    from pipeline.training import memory

    c = model.config
    p_t, p_h, p_w = c.patch_size
    params = sum(p.numel() for p in model.parameters())
    sh = memory.Shape(params, c.num_attention_heads * c.attention_head_dim, c.ffn_dim, len(model.blocks),
                      (shape[2] // p_h) * (shape[3] // p_w), shape[1] // p_t, cfg.data.frames_per_chunk // p_t,
                      c.num_attention_heads)
    masked = masked_method(cfg.model.attention_backend, device, requires_grad=True)
    run = memory.Run(batch=batch, checkpointing=True, bf16=autocast, masked=masked, ema_cpu=True, method="sf_dmd",
                     window_frames=cfg.student.max_context_frames, real_guidance=cfg.distill.real_guidance,
                     fake_guidance=cfg.distill.fake_guidance)
    out = {f"df_l2_{m}_estimate_gib": memory.stage_estimate("pretrain_teacher", sh, replace(run, attention=m)).total
           / 2 ** 30 for m in ("block_causal", "bidirectional")}
    gen = memory.stage_estimate("distill", sh, run, phase="generator update")
    critic_moments = memory.model_states(params, 1, 0, 0, "DDP", 0, 1)["optimizer"]  # none here: frozen
    out["sf_dmd_estimate_gib"] = (gen.total - critic_moments) / 2 ** 30
    return out


def training(args, cfg, device, autocast: bool, shape: tuple, text_tokens: int) -> dict:
    """DF+L2 steps (block-causal, bidirectional) and sf_dmd generator steps; seconds and peak GiB."""
    fpc, pred, b = cfg.data.frames_per_chunk, cfg.model.prediction, args.train_batch
    log(f"training: building the model (fp32 weights{', bf16 autocast' if autocast else ''}) ...")
    torch.manual_seed(0)
    student = build_on(cfg.model, device).train()
    student.enable_gradient_checkpointing()
    g = torch.Generator().manual_seed(0)
    ctx = torch.randn(b, text_tokens, cfg.model.text_dim, generator=g).to(device)
    x0 = torch.randn(b, *shape, generator=g).to(device)
    out: dict = {"train_batch": b, "train_shape": list(shape), "gradient_checkpointing": True,
                 "autocast_bf16": autocast, "optimizer": "AdamW",
                 **step_estimates(student, cfg, device, autocast, shape, b)}

    # DF+L2: one model trained, per-frame levels (Diffusion Forcing), block-causal vs bidirectional attention.
    opt = torch.optim.AdamW(student.parameters(), lr=1e-6)

    def df_loss(attention, student):  # arguments, not closures: the names are deleted below
        def fn():
            sigma = torch.rand(b, shape[1], generator=g).to(device)
            noise = torch.randn(x0.shape, generator=g).to(device)
            return flow_matching_loss(Denoiser(student, attention, fpc, pred), x0, ctx, sigma,
                                      torch.ones_like(sigma), noise)
        return fn

    modes = ("block_causal", "bidirectional")
    reset_peak(device, free=True)
    for m in modes:  # warm-up (and the optimizer's state)
        log(f"training: DF+L2 {m} warm-up step ...")
        timed_step(df_loss(m, student), opt, device, autocast)
    times, peaks = {m: [] for m in modes}, {m: 0.0 for m in modes}
    for r in range(args.train_repeats):  # interleaved: a busy spell of the machine hits both alike
        for m in modes:
            reset_peak(device)
            times[m].append(timed_step(df_loss(m, student), opt, device, autocast))
            peaks[m] = max(peaks[m], peak_gib(device))
        log(f"training: DF+L2 repeat {r + 1}/{args.train_repeats}: "
            + ", ".join(f"{m} {times[m][-1]:.3f} s" for m in modes))
    for m in modes:
        out[f"df_l2_{m}_s"] = statistics.median(times[m])
        out[f"df_l2_{m}_peak_gib"] = peaks[m]
    out["df_l2_ratio"] = out["df_l2_block_causal_s"] / out["df_l2_bidirectional_s"]
    del opt
    reset_peak(device, free=True)

    # sf_dmd generator step: student (trained), teacher and critic (frozen here), all of the same shape, held as the
    # distill stage holds them: the teacher's matmul weights in bf16 under autocast (`hold_frozen`), the critic in
    # fp32 (it trains in the critic's updates; its score call here caches no bf16 copy, as the stage's does not)
    log("training: sf_dmd generator step ...")
    teacher = hold_frozen(copy.deepcopy(student), "bf16" if autocast else "no")
    critic = copy.deepcopy(student).eval().requires_grad_(False)
    teacher.disable_gradient_checkpointing()
    critic.disable_gradient_checkpointing()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-6)
    d, st = cfg.distill, cfg.student
    method = SelfForcingDMD(
        generator=Denoiser(student, "block_causal", fpc, pred, st.clip_x0, rope=st.rope),
        real=Denoiser(teacher, "block_causal", fpc, pred), fake=Denoiser(critic, "block_causal", fpc, pred),
        sigmas=few_step_sigmas(st.denoising_steps, st.shift), real_guidance=d.real_guidance,
        fake_guidance=d.fake_guidance, sigma_shift=d.sigma_shift, context_sigma=st.context_sigma,
        max_context_frames=st.max_context_frames, sink_frames=st.sink_frames)
    batch = {"context": ctx, "null": torch.zeros_like(ctx), "shape": shape}

    def at_exit(k, method):
        def fn():
            method.exit_steps = lambda n, gen: torch.full((n,), k)
            return method.generator_loss(batch, g)[0]
        return fn

    steps = len(method.sigmas)
    reset_peak(device, free=True)
    timed_step(at_exit(steps - 1, method), opt, device, autocast)  # warm-up (and the optimizer's state)
    per_exit, peak = {k: [] for k in range(steps)}, 0.0
    for r in range(args.train_repeats):
        for k in range(steps):
            reset_peak(device)
            per_exit[k].append(timed_step(at_exit(k, method), opt, device, autocast))
            peak = max(peak, peak_gib(device))
        log(f"training: sf_dmd repeat {r + 1}/{args.train_repeats}: "
            + ", ".join(f"exit {k} {per_exit[k][-1]:.3f} s" for k in range(steps)))
    out["sf_dmd_by_exit_s"] = [statistics.median(per_exit[k]) for k in range(steps)]
    out["sf_dmd_generator_s"] = statistics.mean(out["sf_dmd_by_exit_s"])
    out["sf_dmd_peak_gib"] = peak
    out["real_guidance"] = d.real_guidance
    out["peak_memory_kind"] = ("torch.cuda.max_memory_allocated per step (weights, grads, AdamW state, "
                               "activations)" if device.type == "cuda" else
                               "CPU proxy: the process's max RSS so far (not per step; includes everything loaded)")
    del student, teacher, critic, opt, method
    reset_peak(device, free=True)
    return out


# ----------------------------------------------------------------------------------------------------------
# Config and main
# ----------------------------------------------------------------------------------------------------------

def build_on(model_cfg, device) -> torch.nn.Module:
    """`build_transformer` with random weights initialised on `device` itself (fast for a 1.3B model on a GPU)."""
    if model_cfg.pretrained:
        return build_transformer(model_cfg).float().to(device)
    with torch.device(device):
        return build_transformer(model_cfg)


def parse_args(argv):
    ap = argparse.ArgumentParser(prog="benchmarks/gpu_stream.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", help="a YAML config for the shape (default: Wan2.1-1.3B, built in)")
    ap.add_argument("--checkpoint", help="a diffusers transformer folder, or a folder holding one in transformer/ "
                                         "(a Wan pipeline, a stage: its raw weights); default: random weights")
    ap.add_argument("--vae", help="a diffusers AutoencoderKLWan (or pipeline) folder (default: the checkpoint's "
                                  "vae/, else random weights)")
    ap.add_argument("--vae-random", choices=("auto", "wan2.1", "tiny"), default="auto",
                    help="random VAE: Wan2.1's shape, a tiny one, or auto (Wan2.1 for a 16-ch latent >= 32x32)")
    ap.add_argument("--vae-dtype", choices=("bf16", "fp32", "fp16"), help="default: --dtype")
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    ap.add_argument("--dtype", choices=tuple(DTYPES), help="default: bf16 on CUDA, fp32 on a CPU")
    ap.add_argument("--frames", type=int, help="latent frames of the video (default: data.frames; Wan: 21)")
    ap.add_argument("--stream-frames", type=int, help="latent frames of the denoise-only streams (default: "
                                                      "max(frames, window + 4 chunks))")
    ap.add_argument("--window", type=int, help="cached latent frames, sinks included, current chunk excluded "
                                               "(student.max_context_frames)")
    ap.add_argument("--sinks", type=int, help="sink frames (student.sink_frames)")
    ap.add_argument("--steps", type=int, help="K evenly spaced denoising steps (default: student.denoising_steps)")
    ap.add_argument("--kv-cache", choices=("auto", "static", "dynamic"), help="default: student.kv_cache")
    ap.add_argument("--compile", action="store_true", help="model.compile_steady_state()")
    ap.add_argument("--compile-mode", help="mode passed to compile_steady_state (default: its own)")
    ap.add_argument("--compile-scope", choices=("blocks", "full"), default="blocks",
                    help="compile_steady_state's scope: one block serving all (regional), or the whole pass")
    ap.add_argument("--attention-backend", help="model.attention_backend (pipeline/models/attention.py BACKENDS)")
    ap.add_argument("--batch", type=int, default=1, help="videos per stream")
    ap.add_argument("--skip-training", action="store_true")
    ap.add_argument("--skip-vae", action="store_true")
    ap.add_argument("--train-batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="timed streams of each kind")
    ap.add_argument("--warmup", type=int, help="warm-up streams of each kind (default 1, 2 with --compile)")
    ap.add_argument("--train-repeats", type=int, default=2, help="timed steps of each training kind (per exit step)")
    ap.add_argument("--peak-n", type=int, help="matmul size for the rate (default 8192 on CUDA, 1024 on a CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="write every figure to this file")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    return ap, ap.parse_args(argv)


def settle_config(ap, args):
    overrides = list(args.overrides)
    if args.checkpoint:
        overrides.append(f"model.pretrained={args.checkpoint}")
    if args.attention_backend:
        overrides.append(f"model.attention_backend={args.attention_backend}")
    cfg = load_config(args.config, overrides, partial=None if args.config else WAN21_13B,
                      partial_source="the built-in Wan2.1-1.3B shape")
    st, fpc = cfg.student, cfg.data.frames_per_chunk
    frames = args.frames or cfg.data.frames
    window = args.window if args.window is not None else st.max_context_frames
    sinks = args.sinks if args.sinks is not None else st.sink_frames
    steps = uniform_denoising_steps(args.steps) if args.steps else list(st.denoising_steps)
    if frames % fpc:
        ap.error(f"--frames ({frames}) must be a multiple of the chunk ({fpc} latent frames)")
    if window is not None and (window % fpc or sinks % fpc or not 0 <= sinks < window):
        ap.error(f"--window ({window}) and --sinks ({sinks}) must be multiples of the chunk ({fpc}), sinks < window")
    cfg.data.frames = frames
    cfg.student = replace(st, max_context_frames=window, sink_frames=sinks, denoising_steps=steps,
                          kv_cache=args.kv_cache or st.kv_cache)
    stream = args.stream_frames or max(frames, (window or 0) + 4 * fpc)  # >= 3 steady blocks
    if stream % fpc:
        ap.error(f"--stream-frames ({stream}) must be a multiple of the chunk ({fpc})")
    return cfg, stream


def main(argv=None) -> int:
    ap, args = parse_args(argv)
    cfg, stream_frames = settle_config(ap, args)
    want = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if want == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device")
    result = run(cfg, args, stream_frames=stream_frames, device=torch.device(want),
                 argv=list(sys.argv[1:] if argv is None else argv))
    print_report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
        log(f"wrote {args.json}")
    return 0


def run(cfg, args, *, stream_frames: int, device: torch.device, argv: list[str]) -> dict:
    """Every figure (see the module's docstring) of the student at `cfg`'s shape (as `settle_config` left it) on
    `device`; `args`: the parsed options (`parse_args`), `argv` recorded in the settings. Returns the result
    `print_report` prints and `--json` writes (with its `goals`)."""
    dtype_name = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = DTYPES[dtype_name]
    warmup = args.warmup if args.warmup is not None else (2 if args.compile else 1)
    st, fpc = cfg.student, cfg.data.frames_per_chunk
    frames, window, sinks = cfg.data.frames, st.max_context_frames, st.sink_frames
    h, w = cfg.data.latent_size or (cfg.data.size, cfg.data.size)
    text_tokens = cfg.data.cond_tokens if cfg.data.kind == "sprites" else cfg.components.max_sequence_length

    log(f"building the transformer on {device} ...")
    torch.manual_seed(args.seed)
    model = build_on(cfg.model, device).eval().requires_grad_(False)
    if dtype != torch.float32:
        cast_like_diffusers(model, dtype)
    mc = model.config
    tpf = (h // mc.patch_size[1]) * (w // mc.patch_size[2])
    latent = (mc.in_channels, h, w)
    g = torch.Generator().manual_seed(args.seed)
    cond = torch.randn(args.batch, text_tokens, mc.text_dim, generator=g).to(device)
    sigmas = few_step_sigmas(st.denoising_steps, st.shift)
    # streams share their static caches' buffers, as `sample` does (a CUDA graph replays over the next stream's)
    denoiser = StreamDenoiser(model, "block_causal", fpc, cfg.model.prediction, st.clip_x0, rope=st.rope,
                              kv_cache=st.kv_cache, pool=BufferPool(), dtype=None if dtype == torch.float32 else dtype)
    s = Setup(denoiser, cond, sigmas, window, sinks, st.context_sigma, latent, args.batch, device)
    n_stream, n_video = stream_frames // fpc, frames // fpc
    # steady: the window was full already when the block's write (of the chunk before it) ran
    steady = [c for c in range(n_stream) if window is not None and (c - 1) * fpc >= window]
    steady_note = "window full for their write and denoising"
    if not steady:
        steady, steady_note = [n_stream - 1], "no full window: the last block"

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU {platform.processor() or platform.machine()} ({torch.get_num_threads()} threads)"
    settings = {
        "device": device.type, "gpu": gpu, "torch": torch.__version__, "cuda": torch.version.cuda,
        "dtype": dtype_name, "params": sum(p.numel() for p in model.parameters()),
        "layers": mc.num_layers, "heads": mc.num_attention_heads, "head_dim": mc.attention_head_dim,
        "ffn_dim": mc.ffn_dim, "patch": list(mc.patch_size), "latent": list(latent), "tokens_per_frame": tpf,
        "text_tokens": text_tokens, "batch": args.batch, "frames": frames, "stream_frames": stream_frames,
        "chunk_latent_frames": fpc, "window": window, "sinks": sinks,
        "self_forcing_local_attn_size": None if window is None else window + fpc,
        "steps": len(st.denoising_steps), "denoising_steps": list(st.denoising_steps), "shift": st.shift,
        "sigmas": [round(float(x), 4) for x in sigmas], "rope": st.rope, "kv_cache": st.kv_cache,
        "attention_backend": getattr(model, "attention_backend", None), "compile": False,
        "checkpoint": args.checkpoint, "argv": argv,
        "steady_blocks": steady, "steady_note": steady_note,
    }
    log(f"{settings['gpu']} | {dtype_name} | {settings['params'] / 1e6:.1f}M params | latent {latent} "
        f"({tpf} tokens/frame) | chunk {fpc} | window {window} sinks {sinks} | steps {st.denoising_steps}")
    result: dict = {"settings": settings}

    log(f"FLOPs: one counted stream of {stream_frames} frames ...")
    flops = flops_per_block(s, stream_frames, model)

    if args.compile:
        model.compile_steady_state(mode=args.compile_mode, scope=args.compile_scope)
        settings["compile_scope"] = args.compile_scope
        settings["compile"] = True
        settings["compile_mode"] = args.compile_mode

    vae, tmp = None, None
    if not args.skip_vae:
        log("building the VAE ...")
        tmp = tempfile.TemporaryDirectory(prefix="gpu_stream_vae_")
        vae_dtype = args.vae_dtype or dtype_name
        vae, vae_note = make_vae(args, latent, device, vae_dtype, Path(tmp.name))
        settings["vae"] = f"{vae_note}, {vae_dtype}"
        settings["pixels"] = [h * vae.scale_spatial, w * vae.scale_spatial]
    stride = vae.scale_temporal if vae is not None else 4
    chunk_px = fpc * stride
    video_px = 1 + stride * (frames - 1)

    log(f"warm-up: {warmup} x (fused stream, unfused stream, video{' + VAE' if vae else ''}) ...")
    t0 = time.perf_counter()
    for i in range(warmup):
        block_times(s, stream_frames, args.seed + i)
        unfused_breakdown(s, stream_frames, args.seed + i)
        video_end_to_end(s, frames, args.seed + i, vae)
        if vae is not None:
            video_overlapped(s, frames, args.seed + i, vae)
    settings["warmup_s"] = round(time.perf_counter() - t0, 1)
    log(f"warm-up took {settings['warmup_s']} s{' (compilation included)' if args.compile else ''}")
    settings["kv_cache_used"] = sorted(set(denoiser.cache_kinds))
    if device.type == "cuda":
        reset_peak(device)

    runs_a, runs_b, runs_c, runs_d = [], [], [], []
    for r in range(args.repeats):
        seed = args.seed + 100 + r
        runs_a.append(block_times(s, stream_frames, seed))
        runs_b.append(unfused_breakdown(s, stream_frames, seed))
        runs_c.append(video_end_to_end(s, frames, seed, vae))
        if vae is not None:
            runs_d.append(video_overlapped(s, frames, seed, vae))
        log(f"repeat {r + 1}/{args.repeats}: fused stream {sum(runs_a[-1]) * 1e3:.1f} ms, video "
            f"{runs_c[-1]['wall'] * 1e3:.1f} ms")
    if device.type == "cuda":
        result["inference_peak_gib"] = torch.cuda.max_memory_allocated(device) / GIB

    def med(xs):
        return statistics.median(xs)

    block_ms = [med(r[c] for r in runs_a) * 1e3 for c in range(n_stream)]
    dit_ms = [med(r[0][c] for r in runs_b) * 1e3 for c in range(n_stream)]
    write_ms = [med(r[1][c] for r in runs_b) * 1e3 for c in range(n_stream)]
    vae_ms = [med(r["vae"][c] for r in runs_c) * 1e3 for c in range(n_video)] if vae is not None else None
    video_dit_ms = [med(r["dit"][c] for r in runs_c) * 1e3 for c in range(n_video)]
    per_block = []
    for c in range(n_stream):
        per_block.append({
            "block": c, "cached_frames": c * fpc if window is None else min(c * fpc, window), "steady": c in steady,
            "block_ms": block_ms[c], "dit_ms": dit_ms[c], "write_ms": write_ms[c],
            "dit_plus_write_ms": dit_ms[c] + write_ms[c],
            "vae_ms": vae_ms[c] if vae_ms is not None and c < n_video else None,
            "flops": flops[c]})
    result["per_block"] = per_block

    steady_ms = med(block_ms[c] for c in steady)
    result.update({
        "steady_ms_per_block": steady_ms,
        "steady_dit_ms": med(dit_ms[c] for c in steady),
        "steady_write_ms": med(write_ms[c] for c in steady),
        "steady_ms_per_block_unfused": med(dit_ms[c] + write_ms[c] for c in steady),
        "first_chunk_ms": med(r["first_latents"] for r in runs_c) * 1e3,
        "first_chunk_pixels_ms": med(r["first_pixels"] for r in runs_c) * 1e3 if vae is not None else None,
        "vae_ms_per_block": med(vae_ms[1:] or vae_ms) if vae is not None else None,
        "vae_ms_first_block": vae_ms[0] if vae is not None else None,
        "chunk_pixel_frames": chunk_px, "video_pixel_frames": video_px,
        "fps_denoise": chunk_px / (steady_ms / 1e3),
        "fps_denoise_video": video_px / (med(sum(r["dit"]) for r in runs_c)),
        "video_dit_ms": video_dit_ms,
        "video_wall_s": med(r["wall"] for r in runs_c),
    })
    if vae is not None:
        decoded = {r["pixel_frames"] for r in runs_c}
        if decoded != {video_px}:
            raise AssertionError(f"the streaming decoder gave {decoded} pixel frames, expected {video_px}")
        result["fps_end_to_end"] = video_px / result["video_wall_s"]
        if {r["pixel_frames"] for r in runs_d} != {video_px}:
            raise AssertionError(f"the overlapping decoder gave {[r['pixel_frames'] for r in runs_d]} pixel frames")
        result.update({
            "video_wall_overlapped_s": med(r["wall"] for r in runs_d),
            "fps_end_to_end_overlapped": video_px / med(r["wall"] for r in runs_d),
            "first_chunk_pixels_overlapped_ms": med(r["first_pixels"] for r in runs_d) * 1e3,
            "vae_ms_per_block_overlapped": med(t for r in runs_d for t in (r["vae"][1:] or r["vae"])) * 1e3,
        })
    else:
        result["fps_end_to_end"] = result["fps_end_to_end_overlapped"] = None

    log("matmul rate ...")
    n = args.peak_n or (8192 if device.type == "cuda" else 1024)
    rate = matmul_rate(n, dtype, device, repeats=5, inner=10 if device.type == "cuda" else 1)
    block_flops = med(flops[c] for c in steady)
    floor_ms = block_flops / rate * 1e3
    result.update({"flops_per_block": block_flops, "flops_first_block": flops[0], "matmul_tflops": rate / 1e12,
                   "matmul_n": n, "floor_ms_per_block": floor_ms, "floor_ratio": steady_ms / floor_ms})

    del s, denoiser, model, vae
    if tmp is not None:
        tmp.cleanup()
    reset_peak(device, free=True)
    if not args.skip_training:
        # The streaming figures first, in case the training part does not finish (a time limit): printed, and
        # written to --json, which the full result replaces at the end.
        partial = {**result, "training": None, "training_pending": True}
        partial["goals"] = goals(partial)
        print_report(partial)
        if args.json:
            Path(args.json).write_text(json.dumps(partial, indent=1))
            log(f"wrote the streaming figures to {args.json} (training follows)")
        autocast = dtype == torch.bfloat16
        shape = (latent[0], frames, h, w)
        result["training"] = training(args, cfg, device, autocast, shape, text_tokens)
    else:
        result["training"] = None

    result["goals"] = goals(result)
    return result


def reference_setting(s: dict) -> bool:
    """The goals' setting: a GPU, the Wan2.1-1.3B shape at 480p, 3-frame chunks, a 21-frame video."""
    return (s["device"] == "cuda" and s["tokens_per_frame"] == 1560 and s["layers"] == 30 and s["heads"] == 12
            and s["chunk_latent_frames"] == 3 and s["frames"] == 21)


def goals(result: dict) -> list[dict]:
    """The issue's goals with the measured values; met / not met only in the reference setting (else None)."""
    flat = {**result, **(result.get("training") or {})}
    out = []
    for key, text, op, bound, unit in GOALS:
        v = flat.get(key)
        met = None
        if reference_setting(result["settings"]) and v is not None:
            met = v <= bound if op == "<=" else v >= bound
        out.append({"key": key, "goal": text, "op": op, "bound": bound, "unit": unit, "measured": v, "met": met})
    return out


def fmt(v, digits: int = 1) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float) and (not math.isfinite(v) or abs(v) >= 1e5 or (v and abs(v) < 1e-2)):
        return f"{v:.3g}"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def print_report(r: dict) -> None:
    s = r["settings"]
    print(f"device     {s['gpu']} (torch {s['torch']}, CUDA {s['cuda'] or '-'})")
    print(f"model      {s['params'] / 1e6:.1f}M params: {s['layers']} layers, {s['heads']} heads x {s['head_dim']}, "
          f"ffn {s['ffn_dim']}, patch {tuple(s['patch'])}; {s['checkpoint'] or 'random weights'}")
    print(f"dtype      {s['dtype']} | attention {s['attention_backend']} | kv cache {s['kv_cache']} "
          f"({', '.join(s.get('kv_cache_used', []))}) | compile {s['compile']}")
    print(f"latent     {s['latent'][0]} x {s['latent'][1]} x {s['latent'][2]} ({s['tokens_per_frame']} tokens/frame)"
          + (f" -> {s['pixels'][0]} x {s['pixels'][1]} px" if s.get("pixels") else "")
          + f"; text {s['text_tokens']} tokens; batch {s['batch']}")
    print(f"chunk      {s['chunk_latent_frames']} latent frames = {r['chunk_pixel_frames']} video frames; "
          f"video {s['frames']} latent = {r['video_pixel_frames']} video frames; stream {s['stream_frames']} latent")
    print(f"window     {s['window']} cached latent frames incl. {s['sinks']} sinks (ours: max_context_frames="
          f"{s['window']}, sink_frames={s['sinks']}; Self-Forcing local_attn_size={s['self_forcing_local_attn_size']},"
          f" counting the current chunk)")
    print(f"steps      {s['steps']}: {s['denoising_steps']} shift {s['shift']} (sigmas {s['sigmas']})")
    if s.get("vae"):
        print(f"vae        {s['vae']}, streaming decode")
    print()
    print("block  cached  block ms (fused)  DiT ms  write ms  DiT+write  VAE ms   GFLOP")
    for b in r["per_block"]:
        print(f"{b['block']:>5}{'*' if b['steady'] else ' '} {b['cached_frames']:>6}  {fmt(b['block_ms']):>16}  "
              f"{fmt(b['dit_ms']):>6}  {fmt(b['write_ms']):>8}  {fmt(b['dit_plus_write_ms']):>9}  "
              f"{fmt(b['vae_ms']):>6}  {b['flops'] / 1e9:>6.4g}")
    print(f"* steady blocks ({s['steady_note']}); DiT/write: unfused stream, each call timed; "
          f"block ms: the sampler's fused stream")
    print()
    print(f"first chunk          {fmt(r['first_chunk_ms'])} ms to latents, {fmt(r['first_chunk_pixels_ms'])} "
          f"{'ms ' if r['first_chunk_pixels_ms'] is not None else ''}to pixels")
    print(f"steady state         {fmt(r['steady_ms_per_block'])} ms per block (fused write); unfused "
          f"{fmt(r['steady_ms_per_block_unfused'])} = DiT {fmt(r['steady_dit_ms'])} + write "
          f"{fmt(r['steady_write_ms'])}")
    print(f"VAE decode           {fmt(r['vae_ms_per_block'])} ms per block (first block "
          f"{fmt(r['vae_ms_first_block'])})")
    print(f"FPS denoise-only     {fmt(r['fps_denoise'])} (steady, {r['chunk_pixel_frames']} frames per block); "
          f"over the video {fmt(r['fps_denoise_video'])}")
    print(f"FPS end to end       {fmt(r['fps_end_to_end'])} ({r['video_pixel_frames']} frames in "
          f"{fmt(r['video_wall_s'], 3)} s, decode in sequence)")
    if r.get("fps_end_to_end_overlapped") is not None:
        how = ("each chunk's decode on its own CUDA stream beside the next chunk's denoising" if s["device"] == "cuda"
               else "no CUDA stream here: decoded in sequence again")
        print(f"  decode overlapped  {fmt(r['fps_end_to_end_overlapped'])} ({fmt(r['video_wall_overlapped_s'], 3)} s; "
              f"{how}: {fmt(r['vae_ms_per_block_overlapped'])} ms of decode per block; first chunk to pixels "
              f"{fmt(r['first_chunk_pixels_overlapped_ms'])} ms)")
    print(f"FLOPs per block      {r['flops_per_block'] / 1e12:.4g} TFLOP (first block "
          f"{r['flops_first_block'] / 1e12:.4g}); {s['dtype']} matmul {fmt(r['matmul_tflops'], 2)} TFLOP/s "
          f"(n={r['matmul_n']})")
    print(f"floor                {fmt(r['floor_ms_per_block'], 2)} ms per block; measured / floor = "
          f"{fmt(r['floor_ratio'], 2)}")
    if r.get("inference_peak_gib") is not None:
        print(f"inference peak       {fmt(r['inference_peak_gib'], 2)} GiB")
    t = r.get("training")
    if t:
        print()
        print(f"training (batch {t['train_batch']} x {tuple(t['train_shape'])}, gradient checkpointing, AdamW"
              f"{', bf16 autocast' if t['autocast_bf16'] else ''}):")
        print(f"DF+L2 step           block-causal {fmt(t['df_l2_block_causal_s'], 3)} s, bidirectional "
              f"{fmt(t['df_l2_bidirectional_s'], 3)} s, ratio {fmt(t['df_l2_ratio'], 2)}; peak "
              f"{fmt(t['df_l2_block_causal_peak_gib'], 2)} / {fmt(t['df_l2_bidirectional_peak_gib'], 2)} GiB "
              f"(--dry-run rules: {fmt(t['df_l2_block_causal_estimate_gib'], 2)} / "
              f"{fmt(t['df_l2_bidirectional_estimate_gib'], 2)})")
        print(f"sf_dmd generator     {fmt(t['sf_dmd_generator_s'], 3)} s (mean over exit steps: "
              + ", ".join(f"{x:.3f}" for x in t["sf_dmd_by_exit_s"])
              + f"; real guidance {t['real_guidance']}); peak {fmt(t['sf_dmd_peak_gib'], 2)} GiB "
              f"(--dry-run rules: {fmt(t['sf_dmd_estimate_gib'], 2)})")
        print(f"peak memory          {t['peak_memory_kind']}")
    print()
    print("goals (Wan2.1-1.3B, 480p, 3-frame chunks, 81 frames, on an H200)" + (
        "" if reference_setting(s) else " -- not measured in that setting (here: "
        + ("a CPU" if s["device"] != "cuda" else "another shape") + "), no verdicts"))
    for gl in r["goals"]:
        verdict = "" if gl["met"] is None else ("  met" if gl["met"] else "  NOT met")
        print(f"  {gl['goal']:<52} {gl['op']} {gl['bound']:g} {gl['unit']:<4} measured {fmt(gl['measured'], 2)}"
              f"{verdict}")


if __name__ == "__main__":
    t0 = time.time()
    rc = main()
    log(f"({time.time() - t0:.0f} s)")
    sys.exit(rc)
