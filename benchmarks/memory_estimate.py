"""The `--dry-run` memory estimate against the peak measured on this machine, per training stage.

    python benchmarks/memory_estimate.py [--config CONFIG] [--stages s1,s2] [key=value ...]
    accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml --num_processes N \
        benchmarks/memory_estimate.py ...   # the estimate of that backend and process count, per process

Runs pretrain_teacher, init_student and distill (or `--stages`) in a temporary run dir, each under
`pipeline.training.memory.TensorPeak` (the peak bytes of live tensors: weights, optimizer, EMA, activations,
caches; on a CPU as `max_memory_allocated` would count them on a GPU) or, when the run uses a GPU,
`torch.cuda.max_memory_allocated`, and prints each stage's estimate (`pipeline.plan.memory_estimate`,
one process) next to it. Small configurations run on a CPU in seconds; tests/test_checkpointing.py
checks one within 25 %.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import load_config  # noqa: E402
from pipeline.training.memory import TensorPeak  # noqa: E402
from pipeline.cli import parse_with_overrides  # noqa: E402
from pipeline.training.distributed import launched_backend, launched_deepspeed, run_device  # noqa: E402
from pipeline.plan import memory_estimate  # noqa: E402
from pipeline.methods import method_for  # noqa: E402
from pipeline.training.trainer import Trainer  # noqa: E402

STAGES = ("pretrain_teacher", "init_student", "distill")


def measure(cfg, stages=STAGES, verbose: bool = False) -> dict[str, tuple[float, float, str]]:
    """Run `stages` of `cfg` in order (its run dir) and return `{stage: (measured peak bytes, estimated
    bytes, the estimate's peak phase)}`."""
    out = {}
    cuda = run_device(cfg).type == "cuda"
    backend, zero, processes = launched_backend()
    for stage in stages:
        est = memory_estimate(cfg, stage, num_processes=processes, backend=backend, stage_zero=zero,
                              deepspeed=launched_deepspeed())
        def run(cfg, force, _stage=stage):  # what `python -m stages.<stage>` runs
            return Trainer(method_for(_stage, cfg), force=force).run()
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            run(cfg, force=True)
            measured = float(torch.cuda.max_memory_allocated())
        else:
            with TensorPeak() as peak:
                run(cfg, force=True)
            measured = float(peak.peak)
        out[stage] = (measured, est.total, est.phase)
        if verbose:
            parts = ", ".join(f"{k} {getattr(est, k) / 2**20:.1f}" for k in est.COMPONENTS if getattr(est, k))
            print(f"{stage}: measured {measured / 2**20:.1f} MiB; estimate {est.total / 2**20:.1f} MiB ({parts})",
                  flush=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config")
    ap.add_argument("--stages", default=",".join(STAGES))
    ap.add_argument("overrides", nargs="*")
    args = parse_with_overrides(ap, argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(args.config, [f"run.dir={tmp}/run", *args.overrides])
        rows = measure(cfg, args.stages.split(","), verbose=True)
    print(f"{'stage':18s} {'measured MiB':>13s} {'estimate MiB':>13s} {'ratio':>6s}  peak phase (estimate)")
    for stage, (measured, est, phase) in rows.items():
        print(f"{stage:18s} {measured / 2**20:13.1f} {est / 2**20:13.1f} {est / measured:6.2f}  {phase}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
