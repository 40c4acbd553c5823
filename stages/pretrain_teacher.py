"""Stage `pretrain_teacher`: a Diffusion-Forcing teacher trained with the flow-matching L2 loss under a
trajectory distribution of per-frame noise levels (the method: `pipeline/methods/flow_matching.py`).

Run: `python -m stages.pretrain_teacher --config CONFIG [--force] [k=v ...]`.
"""

from __future__ import annotations

import sys

from pipeline.cli import stage_main
from pipeline.config import Config
from pipeline.io.run_dir import StageDir
from pipeline.methods import method_for
from pipeline.training.trainer import Trainer

STAGE = "pretrain_teacher"


def run(cfg: Config, force: bool = False) -> StageDir:
    return Trainer(method_for(STAGE, cfg), force=force).run()


def main(argv=None):
    return stage_main(STAGE, run, argv)


if __name__ == "__main__":
    sys.exit(main())
