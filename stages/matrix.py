"""Seed 002's method × loss matrix, measured on sprites: one table and one plot.

    python -m stages.matrix --base runs/tiny --out runs/matrix [--config configs/tiny.yaml]
        [--cells sf_dmd,sf_gan,...] [--steps 300] [--tf-steps 4000] [--videos 480] [--seeds 0,1] [--jobs 2]
        [key=value ...]

From one teacher and one initialised student (`--base`: a run whose `pretrain_teacher` and `init_student` are
done), every cell is trained in its own run folder `<out>/<cell>/` (each resumes, and runs alone with
`--cells`), then all are scored by `evaluate` on the same noise (`evaluate.extra`), once per `--seeds` value
(a cell added later is sampled alone; the cells scored before are reused):

| cell | what | seed 002 predicts |
| --- | --- | --- |
| `df_l2` | the base DF teacher, many-step sampler | forward KL: mode covering |
| `df_l2_4step` | the same teacher through the student's 4 steps | (no distillation) |
| `tf_l2` | a teacher trained by teacher forcing (`trajectory: tf`) | forward KL: mode covering |
| `sf_dmd` | Self-Forcing + DMD | reverse KL: mode seeking |
| `sf_gan` | Self-Forcing + GAN | expected JSD: between the two |
| `sf_dmd_gan` | Self-Forcing + DMD + GAN (`gan_weight`) | between reverse KL and JSD |
| `df_dmd` | CausVid's DF + DMD | neither forward nor reverse KL |

Per cell: valid and lawful over frames 0-11 and 36-47 of the long rollouts, mode coverage (fraction of the
24 class × motion-mode cells present), the TV distance of the class × mode histogram to the real videos',
drift slope, frames/s; with two seeds, the spread between them (the noise any difference must exceed).
`--jobs N` trains the cells, then evaluates the seeds, N at a time in child processes of this command (each
with its share of the cores; their logs in `<out>/logs/`): on a small CPU, single-threaded processes side by
side do more work per second than one process with every thread.
Writes `<out>/matrix.json`, `<out>/matrix.md` and `<out>/matrix.png`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import torch

from pipeline.config import load_config
from pipeline.evaluation.report import markdown_table
from pipeline.io.run_dir import StageDir
from pipeline.methods import method_for
from pipeline.training.trainer import Trainer

# cell -> (stage, overrides of that stage's section)
TRAINED = {"tf_l2": ("pretrain_teacher", {"trajectory": "tf", "tf_prob": 0.0, "bid_prob": 0.0}),
           "sf_dmd": ("distill", {"method": "sf_dmd"}),
           # the discriminator learns first (150 steps alone, its backbone at 2e-4, head 2e-3: L_D fell to 1.23 there
           # while at critic_lr 1e-3 it stayed at chance) and the generator follows gently (lr 1e-4; at the default
           # 5e-4 it drifted to 0.895 valid frames in 300 steps)
           "sf_gan": ("distill", {"method": "sf_gan", "critic_warmup": 150, "lr": 1e-4, "critic_lr": 2e-4,
                                  "disc_lr": 2e-3}),
           "sf_dmd_gan": ("distill", {"method": "sf_dmd", "gan_weight": 0.5}),
           "df_dmd": ("distill", {"method": "df_dmd"})}
CELLS = ("df_l2", "df_l2_4step", *TRAINED)
PREDICTED = {"df_l2": "forward KL (covering)", "df_l2_4step": "no distillation", "tf_l2": "forward KL (covering)",
             "sf_dmd": "reverse KL (seeking)", "sf_gan": "expected JSD (between)",
             "sf_dmd_gan": "reverse KL + JSD", "df_dmd": "neither"}
WINDOWS = ((0, 12), (36, 48))


def train_cell(cfg, cell: str, base: Path, out: Path, steps: int, tf_steps: int) -> Path:
    """Train `cell` into `<out>/<cell>/` from the base teacher and student; returns the stage folder."""
    stage, keys = TRAINED[cell]
    run = replace(cfg.run, dir=str(out / cell), seed=cfg.run.seed)
    if stage == "pretrain_teacher":
        section = replace(cfg.pretrain_teacher, steps=tf_steps, **keys)
        cell_cfg = replace(cfg, run=run, pretrain_teacher=section)
    else:
        section = replace(cfg.distill, steps=steps, teacher=str(base / "pretrain_teacher"),
                          student=str(base / "init_student"), **keys)
        cell_cfg = replace(cfg, run=run, distill=section)
    return Trainer(method_for(stage, cell_cfg)).run().path


def window(curve: list[float], lo: int, hi: int) -> float:
    part = curve[lo:hi]
    return sum(part) / len(part) if part else float("nan")


def histogram_tv(h, ref) -> float:
    """TV distance between two class × mode histograms, each normalised over all its cells."""
    a, b = torch.tensor(h, dtype=torch.float64).flatten(), torch.tensor(ref, dtype=torch.float64).flatten()
    return float(0.5 * (a / a.sum().clamp_min(1) - b / b.sum().clamp_min(1)).abs().sum())


def row(model: dict, real: dict) -> dict:
    """The matrix's numbers of one model of an evaluate report."""
    long = model["long"]
    out = {f"{what}_{lo}_{hi - 1}": window(long[f"per_frame_{what}"], lo, hi)
           for lo, hi in WINDOWS for what in ("valid", "lawful")}
    cells = torch.tensor(long["mode_histogram"])
    out.update(mode_cells=float((cells > 0).float().mean()), mode_tv_to_data=histogram_tv(long["mode_histogram"],
                                                                                     real["long"]["mode_histogram"]),
               drift_slope=long["drift_slope"], frames_per_s=model.get("speed", {}).get("frames_per_s"))
    return out


