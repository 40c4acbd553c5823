"""Streaming throughput: our 4-step KV-cache student vs diffusers' SkyReelsV2DiffusionForcingPipeline.

    python benchmarks/skyreels_stream.py                      # tiny.yaml's model and sampler, 48 latent frames
    python benchmarks/skyreels_stream.py --layers 8 --heads 8 --head-dim 32 --size 32 --batch 4
    options: --config configs/tiny.yaml  --frames 48  --batch 16  --channels C  --ffn F  --repeats 3  --limit 5
             --sky-mode {one_window,rolling,both} (default both)
             --sky-window W (rolling's window in latent frames, a multiple of the chunk; default below)

Both sides get randomly initialised transformers of the same dims (layers, heads, head dim, ffn, in/out
channels, patch, text_dim, freq_dim), the same prompt embeddings (the config's class table), the same
batch, the same steps (len(student.denoising_steps) = 4), no guidance, latents out (no VAE decode), one
process so the same threads. Times: one warm-up, then the median of `--repeats` runs.

Ours: `sample_videos` (the few-step sampler) — chunks of `data.frames_per_chunk` latent frames, 4 calls on the
chunk's frames plus one cache write (none after the last chunk), attending to a rolling KV cache of
`student.max_context_frames` frames (48 frames in 3-frame chunks: 16 x 5 - 1 = 79 calls, 237 frames).

SkyReels, causal_block_size = frames_per_chunk (3; block-causal attention, like our chunks), UniPC
(flow_prediction, shift 8 as in its docs), one scheduler copy per frame as the pipeline does; the tiny
VAE only sets the 4x/8x scale factors (its z_dim = the transformer's in_channels) and is never run.
Pixel frames = (latent-1)*4+1 (the Wan VAE compresses time by 4). Two settings:
  one_window — the issue's "48 frames in one run": num_frames = base_num_frames = (48-1)*4+1 = 189,
    no overlap_history, ar_step = steps (4). In `generate_timestep_matrix` block i then starts when block
    i-1 reaches its last step (ar_step >= steps is fully sequential; it is accepted: the ar_step check only
    applies when the video has more blocks than the window), so each chunk is fully denoised before the
    next starts: our chunk-by-chunk causal semantics with the same 4 steps per chunk, but no KV cache.
    Every iteration's valid interval is the whole window (0, 48): 16 blocks x 4 = 64 calls over all 48
    frames (3072 frames through the network; clean history at t=0 and not-yet-started noise at t=999
    included), only 3 of which are updated. That recomputation is exactly the cost a KV cache removes.
    SkyReels also gets more context here (all earlier frames vs our 6-frame KV window).
  rolling — equal context: a window of W = max_context_frames + frames_per_chunk latent frames (6 + 3 = 9
    for tiny.yaml), i.e. the frames our newest chunk attends to: base_num_frames = (W-1)*4+1 (33),
    overlap_history = (max_context_frames-1)*4+1 (21 -> 6 latent frames of clean history per window),
    ar_step = 0 (its default and cheapest schedule: after the first window only one block is noisy, so
    any ar_step gives the same 4 calls), num_frames = 189: a first window of W frames, then windows that
    each add frames_per_chunk new frames, every call re-running all W frames (history included).
Also printed: time inside the transformers alone (forward hooks), separating network cost from
pipeline overhead (SkyReels' per-frame scheduler steps, our re-noising). Exit status 1 when the
end-to-end ratio SkyReels/ours of `one_window` (of `rolling` with --sky-mode rolling) is under `--limit`.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from diffusers import (AutoencoderKLWan, SkyReelsV2DiffusionForcingPipeline, SkyReelsV2Transformer3DModel,
                       UniPCMultistepScheduler)
from diffusers.utils import logging as diffusers_logging

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import BenchmarkArgError, run_timed  # noqa: E402
from pipeline.models.causal_wan import build_transformer  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.data.sources import class_table  # noqa: E402
from pipeline.data.sprites import balanced_labels  # noqa: E402
from pipeline.diffusion.videos import sample_videos  # noqa: E402


class NetClock:
    """Seconds, calls and frames (summed over calls) inside a module's forward."""

    def __init__(self, module):
        self.reset()
        module.register_forward_pre_hook(self._start, with_kwargs=True)
        module.register_forward_hook(self._stop)

    def reset(self):
        self.seconds, self.calls, self.frames = 0.0, 0, 0

    def _start(self, module, args, kwargs):
        x = args[0] if args else kwargs["hidden_states"]
        self.calls, self.frames, self.t0 = self.calls + 1, self.frames + x.shape[2], time.perf_counter()

    def _stop(self, module, args, out):
        self.seconds += time.perf_counter() - self.t0


