"""Score a samples file (`./launch.sh sample ... --out FILE`) with the SPRITES.md checker.

    python benchmarks/score.py t.safetensors          # prints the checker's numbers as JSON
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.checker import score  # noqa: E402
from pipeline.checkpoint import read_safetensors  # noqa: E402

if __name__ == "__main__":
    data = read_safetensors(sys.argv[1])
    s = score(data["videos"], data["labels"])
    keys = ("valid_frames", "lawful_transitions", "mode_coverage", "valid_videos", "num_videos", "num_frames")
    print(json.dumps({k: s[k] for k in keys}))