def evaluate_cells(cfg, base: Path, out: Path, trained: dict, videos: int, seed: int) -> dict:
    """Score every cell with `evaluate` (one folder per seed): `{cell: row}`."""
    from stages import evaluate

    folder = out / f"eval_seed{seed}"
    done = folder / "evaluate" / "report.json"
    # the cells scored before stay in the report; a new cell extends it (evaluate samples only that one)
    before = {m: r["source"] for m, r in json.loads(done.read_text())["models"].items()
              if m in TRAINED} if done.is_file() else {}
    e = replace(cfg.evaluate, models=["teacher", "teacher_few_step"], num_videos=videos, seed=seed,
                extra={**before, **{cell: str(path) for cell, path in trained.items()}})
    d = replace(cfg.distill, teacher=str(base / "pretrain_teacher"), student=str(base / "init_student"))
    path = evaluate.run(replace(cfg, run=replace(cfg.run, dir=str(folder)), evaluate=e, distill=d)).path
    report = json.loads((path / "report.json").read_text())
    names = {"teacher": "df_l2", "teacher_few_step": "df_l2_4step"}
    return {names.get(m, m): row(r, report["real"]) for m, r in report["models"].items()}


def summarise(by_seed: dict) -> dict:
    """`{cell: {metric: mean}}` and, with two seeds or more, `{cell: {metric_spread: max - min}}` merged in."""
    cells = next(iter(by_seed.values()))
    out = {}
    for cell in cells:
        rows = [by_seed[s][cell] for s in by_seed if cell in by_seed[s]]
        out[cell] = {}
        for k in rows[0]:
            vals = [r[k] for r in rows if r[k] is not None]
            out[cell][k] = sum(vals) / len(vals) if vals else None
            if len(vals) > 1:
                out[cell][f"{k}_spread"] = max(vals) - min(vals)
    return out


def table(summary: dict) -> str:
    cols = ["valid_0_11", "lawful_0_11", "valid_36_47", "lawful_36_47", "mode_cells", "mode_tv_to_data",
            "drift_slope", "frames_per_s"]

    def fmt(r: dict, k: str):
        v, s = r.get(k), r.get(f"{k}_spread")
        return None if v is None else f"{v:.3g}" + (f" ±{s / 2:.2g}" if s is not None else "")

    return markdown_table(["cell", "seed 002", *cols],
                          [[cell, PREDICTED.get(cell, ""), *(fmt(r, k) for k in cols)] for cell, r in summary.items()])