def skyreels_pipe(m, fpc: int) -> SkyReelsV2DiffusionForcingPipeline:
    transformer = SkyReelsV2Transformer3DModel(
        patch_size=tuple(m.patch_size), num_attention_heads=m.num_attention_heads,
        attention_head_dim=m.attention_head_dim, in_channels=m.in_channels, out_channels=m.out_channels,
        text_dim=m.text_dim, freq_dim=m.freq_dim, ffn_dim=m.ffn_dim, num_layers=m.num_layers,
        cross_attn_norm=m.cross_attn_norm, rope_max_seq_len=m.rope_max_seq_len,
        inject_sample_info=False,  # the fps embedding: extra weights our model lacks
        num_frame_per_block=fpc).eval()
    c = m.in_channels  # never run: sets the 4x time / 8x space factors; z_dim must match the latents
    vae = AutoencoderKLWan(base_dim=4, z_dim=c, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                           temperal_downsample=[False, True, True], latents_mean=[0.0] * c, latents_std=[1.0] * c)
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                        num_train_timesteps=1000, flow_shift=8.0)
    # No tokenizer/text encoder: prompt_embeds are passed in, so the pipeline never tokenizes.
    pipe = SkyReelsV2DiffusionForcingPipeline(tokenizer=None, text_encoder=None, transformer=transformer, vae=vae,
                                              scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def timed(fn, clock: NetClock, repeats: int):
    """Median seconds end to end and inside the network, and the last output, over `repeats` runs after
    one warm-up."""
    fn(0)
    times, net, out = [], [], None
    for seed in range(repeats):
        clock.reset()
        t0 = time.perf_counter()
        out = fn(seed)
        times.append(time.perf_counter() - t0)
        net.append(clock.seconds)
    return statistics.median(times), statistics.median(net), out


def run(cfg, *, layers: int | None = None, heads: int | None = None, head_dim: int | None = None,
        ffn: int | None = None, size: int | None = None, channels: int | None = None, batch: int = 16,
        frames: int = 48, sky_mode: str = "both", sky_window: int | None = None, repeats: int = 3,
        limit: float = 5.0) -> dict:
    """Time our student sampler and SkyReels-V2's pipeline on random transformers of `cfg.model`'s dims (the
    options override them), printing as it goes. Returns `{"seconds": {name: (end to end, network)}, "judged",
    "ratio", "passed"}` (passed: SkyReels / ours end to end >= limit for the judged mode)."""
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        with torch.no_grad():
            return _run(cfg, layers, heads, head_dim, ffn, size, channels, batch, frames, sky_mode, sky_window,
                        repeats, limit)
    finally:
        diffusers_logging.set_verbosity(level)


def _run(cfg, layers, heads, head_dim, ffn, size, channels, batch, frames, sky_mode, sky_window, repeats,
         limit) -> dict:
    m = cfg.model
    heads, head_dim = heads or m.num_attention_heads, head_dim or m.attention_head_dim
    ffn = ffn or (m.ffn_dim if (heads, head_dim) == (m.num_attention_heads, m.attention_head_dim)
                  else 4 * heads * head_dim)
    ch = channels or m.in_channels
    m = replace(m, num_layers=layers or m.num_layers, num_attention_heads=heads, attention_head_dim=head_dim,
                ffn_dim=ffn, in_channels=ch, out_channels=ch, pretrained=None)
    size, fpc, student, b = size or cfg.data.size, cfg.data.frames_per_chunk, cfg.student, batch
    if size % 2 or size % m.patch_size[1] or frames % fpc:
        raise BenchmarkArgError(f"--size must be even and a multiple of the patch; --frames a multiple of {fpc}")
    steps = len(student.denoising_steps)
    window = min(sky_window or (student.max_context_frames or frames) + fpc, frames)
    if window % fpc or window <= fpc and window < frames:
        raise BenchmarkArgError(f"--sky-window must be a multiple of {fpc} above {fpc}")
    ctx = window - fpc  # clean history per window, the counterpart of our KV window

    torch.manual_seed(0)
    ours = build_transformer(m).eval()
    pipe = skyreels_pipe(m, fpc)
    n_ours, n_sky = (sum(p.numel() for p in net.parameters()) for net in (ours, pipe.transformer))
    print(f"transformers: {m.num_layers} layers, {heads} heads x {head_dim}, ffn {ffn}, patch {tuple(m.patch_size)}, "
          f"{ch} channels; params ours {n_ours:,} / SkyReels {n_sky:,}")
    print(f"video: {frames} latent frames of {size}x{size}, batch {b}, {steps} steps, {torch.get_num_threads()} threads")
    print(f"ours: chunks of {fpc}, KV window {student.max_context_frames} frames (sinks {student.sink_frames})")
    px = lambda lat: (lat - 1) * 4 + 1  # noqa: E731  latent -> pixel frames (Wan VAE)
    settings = {  # name -> (window in latent frames, pipeline kwargs)
        "one_window": (frames, dict(num_frames=px(frames), base_num_frames=px(frames), ar_step=steps,
                                    causal_block_size=fpc, overlap_history=None)),
        "rolling": (window, dict(num_frames=px(frames), base_num_frames=px(window), ar_step=0, causal_block_size=fpc,
                                 overlap_history=px(ctx) if window < frames else None))}
    modes = list(settings) if sky_mode == "both" else [sky_mode]
    for mode in modes:
        w, kw = settings[mode]
        print(f"SkyReels {mode}: window {w} latent frames, " + ", ".join(f"{k}={v}" for k, v in kw.items()))

    table, labels = class_table(cfg), balanced_labels(b)
    emb = table[labels]  # the same prompt embeddings for both sides
    clocks = {"ours": NetClock(ours), "SkyReels": NetClock(pipe.transformer)}

    def run_ours(seed):
        return sample_videos(ours, table, labels, frames=frames, size=size, frames_per_chunk=fpc,
                             prediction=m.prediction, student=student, seed=seed, channels=ch, few_step=True)

    def run_sky(kw):
        return lambda seed: pipe(prompt=None, prompt_embeds=emb, height=size * 8, width=size * 8,
                                 num_inference_steps=steps, guidance_scale=1.0, output_type="latent",
                                 generator=torch.Generator().manual_seed(seed), **kw).frames

    results = {}
    for name, fn in [("ours", run_ours)] + [(mode, run_sky(settings[mode][1])) for mode in modes]:
        k = clocks["ours" if name == "ours" else "SkyReels"]
        t, t_net, out = timed(fn, k, repeats)
        results[name] = (t, t_net)
        print(f"{name:10s} {t:7.3f} s  {b * frames / t:8.1f} latent frames/s  output {tuple(out.shape)}  "
              f"network {t_net:.3f} s in {k.calls} calls ({k.frames} frames through it per video)")
        if name != "ours" and out.shape[2] != frames:  # (B, C, F, H, W); ours is (B, F, C, H, W)
            print(f"error: SkyReels {name} produced {out.shape[2]} latent frames, not {frames}")
            return {"seconds": results, "judged": name, "ratio": None, "passed": False}
    for mode in modes:
        ratio, net_ratio = (results[mode][i] / results["ours"][i] for i in (0, 1))
        print(f"{mode:10s} ours faster by x{ratio:.2f} end to end, x{net_ratio:.2f} inside the transformers")
    judged = modes[0]  # one_window unless only rolling was run
    ratio = results[judged][0] / results["ours"][0]
    print(f"{judged}: x{ratio:.2f} {'>=' if ratio >= limit else '<'} limit {limit}")
    return {"seconds": results, "judged": judged, "ratio": ratio, "passed": ratio >= limit}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks/skyreels_stream.py")
    ap.add_argument("--config", default="configs/tiny.yaml", help="model defaults and the student sampler")
    ap.add_argument("--layers", type=int)
    ap.add_argument("--heads", type=int)
    ap.add_argument("--head-dim", type=int)
    ap.add_argument("--ffn", type=int, help="default: the config's, or 4x the width when heads/head-dim change")
    ap.add_argument("--size", type=int, help="latent height = width (default data.size)")
    ap.add_argument("--channels", type=int, help="latent channels (default model.in_channels)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--frames", type=int, default=48, help="latent frames per video")
    ap.add_argument("--sky-mode", choices=("one_window", "rolling", "both"), default="both",
                    help="one_window: all frames in one window, ar_step = steps; rolling: the KV window's context")
    ap.add_argument("--sky-window", type=int, help="rolling's window in latent frames (default: KV window + chunk); "
                    "each window adds one chunk of new frames")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--limit", type=float, default=5.0)
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    diffusers_logging.set_verbosity_error()
    try:
        result = run(load_config(args.config), layers=args.layers, heads=args.heads, head_dim=args.head_dim,
                     ffn=args.ffn, size=args.size, channels=args.channels, batch=args.batch, frames=args.frames,
                     sky_mode=args.sky_mode, sky_window=args.sky_window, repeats=args.repeats, limit=args.limit)
    except BenchmarkArgError as e:
        ap.error(str(e))
    return 0 if result["passed"] else 1


if __name__ == "__main__":
    run_timed(main)
