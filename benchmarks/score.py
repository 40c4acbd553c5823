"""Score a samples file (`./launch.sh sample ... --out FILE`) with the SPRITES.md checker.

    python benchmarks/score.py t.safetensors                 # the checker's numbers as JSON
    python benchmarks/score.py t.safetensors --frames 0:12 36:48   # one line per frame window
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.evaluation.checker import score  # noqa: E402
from pipeline.training.checkpoint import read_safetensors  # noqa: E402

KEYS = ("valid_frames", "lawful_transitions", "mode_coverage", "valid_videos", "num_videos", "num_frames")


def run(samples: str | Path, *, frames: list[str] = ()) -> list[dict]:
    """The checker's numbers of a samples file, one dict per frame window `START:END` (default: all frames)."""
    data = read_safetensors(samples)
    rows = []
    for window in frames or [":"]:
        a, b = window.split(":")
        s = score(data["videos"][:, int(a or 0):int(b) if b else None], data["labels"])
        rows.append({"frames": window, **{k: round(s[k], 4) if isinstance(s[k], float) else s[k] for k in KEYS}})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("samples")
    ap.add_argument("--frames", nargs="*", default=[], help="windows START:END (frames START..END-1)")
    args = ap.parse_args(argv)
    for row in run(args.samples, frames=args.frames):
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
