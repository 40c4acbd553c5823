"""What the benchmark scripts share: the model to measure and the timed exit."""

from __future__ import annotations

import sys
import time

import torch

from pipeline.causal_wan import build_transformer
from pipeline.config import load_config
from pipeline.data import class_table
from stages.common import load_source


def model_to_measure(source: str | None, config: str | None):
    """(model, class table, config): a stage or diffusers folder, else random weights (seed 0) of a
    config's model (default configs/tiny.yaml)."""
    if source:
        return load_source(source)
    cfg = load_config(config or "configs/tiny.yaml")
    torch.manual_seed(0)
    return build_transformer(cfg.model).eval(), class_table(cfg), cfg


def run_timed(main) -> None:
    """Run `main()`, print the total seconds, exit with its status."""
    t0 = time.time()
    rc = main()
    print(f"({time.time() - t0:.0f} s)")
    sys.exit(rc)
