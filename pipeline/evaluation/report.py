"""The evaluate stage's report: `report.json`, `report.md` and `plots/*.png`.

`report.json` (schema version 1)::

    {"schema_version": 1,
     "settings": {"num_videos", "seed", "frames" (training length), "long_frames", "batch_size",
                  "device", "threads", "dtype", "real_videos", "real_seed", "features": [16 names], "switch_at"},
     "models": {<name>: {
         "source": folder, "sampler": {"kind": few_step | autoregressive | synchronous, steps, ...},
         "samples": {"frames": path, "long": path}   (relative to the report),
         "frames": <quality at the training length>,  "long": <quality over the long rollout>,
         "speed": {frames_per_s, first_chunk_s, nfe_per_frame, network_calls, seconds, peak_memory_mb},
         "switch": {"kept" | "recache": {post_switch_valid, first_chunk_valid, lawful_across_switch, valid_frames,
                    lawful_transitions}} | null   (with evaluate.switch_at; null: not a causal sampler)}},
     "real": {"frames": <quality>, "long": <quality>},
     "benchmarks": {<script>: {"command", "exit_status" (1 = goal missed), "output": last lines}}}  (on request)

A <quality> block is `pipeline.evaluation.metrics.quality`: valid_frames, lawful_transitions, valid_videos,
mode_coverage, mode_undetermined, mode_balance_tv, class_accuracy, frechet, drift_slope,
per_frame_valid [F], per_frame_lawful [F-1], mode_histogram [6][4], num_videos, num_frames, size.
Speed is measured on the long rollout (all models: same videos, frames, batch, threads, device).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.config import Config
from pipeline.evaluation.metrics import FEATURES
from pipeline.evaluation.switching import SWITCH_KEYS
from pipeline.io.guard import replacing
from pipeline.io.run_dir import write_atomic
from pipeline.data.sprites import COLOUR_NAMES, NUM_CLASSES, NUM_MODES, SHAPE_NAMES

SCHEMA_VERSION = 1


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def markdown(report: dict) -> str:
    """The tables a person reads first."""
    st = report["settings"]
    f, lf = st["frames"], st["long_frames"]
    lines = [f"# Evaluation of `{st['run_dir']}`", "",
             f"{st['num_videos']} videos per model (balanced classes, seed {st['seed']}), {f} frames (training "
             f"length) and {lf} frames (long rollouts); {st['device']}, {st['threads']} threads, batch "
             f"{st['batch_size']}. `real`: {st['num_videos']} real videos through the same metrics (the floor at "
             f"this sample size). Fréchet distance against {st['real_videos']} real videos of the same length.", "",
             f"## Quality at {f} frames", "",
             "| model | sampler | valid frames | lawful transitions | valid videos | class acc. | modes covered "
             "| mode TV ↓ | Fréchet ↓ |", "|---|---|---|---|---|---|---|---|---|"]
    rows = list(report["models"].items()) + [("real", {**report["real"], "sampler": {"kind": "data"}})]
    for name, m in rows:
        q = m["frames"]
        lines.append(f"| {name} | {_sampler(m['sampler'])} | {q['valid_frames']:.3f} | {q['lawful_transitions']:.3f} "
                     f"| {q['valid_videos']:.3f} | {q['class_accuracy']:.3f} | {q['mode_coverage']:.3f} "
                     f"| {q['mode_balance_tv']:.3f} | {q['frechet']:.4f} |")
    lines += ["", f"## Long rollouts: {lf} frames", "",
              f"| model | valid frames | lawful transitions | valid, last {f} frames | drift slope (per 100 frames) "
              "| Fréchet ↓ |", "|---|---|---|---|---|---|"]
    for name, m in rows:
        q = m["long"]
        tail = sum(q["per_frame_valid"][-f:]) / f
        lines.append(f"| {name} | {q['valid_frames']:.3f} | {q['lawful_transitions']:.3f} | {tail:.3f} "
                     f"| {100 * q['drift_slope']:+.3f} | {q['frechet']:.4f} |")
    lines += ["", f"## Speed ({lf}-frame rollouts)", "",
              "| model | frames/s | first chunk (s) | network evals / frame | peak memory (MiB) |", "|---|---|---|---|---|"]
    for name, m in report["models"].items():
        s = m["speed"]
        lines.append(f"| {name} | {s['frames_per_s']:.1f} | {s['first_chunk_s']:.3f} | {s['nfe_per_frame']:.1f} "
                     f"| {s['peak_memory_mb']:.0f} |")
    at = st.get("switch_at")
    if at is not None:
        rows = [[name, cache, *(s[k] for k in SWITCH_KEYS)] for name, m in report["models"].items()
                for cache, s in (m.get("switch") or {}).items()]
        lines += ["", f"## Prompt switching: class c → (c + 1) mod 6 at frame {at} ({lf}-frame rollouts)", "",
                  markdown_table(["model", "cache", *SWITCH_KEYS], rows)]
    for name, b in report.get("benchmarks", {}).items():
        verdict = {0: "goal met", 1: "goal missed"}.get(b["exit_status"], f"failed (exit {b['exit_status']})")
        lines += ["", f"## Benchmark `{name}`: {verdict}", "", f"`{b['command']}`", "", "```", *b["output"], "```"]
    lines += ["", "Plots: `plots/drift.png` (valid fraction per frame), `plots/modes.png` (motion modes per class), "
              "`plots/speed_quality.png`.", "", "![drift](plots/drift.png)", ""]
    return "\n".join(lines)


def markdown_table(columns: list[str], rows: list[list]) -> str:
    """A Markdown table: floats to 3 decimals, None as "-", anything else as written."""
    def cell(v):
        return "-" if v is None else f"{v:.3f}" if isinstance(v, float) else str(v)
    return "\n".join(["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns),
                      *("| " + " | ".join(cell(v) for v in r) + " |" for r in rows)])


def _sampler(s: dict) -> str:
    if s["kind"] == "few_step":
        return f"few-step ({len(s['denoising_steps'])} steps)"
    if s["kind"] == "data":
        return "—"
    return f"{s['kind']} ({s['steps']} steps)"


def plot_drift(report: dict, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, m in list(report["models"].items()) + [("real", report["real"])]:
        ys = m["long"]["per_frame_valid"]
        ax.plot(range(len(ys)), ys, label=name, linestyle=":" if name == "real" else "-")
    f = report["settings"]["frames"]
    ax.axvline(f - 0.5, color="grey", linewidth=0.8)
    ax.text(f - 0.5, 0.02, " training length", color="grey", fontsize=8)
    ax.set_xlabel("frame index")
    ax.set_ylabel("fraction of valid frames")
    ax.set_ylim(0, 1.02)
    ax.set_title("Drift over long rollouts")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    with replacing(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def plot_modes(report: dict, path: Path) -> None:
    plt = _plt()
    rows = list(report["models"].items()) + [("real", report["real"])]
    fig, axes = plt.subplots(1, len(rows), figsize=(2.3 * len(rows), 3.2), squeeze=False)
    classes = [f"{COLOUR_NAMES[c // 2]} {SHAPE_NAMES[c % 2]}" for c in range(NUM_CLASSES)]
    for ax, (name, m) in zip(axes[0], rows):
        h = m["frames"]["mode_histogram"]
        ax.imshow(h, cmap="Blues", vmin=0)
        for c in range(NUM_CLASSES):
            for k in range(NUM_MODES):
                ax.text(k, c, h[c][k], ha="center", va="center", fontsize=7)
        ax.set_title(f"{name}\nTV {m['frames']['mode_balance_tv']:.2f}", fontsize=9)
        ax.set_xticks(range(NUM_MODES))
        ax.set_xlabel("mode")
        ax.set_yticks(range(NUM_CLASSES))
        ax.set_yticklabels(classes if ax is axes[0][0] else [], fontsize=7)
    fig.suptitle("Motion modes per class (videos whose first transition is lawful)", fontsize=10)
    fig.tight_layout()
    with replacing(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def plot_speed_quality(report: dict, path: Path) -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, m in report["models"].items():
        x, y = m["speed"]["frames_per_s"], m["frames"]["lawful_transitions"]
        ax.scatter([x], [y], s=40)
        ax.annotate(f"{name} ({m['speed']['nfe_per_frame']:.0f} evals/frame)", (x, y), fontsize=8,
                    xytext=(4, 4), textcoords="offset points")
    ax.axhline(report["real"]["frames"]["lawful_transitions"], color="grey", linestyle=":", linewidth=0.8)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(plt.matplotlib.ticker.FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(plt.matplotlib.ticker.NullFormatter())
    ax.margins(x=0.4, y=0.15)
    ax.set_xlabel("frames / s (log)")
    ax.set_ylabel(f"lawful transitions ({report['settings']['frames']} frames)")
    ax.set_title("Speed vs quality")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with replacing(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def make_report(cfg: Config, *, models: dict, real: dict, device: torch.device) -> dict:
    """The report of a run (schema above, without `benchmarks`): `models` each model's `evaluate_entry` result,
    `real` the real row (`real_reference`), `device` where they were sampled."""
    ev = cfg.evaluate
    return {"schema_version": SCHEMA_VERSION,
            "settings": {"run_dir": cfg.run.dir, "num_videos": ev.num_videos, "seed": ev.seed,
                         "frames": cfg.data.frames, "long_frames": cfg.data.frames * ev.long_factor,
                         "batch_size": ev.batch_size, "device": str(device), "threads": torch.get_num_threads(),
                         "dtype": "float32", "real_videos": ev.real_videos, "real_seed": ev.real_seed,
                         "features": list(FEATURES), "switch_at": ev.switch_at},
            "models": models, "real": real}


def manifest_metrics(models: dict) -> dict:
    """The headline numbers of each model for the stage's manifest."""
    return {name: {"lawful_transitions": r["frames"]["lawful_transitions"],
                   "valid_frames_long": r["long"]["valid_frames"], "frames_per_s": r["speed"]["frames_per_s"]}
            for name, r in models.items()}


def write_report(report: dict, out: Path) -> dict[str, str]:
    """Write `report.json`, `report.md` and the plots under `out`; returns their paths."""
    plots = out / "plots"
    plots.mkdir(parents=True, exist_ok=True)
    write_atomic(out / "report.json", json.dumps(report, indent=1))
    write_atomic(out / "report.md", markdown(report))
    plot_drift(report, plots / "drift.png")
    plot_modes(report, plots / "modes.png")
    plot_speed_quality(report, plots / "speed_quality.png")
    return {"report_json": str(out / "report.json"), "report_md": str(out / "report.md"), "plots": str(plots)}
