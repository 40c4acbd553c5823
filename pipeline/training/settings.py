"""What a training stage was trained with: the settings a resume must not change.

A method names the config sections that shape what it trains (`Method.fingerprint_sections`); their
values, flattened to `{"section.key": value}`, are saved with every checkpoint and in the manifest of a
finished stage. A few keys in them change nothing that is trained (how long, how often to checkpoint or
log, how many previews, where the EMA copy lives, recomputing activations): those are *harmless* and may
change between runs (the change is recorded); any other difference refuses the resume, naming the keys.
"""

from __future__ import annotations

import dataclasses
import json

from pipeline.config import ConfigError

# Keys (their last component) that change neither the numbers trained nor what they are trained on.
HARMLESS_KEYS = ("steps", "checkpoint_every", "keep_checkpoints", "log_every", "preview_n", "gradient_checkpointing",
                 "ema_device")
# Whole keys likewise harmless: how attention is computed, prepare_data's own inputs.
HARMLESS_PATHS = ("model.attention_backend", "data.videos", "data.prompts", "data.pixel_size", "data.pixel_frames")


class SettingsChanged(ConfigError):
    """A resume or a rerun of a done stage with settings that change what it trains."""


def flatten(value, prefix: str) -> dict:
    """`{"prefix.key": JSON value}` of a config section (dataclass), a dict or a single value."""
    if dataclasses.is_dataclass(value):
        value = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}"))
        return out
    return {prefix: json.loads(json.dumps(value))}  # enums as their strings, tuples as lists


def settings_of(cfg, sections: list[str]) -> dict:
    """The flattened values of `sections` (dotted paths into `cfg`, e.g. `run.seed`, `distill`)."""
    out = {}
    for path in sections:
        value = cfg
        for part in path.split("."):
            value = getattr(value, part)
        out.update(flatten(value, path))
    return out


def is_harmless(key: str, harmless: tuple[str, ...] = ()) -> bool:
    """Whether `key` may change between a checkpoint and its resume (`harmless`: a method's further keys or
    prefixes)."""
    return (key.rsplit(".", 1)[-1] in HARMLESS_KEYS or key in HARMLESS_PATHS
            or any(key == h or key.startswith(h + ".") for h in harmless))


def changes(before: dict, now: dict, defaults: dict | None = None) -> dict:
    """`{key: (before, now)}` for every key whose value differs (a key only on one side counts, except a key
    added to the config since `before` was recorded that now holds its default, from `defaults`: runs
    made before it existed trained as its default does)."""
    defaults = defaults or {}
    return {k: (before.get(k), now.get(k)) for k in sorted(set(before) | set(now)) if before.get(k) != now.get(k)
            and not (k not in before and k in defaults and now.get(k) == defaults[k])}


def refuse_changes(stage: str, what: str, diff: dict, *, harmless: tuple[str, ...] = ()) -> dict:
    """Raise `SettingsChanged` naming the keys of `diff` that are not harmless; return the harmless ones.

    `what` says what the settings are compared with ("the checkpoint step_0000004", "the finished stage").
    """
    bad = {k: v for k, v in diff.items() if not is_harmless(k, harmless)}
    if bad:
        shown = ", ".join(f"{k}={json.dumps(old)} (now {json.dumps(new)})" for k, (old, new) in list(bad.items())[:3])
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise SettingsChanged(f"{stage}: {what} was made with {shown}{more}; set those back to continue it, or pass "
                              "--force to restart the stage from scratch (the old stage folder is moved aside)")
    return {k: v for k, v in diff.items() if is_harmless(k, harmless)}
