"""Prompt switching on sprites (SPRITES.md "Switched videos"): every video's class c becomes (c + 1) mod 6 at
frame K; each model samples with the cache kept and with the KV window re-cached under the new class.

    python benchmarks/prompt_switch.py runs/tiny/distill [runs/switch/distill ...] [--frames 48] [--switch-at 24]
        [--videos 96] [--seed 0] [--json out.json]

Per model and cache policy (`pipeline/evaluation/switching.py`): the fraction of frames from the first chunk at or
after the switch that are valid for the new class, the same over that first chunk alone (exactly right within one
chunk of the switch), lawful transitions across the switch (the chunk before and the chunk after), and valid /
lawful over the whole videos. SOURCE: a stage folder or diffusers folder of a sprites model (its sampler follows
its role: students few-step, teachers many-step).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pipeline.data.sprites import balanced_labels, switch_schedule  # noqa: E402
from pipeline.diffusion.videos import sample_videos  # noqa: E402
from pipeline.evaluation.report import markdown_table  # noqa: E402
from pipeline.evaluation.switching import SWITCH_KEYS as KEYS, score_switched  # noqa: E402
from pipeline.models.loading import load_source  # noqa: E402



def measure(source: str, *, frames: int, switch_at: int, videos: int, seed: int, recache: bool) -> dict:
    model, table, cfg = load_source(source)
    if table is None:
        raise SystemExit(f"error: {source}: not a class-conditioned (sprites) model")
    schedule = switch_schedule(balanced_labels(videos), frames, switch_at)
    start = time.perf_counter()
    out = sample_videos(model, table, schedule, frames=frames, size=cfg.data.size,
                        frames_per_chunk=cfg.data.frames_per_chunk, prediction=cfg.model.prediction,
                        student=cfg.student, sampler=cfg.pretrain_teacher.sampler,
                        attention=cfg.pretrain_teacher.attention, seed=seed, recache=recache)
    s = score_switched(out, schedule, cfg.data.frames_per_chunk)
    return {"model": source, "cache": "re-cache" if recache else "kept", "seconds": round(time.perf_counter() - start, 1),
            **{k: s[k] for k in KEYS}}


def table(rows: list[dict]) -> str:
    return markdown_table(["model", "cache", *KEYS], [[r["model"], r["cache"], *(r[k] for k in KEYS)] for r in rows])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sources", nargs="+")
    ap.add_argument("--frames", type=int, default=48)
    ap.add_argument("--switch-at", type=int, default=24)
    ap.add_argument("--videos", type=int, default=96)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    rows = [measure(s, frames=args.frames, switch_at=args.switch_at, videos=args.videos, seed=args.seed,
                    recache=recache) for s in args.sources for recache in (False, True)]
    print(f"{args.videos} videos x {args.frames} frames, class c -> (c + 1) mod 6 at frame {args.switch_at}, seed {args.seed}")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    from pipeline.cli import run_command  # bad input: one line, exit 2

    sys.exit(run_command(main))
