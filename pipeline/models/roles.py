"""The models of a run by role, each from its own source with its own attention.

`init_student` reads a teacher (its ODE pairs, and the student's first weights); `distill` reads the
student (generator), the real score (the teacher, frozen) and the fake score (the critic, trained;
by default a copy of the real score). Every one of them may come from any source
`pipeline.io.readers.read_source` reads (a stage folder, a diffusers folder, a `.safetensors` file, a
Self-Forcing / CausVid `.pt`), and the real score may be a bigger architecture than the other two
(Self-Forcing: a 14B real score, 1.3B fake score and student).

How a model attends is a fact about how it was trained, so it is never guessed: it comes from its
config key (`init_student.teacher_attention`, `distill.teacher_attention`, `distill.critic_attention`)
or from what the source records (a stage's `config.yaml`, a `sampling.json`, a file's metadata; a
student is block-causal); a source that records nothing (a stock diffusers Wan folder) with no key
set is a one-line error naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from pipeline.io.run_dir import is_stage_folder
from pipeline.config import Config, ConfigError
from pipeline.data.sources import class_table
from pipeline.models.loading import load_source
from pipeline.models.sampling_meta import recorded_attention, sampling_metadata

ATTENTIONS = ("bidirectional", "block_causal")


def attention_of(model: torch.nn.Module, *, configured: str | None, key: str, source: Path) -> str:
    """How `model` (loaded from `source`) attends: the config's `configured` value (key `key`) if set, else
    what the model's record says (`choose_attention`).

    Raises:
        ConfigError: neither says (one line naming `key`).
    """
    return choose_attention(configured, recorded_attention(sampling_metadata(model)), key=key, source=source)


def choose_attention(configured: str | None, recorded: str | None, *, key: str, source: str | Path,
                     required: bool = True) -> str | None:
    """The one rule: the config's `configured` value (key `key`) wins (said, where the source records another);
    else what the source records. Neither: a `ConfigError` naming `key`, or None unless `required` (`--dry-run`
    reports it, `pipeline/plan.py`)."""
    if configured is not None:
        if recorded is not None and recorded != configured:
            print(f"[roles] {key}={configured}: {source} records {recorded} attention; using {configured} as set")
        return str(configured)
    if recorded is None and required:
        raise ConfigError(f"{key}: {source} does not record how it attends (a stock model?); set {key}=bidirectional "
                          f"(stock Wan models) or {key}=block_causal", key)
    return recorded


def source_attention(source: str | Path) -> str | None:
    """What `source` records about how its model attends, read without loading its weights (the `--dry-run`
    plan): a stage folder's record or its `config.yaml`, a diffusers folder's `sampling.json`; else None."""
    from pipeline.config import load_config
    from pipeline.models.sampling_meta import read_sampling

    path = Path(source)
    if is_stage_folder(path) and (path / "config.yaml").is_file():
        return recorded_attention(read_sampling(path / "transformer_ema")) or \
            str(load_config(path / "config.yaml").pretrain_teacher.attention)
    if path.is_dir() and (path / "config.json").is_file():
        return recorded_attention(read_sampling(path))
    return None


@dataclass
class Role:
    """A model of the run: its module, class table (sprites), config (the stage's, or the defaults under
    the source's record), attention and what it predicts."""

    name: str
    source: Path
    model: torch.nn.Module
    table: torch.Tensor | None
    cfg: Config
    attention: str
    prediction: str


def load_role(name: str, source: str | Path, *, configured: str | None, key: str, run: Config,
              model_config: str | None = None) -> Role:
    """Load the model of role `name` from `source` (its EMA weights for a stage folder), with its attention
    (`attention_of`: `configured` is the value of config key `key`). A sprites model from anything but a
    stage folder (which keeps its own) is conditioned by the class table of the run `run`. `model_config`:
    a diffusers `config.json` for a source that records no shape (`load_source`: a folder's own wins)."""
    stage = is_stage_folder(source)
    model, table, cfg = load_source(source, model_config=None if stage else model_config)
    if (sampling_metadata(model) or {}).get("role") == "student":  # a few-step student is no score model
        raise ConfigError(f"{key.removesuffix('_attention')}: the {name} {source} is a student (its sampling record's "
                          f"role): the {name} must be a many-step model (a teacher stage or a stock Wan model)",
                          key.removesuffix("_attention"))
    attention = attention_of(model, configured=configured, key=key, source=Path(source))
    if table is not None and not stage:
        table = class_table(run)
    return Role(name, Path(source), model, table, cfg, attention, cfg.model.prediction)


def check_compatible(first: Role, *others: Role) -> None:
    """The models of one run must read the same latents and prompts: channels and text width equal (layers,
    width and heads may differ: a bigger real score).

    Raises:
        ConfigError: one line naming both sources and the mismatched setting.
    """
    keys = ("in_channels", "out_channels", "text_dim")
    for other in others:
        for k in keys:
            a, b = first.model.config[k], other.model.config[k]
            if a != b:
                raise ConfigError(f"{other.name} {other.source} has {k}={b}, the {first.name} {first.source} has {a}: "
                                  "the models of a run must read the same latents and prompts")


def parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
