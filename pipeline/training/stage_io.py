"""A training stage's folder around its run: skip a finished one, the inputs it reads, the run-directory lock."""

from __future__ import annotations

from pathlib import Path


from pipeline.config import Config
from pipeline.io.guard import GuardError, Lock


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
