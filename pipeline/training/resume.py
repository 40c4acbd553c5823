"""Resuming a training stage: the newest checkpoint restored, or a fresh start."""

from __future__ import annotations

import shutil
from pathlib import Path

from accelerate import Accelerator

from pipeline.config import Config
from pipeline.io.guard import GuardError, Lock
from pipeline.training.checkpoint import latest_checkpoint, load_training_checkpoint
from pipeline.training.optim import replay_schedule


def resume(ckpt_root: Path, model, ema, optimizer, scheduler, force: bool, accelerator: Accelerator | None = None,
           others: dict | None = None):
    """Restore the newest checkpoint under `ckpt_root` (after `--force`: delete them all instead).

    `scheduler` (None: the caller replays its own) is stepped once per restored step; `others` are
    further `{name: (model, optimizer)}` as in `save_training_checkpoint`. Every process reads the
    same checkpoint (the main process alone deletes, and the others wait for it).

    Returns:
        (step, extra, rng): 0, {}, {} when starting fresh.
    """
    main = accelerator is None or accelerator.is_main_process
    if force and main:  # a rerun from scratch: stale checkpoints must not be resumed from later
        remove_own(ckpt_root, ("step_*", ".tmp_step_*"))
    if accelerator is not None:
        accelerator.wait_for_everyone()
    last = latest_checkpoint(ckpt_root)
    if last is None:
        return 0, {}, {}
    step, extra, rng = load_training_checkpoint(last, model, ema, optimizer, others)
    if scheduler is not None:
        replay_schedule(scheduler, step)
    print(f"resuming from {last.name} (step {step}) in {last.parent}")
    return step, extra, rng


def remove_own(folder: Path, patterns: tuple[str, ...]) -> None:
    """Delete the entries of `folder` matching `patterns`: what a stage itself writes there (checkpoints,
    ODE-pair shards), never anything else a folder may hold."""
    for pattern in patterns:
        for p in Path(folder).glob(pattern):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def finished_already(stage, section, force: bool) -> bool:
    """A done stage is skipped unless `--force` or its section now asks for more steps."""
    if not stage.done or force:
        return False
    done_steps = stage.manifest().get("metrics", {}).get("steps", 0)
    if done_steps >= section.steps:
        print(f"[{stage.stage}] done already: {stage.path} (use --force to rerun)")
        return True
    print(f"[{stage.stage}] done at {done_steps} steps; continuing to {section.steps}")
    return False


def data_inputs(cfg: Config) -> dict:
    """The data a training stage reads from disk, by config key (sprites are generated: none)."""
    return {"data.path": cfg.data.path} if cfg.data.kind != "sprites" else {}


def component_inputs(cfg: Config) -> dict:
    """The local component folders (text encoder, tokenizer, VAE) a text run reads, by config key."""
    c = cfg.components
    return {"components.text_encoder": c.text_encoder, "components.tokenizer": c.tokenizer, "components.vae": c.vae}


def lock_run_dir(cfg: Config, stages: list[str], command: str) -> Lock:
    """The lock of `run.dir` (`pipeline.io.guard.Lock`), taken: one command at a time per run directory.

    Raises:
        LockedError naming the holder; OSError (one line) when the run directory cannot be written.
    """
    lock = Lock(cfg.run.dir, command)
    try:
        return lock.acquire()
    except GuardError:
        raise
    except OSError as e:
        folder = Path(cfg.run.dir) / (stages[0] if stages else "")
        raise OSError(f"cannot write the stage folder {folder}: {e.strerror or e}") from None
