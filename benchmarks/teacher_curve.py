"""Teacher quality against training minutes: train `pretrain_teacher` keeping every checkpoint, then
sample every checkpoint's EMA weights and score the videos with the SPRITES.md checker.

    python benchmarks/teacher_curve.py configs/tiny.yaml --every 250 [--n 96] [key=value ...]

Prints one line per checkpoint (minutes of training, valid frames, lawful transitions, mode
coverage) and writes `<run.dir>/pretrain_teacher/curve.json` and `curve.png`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from pipeline.models.causal_wan import build_transformer  # noqa: E402
from pipeline.evaluation.checker import score  # noqa: E402
from pipeline.training.checkpoint import read_safetensors  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.data.sources import class_table  # noqa: E402
from pipeline.io.media import save_curves  # noqa: E402
from pipeline.data.sprites import balanced_labels  # noqa: E402
from pipeline.cli import parse_with_overrides  # noqa: E402
from pipeline.methods import method_for  # noqa: E402
from pipeline.training.trainer import Trainer  # noqa: E402
from pipeline.diffusion.videos import sample_videos  # noqa: E402


def train_teacher(cfg) -> None:
    """Run the `pretrain_teacher` stage of `cfg` in this process, as `python -m stages.pretrain_teacher` does."""
    Trainer(method_for("pretrain_teacher", cfg)).run()


def run(cfg, *, n: int = 96, train: bool = True) -> list[dict]:
    """Train the teacher of `cfg` (unless `train` is False), then sample `n` videos from the EMA weights of every
    checkpoint in `<run.dir>/pretrain_teacher/checkpoints/` and score them; prints one JSON line per checkpoint,
    writes `curve.json` and `curve.png` beside them. Returns the rows."""
    if train:
        train_teacher(cfg)
    stage = Path(cfg.run.dir) / "pretrain_teacher"
    tc = cfg.pretrain_teacher
    model = build_transformer(cfg.model)
    labels = balanced_labels(n)
    rows = []
    for ckpt in sorted((stage / "checkpoints").glob("step_*")):
        meta = json.loads((ckpt / "meta.json").read_text())
        model.load_state_dict(read_safetensors(ckpt / "ema.safetensors"))
        videos = sample_videos(model, class_table(cfg), labels, frames=cfg.data.frames, size=cfg.data.size,
                               frames_per_chunk=cfg.data.frames_per_chunk, prediction=cfg.model.prediction,
                               sampler=tc.sampler, attention=tc.attention, seed=cfg.run.seed + 7, few_step=False)
        s = score(videos, labels)
        row = {"step": meta["step"], "minutes": meta["extra"]["elapsed_s"] / 60, **{
            k: s[k] for k in ("valid_frames", "lawful_transitions", "mode_coverage", "valid_videos")}}
        rows.append(row)
        print(json.dumps(row), flush=True)
    (stage / "curve.json").write_text(json.dumps(rows, indent=1))
    save_curves(stage / "curve.png", [r["minutes"] for r in rows],
                {k: [r[k] for r in rows] for k in ("valid_frames", "lawful_transitions", "mode_coverage")},
                "teacher training minutes", "fraction", "teacher quality (checker)")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("config")
    ap.add_argument("--every", type=int, default=250)
    ap.add_argument("--n", type=int, default=96)
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("overrides", nargs="*")
    args = parse_with_overrides(ap, argv)
    cfg = load_config(args.config, [*args.overrides, f"pretrain_teacher.checkpoint_every={args.every}",
                                    "pretrain_teacher.keep_checkpoints=1000"])
    run(cfg, n=args.n, train=not args.skip_train)
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(True)
    sys.exit(main())
