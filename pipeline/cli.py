"""What every command shares: flags anywhere on the line, and user errors as one line and exit code 2."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import Callable

from pipeline.config import ConfigError, load_config
from pipeline.training.checkpoint import CheckpointError
from pipeline.training.memory import OutOfMemory, is_out_of_memory
from pipeline.training.optim import NonFiniteLoss
from pipeline.training.stage_io import lock_run_dir

# Errors that are the user's to fix: reported as one line and a non-zero exit, never a traceback.
# OSError: an unwritable or full disk; OutOfMemory: a training setting too large for the device
USER_ERRORS = (ConfigError, CheckpointError, OSError, ValueError, NonFiniteLoss, OutOfMemory)


def parse_with_overrides(ap: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse flags anywhere on the line; every leftover `key=value` joins `args.overrides`."""
    args, rest = ap.parse_known_args(argv)
    bad = [r for r in rest if r.startswith("-")]
    if bad:
        ap.error(f"unrecognized arguments: {' '.join(bad)}")
    args.overrides += rest
    return args


def run_command(body: Callable[[], int | None]) -> int:
    """The one user-error handler of every command: run `body()` (which releases its own locks) and return its
    exit status (None: 0); a user error (`USER_ERRORS`) becomes one line `error: ...` on stderr and status 2, as
    does running out of memory outside a training stage (`sample --n` too large for the device: the allocator's
    first line)."""
    try:
        status = body()
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if not is_out_of_memory(e):
            raise
        print(f"error: out of memory: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    return 0 if status is None else status


def stage_main(stage: str, run, argv=None) -> int:
    """`python -m stages.<stage> --config CONFIG [--force] [key=value ...]`, holding the lock of `run.dir`."""
    ap = argparse.ArgumentParser(prog=f"python -m stages.{stage}")
    ap.add_argument("--config", required=True)
    ap.add_argument("--force", action="store_true", help="rerun even if the stage is done")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parse_with_overrides(ap, argv)
    argv = sys.argv[1:] if argv is None else argv

    def body() -> None:
        lock = None
        try:
            cfg = load_config(args.config, args.overrides)
            if int(os.environ.get("RANK", "0")) == 0:  # under `accelerate launch`: rank 0 holds it for all
                lock = lock_run_dir(cfg, [stage], f"python -m stages.{stage} {shlex.join(argv)}")
            run(cfg, force=args.force)
        finally:
            if lock is not None:
                lock.release()

    return run_command(body)
