"""Forward GFLOP/s of the causal student as a fraction of the fp32 matmul peak measured in the same run.

    python benchmarks/forward_flops.py runs/tiny/init_student          # a student stage (or diffusers folder)
    python benchmarks/forward_flops.py --config configs/tiny.yaml      # random weights of the config's shape
    python benchmarks/forward_flops.py --wan13b --layers 2             # Wan2.1-1.3B shape, 480p latent, 2 of 30 layers
    options: --batch 1  --size H W (latent)  --layers N  --window W  --repeats 3  --peak-n 2048  --limit 40

One forward = one denoising call on one chunk (`data.frames_per_chunk` frames) attending to a KV cache
that holds the rolling window (`student.max_context_frames` frames, or `--window`), as in
`few_step_rollout`. FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` (matmuls and
attention; norms, RoPE and modulation count zero). Torch has no formula for the CPU attention kernel
(`_scaled_dot_product_flash_attention_for_cpu`, where it counts 0), so its own SDPA formula
(4·B·H·Lq·Lk·d) is registered for it; the attention total is printed next to the analytic one. Time:
median of `--repeats` after a warm-up, no_grad, fp32. Peak: best of `--peak-repeats` n×n fp32 matmuls
(2n³ FLOPs), same process and threads. Exit status 1 when the forward reaches less than `--limit` %.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import BenchmarkArgError, run_timed  # noqa: E402
from pipeline.models.causal_wan import KVCache, build_transformer  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.diffusion.sampling import Denoiser  # noqa: E402
from pipeline.models.loading import load_source  # noqa: E402

WAN13B = dict(patch_size=[1, 2, 2], num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
              text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True, pretrained=None)
WAN13B_LATENT, WAN13B_TEXT_TOKENS = (60, 104), 512  # 480x832 video through the 8x VAE; umT5 prompt length

CPU_SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
if CPU_SDPA not in flop_counter.flop_registry:
    flop_counter.register_flop_formula(CPU_SDPA, get_raw=True)(flop_counter.sdpa_flop)


def seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def matmul_peak(n: int, repeats: int) -> float:
    a, b, out = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    torch.mm(a, b, out=out)  # warm-up
    return 2 * n ** 3 / min(seconds(lambda: torch.mm(a, b, out=out)) for _ in range(repeats))


def run(model, cfg, *, wan13b: bool = False, layers: int | None = None, size: tuple[int, int] | None = None,
        batch: int = 1, window: int | None = None, repeats: int = 3, peak_n: int = 2048, peak_repeats: int = 5,
        limit: float = 40.0) -> dict:
    """FLOPs and time of one student forward of `model` (fp32, eval; only its first `layers` blocks if given) on
    one chunk against a full KV window (`window`, default `student.max_context_frames`), printing as it goes.
    `wan13b`: the Wan2.1-1.3B latent size and prompt length. Returns `{"gflop", "ms", "gflops", "peak_gflops",
    "percent", "passed"}` (passed: percent >= limit)."""
    model = model.float().eval()
    if layers:
        model.blocks = model.blocks[:layers]
    mc = model.config
    fpc, window = cfg.data.frames_per_chunk, window or cfg.student.max_context_frames
    if not window:
        raise BenchmarkArgError("no rolling window in the config (student.max_context_frames): give --window")
    h, w = size or (WAN13B_LATENT if wan13b else (cfg.data.size, cfg.data.size))
    b, text_tokens = batch, WAN13B_TEXT_TOKENS if wan13b else cfg.data.cond_tokens
    with torch.no_grad():
        cond = torch.randn(b, text_tokens, mc.text_dim)
        denoiser = Denoiser(model, "block_causal", fpc, cfg.model.prediction, cfg.student.clip_x0)

        # Fill the window in one cache-writing call, as the rollout's context writes do chunk by chunk.
        cache = KVCache(max_frames=window, sink_frames=cfg.student.sink_frames)
        denoiser(torch.randn(b, mc.in_channels, window, h, w), torch.zeros(b, window), cond, cache, write_cache=True)
        assert len(cache) == window, (len(cache), window)
        x, sigma = torch.randn(b, mc.in_channels, fpc, h, w), torch.ones(b, fpc)

        def forward():
            return denoiser.predict_x0(x, sigma, cond, cache)  # write_cache=False: the cache stays as filled

        tpf = (h // mc.patch_size[1]) * (w // mc.patch_size[2])
        lq, lk = fpc * tpf, (window + fpc) * tpf
        print(f"model: {len(model.blocks)} layers, {mc.num_attention_heads} heads x {mc.attention_head_dim}, "
              f"ffn {mc.ffn_dim}, patch {tuple(mc.patch_size)}; latent {mc.in_channels}x{h}x{w}, batch {b}, "
              f"{text_tokens} text tokens; chunk {fpc} frames ({lq} tokens) + cache {window} frames "
              f"({lk - lq} tokens); {torch.get_num_threads()} threads")

        with FlopCounterMode(display=False) as counter:
            forward()
        flops = counter.get_total_flops()
        attn_ops = {str(k): v for k, v in counter.get_flop_counts()["Global"].items() if "attention" in str(k)}
        attn_analytic = (4 * len(model.blocks) * b * mc.num_attention_heads * mc.attention_head_dim * lq
                         * (lk + text_tokens))
        print(f"FLOPs per forward: {flops / 1e9:.4g} GFLOP; attention {sum(attn_ops.values()) / 1e9:.4g} GFLOP "
              f"(ops {', '.join(attn_ops) or 'none'}; analytic 4*B*H*d*Lq*(Lk+text) = {attn_analytic / 1e9:.4g})")

        forward()  # warm-up
        t = statistics.median(seconds(forward) for _ in range(repeats))
        achieved = flops / t
        print(f"forward: median {t * 1000:.1f} ms over {repeats} -> {achieved / 1e9:.1f} GFLOP/s")
        peak = matmul_peak(peak_n, peak_repeats)
    print(f"fp32 matmul peak: {peak / 1e9:.1f} GFLOP/s (n={peak_n}, best of {peak_repeats})")
    pct = 100 * achieved / peak
    print(f"forward / peak = {pct:.1f} % (limit {limit:g} %)")
    return {"gflop": flops / 1e9, "ms": t * 1000, "gflops": achieved / 1e9, "peak_gflops": peak / 1e9,
            "percent": pct, "passed": pct >= limit}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="benchmarks/forward_flops.py")
    ap.add_argument("source", nargs="?", help="student stage folder or diffusers folder")
    ap.add_argument("--config", help="without a source: random weights of this config's model (and its chunk/window)")
    ap.add_argument("--wan13b", action="store_true", help="random weights of the Wan2.1-1.3B transformer shape")
    ap.add_argument("--layers", type=int, help="keep only the first N blocks")
    ap.add_argument("--size", type=int, nargs=2, metavar=("H", "W"), help="latent height and width")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--window", type=int, help="override student.max_context_frames")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--peak-n", type=int, default=2048)
    ap.add_argument("--peak-repeats", type=int, default=5)
    ap.add_argument("--limit", type=float, default=40.0, help="minimum %% of the matmul peak")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    model, cfg = model_to_measure(args.source, args.config, wan13b=args.wan13b, layers=args.layers)
    try:
        result = run(model, cfg, wan13b=args.wan13b, layers=args.layers, size=args.size, batch=args.batch,
                     window=args.window, repeats=args.repeats, peak_n=args.peak_n, peak_repeats=args.peak_repeats,
                     limit=args.limit)
    except BenchmarkArgError as e:
        ap.error(str(e))
    return 0 if result["passed"] else 1


def model_to_measure(source: str | None, config: str | None, *, wan13b: bool = False, layers: int | None = None):
    """(model, config): a student stage or diffusers folder, else random weights (seed 0) of a config's model
    (default configs/tiny.yaml), or of the Wan2.1-1.3B shape (`wan13b`, `layers` of its 30 blocks)."""
    if source:
        model, _, cfg = load_source(source)
        return model, cfg
    cfg = load_config(config or "configs/tiny.yaml")
    torch.manual_seed(0)
    model_cfg = replace(cfg.model, **{**WAN13B, "num_layers": layers or 30}) if wan13b else cfg.model
    return build_transformer(model_cfg), cfg


if __name__ == "__main__":
    run_timed(main)
