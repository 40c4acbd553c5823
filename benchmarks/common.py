"""What the benchmark scripts share: the model to measure and the timed exit."""

from __future__ import annotations

import sys
import time

import torch

from pipeline.models.causal_wan import build_transformer
from pipeline.config import load_config
from pipeline.data.sources import class_table
from pipeline.models.loading import load_source


def model_to_measure(source: str | None, config: str | None):
    """(model, class table, config): a stage or diffusers folder, else random weights (seed 0) of a
    config's model (default configs/tiny.yaml)."""
    if source:
        return load_source(source)
    cfg = load_config(config or "configs/tiny.yaml")
    torch.manual_seed(0)
    return build_transformer(cfg.model).eval(), class_table(cfg), cfg


class BenchmarkArgError(ValueError):
    """Options a benchmark cannot run with: its command line reports them as a usage error (exit status 2)."""


def run_timed(main) -> None:
    """Run `main()`, print the total seconds, exit with its status."""
    t0 = time.time()
    rc = main()
    print(f"({time.time() - t0:.0f} s)")
    sys.exit(rc)


def sync(device) -> None:
    """Wait for the device's queued work (a no-op on the CPU), so a host clock measures it."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(n: int, dtype: torch.dtype, device, repeats: int = 5, inner: int = 1) -> float:
    """FLOP/s of an n×n @ n×n matmul (2n³ FLOPs) in `dtype` on `device`: the best of `repeats` timings of
    `inner` back-to-back products (several on a GPU, so the launch gap does not count)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    torch.mm(a, b, out=out)  # warm-up
    sync(device)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b, out=out)
        sync(device)
        best = min(best, (time.perf_counter() - t) / inner)
    return 2 * n ** 3 / best


def register_cpu_sdpa_flops() -> None:
    """Give `FlopCounterMode` torch's SDPA formula for the CPU attention kernel, which it counts as 0
    (idempotent; forward_flops.py does the same at import)."""
    from torch.utils import flop_counter

    op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if op not in flop_counter.flop_registry:
        flop_counter.register_flop_formula(op, get_raw=True)(flop_counter.sdpa_flop)
