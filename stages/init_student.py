"""Stage `init_student`: the causal few-step student initialised as CausVid does: the teacher's ODE
trajectories sampled into `ode_pairs/`, then the student (starting as the teacher's EMA weights) regressed
on them (the method: `pipeline/methods/ode_regression.py`).

Run: `python -m stages.init_student --config CONFIG [--force] [k=v ...]`.
"""

from __future__ import annotations

import sys

from pipeline.cli import stage_main
from pipeline.config import Config
from pipeline.io.run_dir import StageDir
from pipeline.methods import method_for
from pipeline.training.trainer import Trainer

STAGE = "init_student"


def run(cfg: Config, force: bool = False) -> StageDir:
    return Trainer(method_for(STAGE, cfg), force=force).run()


def main(argv=None):
    return stage_main(STAGE, run, argv)


if __name__ == "__main__":
    sys.exit(main())
