"""Data preparation for the real-scale path: videos or prompts -> safetensors shards in `data.path`.

    ./launch.sh prepare_data CONFIG [--force] [key=value ...]
    python -m stages.prepare_data --config CONFIG [--force] [key=value ...]

`data.kind=latents` encodes the captioned videos of `data.videos`, `data.kind=prompts` the lines of
`data.prompts`; what the shards hold, how a re-run resumes and what `--force` deletes:
`pipeline/data/prepare.py`.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

from pipeline.cli import parse_with_overrides, run_command
from pipeline.config import Config, load_config
from pipeline.data.prepare import prepare_shards
from pipeline.data.video_files import load_video  # noqa: F401  (kept importable here: tests/test_wan_path.py)


def run(cfg: Config, force: bool = False, command: str = "prepare_data") -> Path:
    """Write (or finish writing) the shards of `data.path`; returns the folder."""
    return prepare_shards(cfg, force=force, command=command)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m stages.prepare_data")
    ap.add_argument("--config", help="the config (or give it as the first argument: ./launch.sh prepare_data CONFIG)")
    ap.add_argument("--force", action="store_true", help="delete the folder's shards and encode everything again")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parse_with_overrides(ap, argv)
    if args.config is None and args.overrides and "=" not in args.overrides[0]:
        args.config = args.overrides.pop(0)
    if args.config is None:
        ap.error("a config is needed: prepare_data CONFIG or --config CONFIG")
    command = f"./launch.sh prepare_data {shlex.join(sys.argv[1:] if argv is None else [str(a) for a in argv])}"

    def body() -> None:
        run(load_config(args.config, args.overrides), force=args.force, command=command)

    return run_command(body)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