def plot(summary: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = list(summary)
    metrics = ["valid_0_11", "lawful_0_11", "lawful_36_47", "mode_cells", "mode_tv_to_data"]
    fig, ax = plt.subplots(figsize=(10, 4))
    width = 0.8 / len(metrics)
    for i, m in enumerate(metrics):
        vals = [summary[c].get(m) or 0.0 for c in cells]
        errs = [summary[c].get(f"{m}_spread", 0.0) / 2 for c in cells]
        ax.bar([j + i * width for j in range(len(cells))], vals, width, yerr=errs, label=m)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cells))], cells)
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=7, ncol=len(metrics))
    ax.set_title("method x loss on sprites (seed 002)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_parts(args, overrides: list[str], parts: list[tuple[str, list[str]]]) -> int:
    """Run `python -m stages.matrix` once per part (`(name, extra args)`), `args.jobs` at a time, each with
    `--part` (no summary files) and `1/jobs` of the cores; their output in `<out>/logs/<name>.log`. Returns
    the first failure's exit code (printing which part and where its log is), or 0."""
    logs = Path(args.out) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // args.jobs))}
    common = [sys.executable, "-m", "stages.matrix", "--base", args.base, "--out", args.out, "--config", args.config,
              "--videos", str(args.videos), "--part"]
    common += [f"--{k}={v}" for k, v in (("steps", args.steps), ("tf-steps", args.tf_steps)) if v is not None]

    def one(part):
        name, extra = part
        with open(logs / f"{name}.log", "w") as log:
            return subprocess.run([*common, *extra, *overrides], stdout=log, stderr=subprocess.STDOUT, env=env,
                                  cwd=Path(__file__).resolve().parents[1]).returncode

    with ThreadPoolExecutor(args.jobs) as pool:
        codes = list(pool.map(one, parts))
    for (name, _), code in zip(parts, codes):
        if code:
            tail = (logs / f"{name}.log").read_text().strip().splitlines()[-1:] or [""]
            print(f"error: matrix part {name} failed (exit {code}; {logs / name}.log): {tail[0]}", file=sys.stderr)
            return code
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", required=True, help="a run whose pretrain_teacher and init_student are done")
    p.add_argument("--out", required=True)
    p.add_argument("--config", default=str(Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"))
    p.add_argument("--cells", default=",".join(CELLS))
    p.add_argument("--steps", type=int, default=None, help="distill steps per cell (default: the config's)")
    p.add_argument("--tf-steps", type=int, default=None, help="tf_l2 teacher steps (default: the config's)")
    p.add_argument("--videos", type=int, default=480)
    p.add_argument("--seeds", default="0,1", help="evaluate seeds: their spread is the noise")
    p.add_argument("--no-eval", action="store_true", help="train the cells only")
    p.add_argument("--jobs", type=int, default=1, help="cells (then seeds) trained (evaluated) at once, in processes")
    p.add_argument("--part", action="store_true", help=argparse.SUPPRESS)  # a --jobs child: no summary files
    args, overrides = p.parse_known_args(argv)
    cfg = load_config(args.config, overrides)
    base, out = Path(args.base), Path(args.out)
    for s in ("pretrain_teacher", "init_student"):
        if not StageDir(base, s).done:
            print(f"error: --base {base}: stage {s} has not finished", file=sys.stderr)
            return 2
    cells = [c for c in args.cells.split(",") if c]
    bad = [c for c in cells if c not in CELLS]
    if bad:
        print(f"error: --cells: unknown cell '{bad[0]}' (cells: {', '.join(CELLS)})", file=sys.stderr)
        return 2
    if args.jobs < 1:
        print(f"error: --jobs {args.jobs}: must be at least 1", file=sys.stderr)
        return 2
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        print(f"error: --seeds '{args.seeds}': need integers separated by commas, e.g. 0,1", file=sys.stderr)
        return 2
    if args.jobs > 1 and not args.part:  # the children do the work; this process then finds every part done
        code = run_parts(args, overrides, [(c, ["--cells", c, "--no-eval"]) for c in cells if c in TRAINED])
        if not code and not args.no_eval:
            code = run_parts(args, overrides, [(f"eval_seed{s}", ["--cells", ",".join(cells), "--seeds", str(s)])
                                               for s in seeds])
        if code:
            return code
    trained = {c: train_cell(cfg, c, base, out, args.steps or cfg.distill.steps,
                             args.tf_steps or cfg.pretrain_teacher.steps) for c in cells if c in TRAINED}
    if args.no_eval:
        return 0
    by_seed = {s: evaluate_cells(cfg, base, out, trained, args.videos, s) for s in seeds}
    if args.part:
        return 0
    summary = {c: v for c, v in summarise(by_seed).items() if c in cells}
    out.mkdir(parents=True, exist_ok=True)
    (out / "matrix.json").write_text(json.dumps({"cells": summary, "by_seed": by_seed, "videos": args.videos,
                                                 "steps": args.steps, "tf_steps": args.tf_steps}, indent=1))
    (out / "matrix.md").write_text(table(summary) + "\n")
    plot(summary, out / "matrix.png")
    print(table(summary))
    print(f"wrote {out / 'matrix.json'}, {out / 'matrix.md'}, {out / 'matrix.png'}")
    return 0


if __name__ == "__main__":
    from pipeline.cli import run_command  # bad input (a config key, a file): one line, exit 2

    sys.exit(run_command(main))
