"""Stage `distill`: DMD distillation of the few-step student, by the method `distill.method` names:
`sf_dmd` (Self-Forcing) or `df_dmd` (CausVid's DF+DMD). The methods: `pipeline/methods/distillation.py`;
the equations: `pipeline/methods/dmd.py`.

Run: `python -m stages.distill --config CONFIG [--force] [k=v ...]`.
"""

from __future__ import annotations

import sys

from pipeline.cli import stage_main
from pipeline.config import Config
from pipeline.io.run_dir import StageDir
from pipeline.methods import method_for
from pipeline.training.trainer import Trainer

STAGE = "distill"


def run(cfg: Config, force: bool = False) -> StageDir:
    return Trainer(method_for(STAGE, cfg), force=force).run()


def main(argv=None):
    return stage_main(STAGE, run, argv)


if __name__ == "__main__":
    sys.exit(main())
