"""What a saved transformer says about sampling it: `sampling.json`, beside its `config.json`.

`config.json` holds `WanTransformer3DModel` constructor arguments only (diffusers loads it as is);
`sampling.json` holds the sampling record, one format for every folder (a stage's own `transformer/`,
`transformer_ema/` and `critic/`, and `convert --to diffusers` output):

    {"role": "teacher" | "student",
     "config": {section: {key: value}}}      # a partial config of ours: the sections sampling reads

A stage writes what the network predicts (`model.prediction`) and, for a student, its sampler
(`student.denoising_steps`, `student.shift`); `convert` writes the sections sampling reads from the
stage's whole config (`sampling_settings`). A single safetensors file carries the same record in its
metadata (`pipeline/io/writers.py`).

Folders written before `sampling.json` existed kept `prediction`, `denoising_steps` and `shift` as extra
keys of `config.json`; `read_sampling` turns them into the record (`legacy_record`, the one place they
are read), so those folders load, sample and convert as before.

A model built by the loader carries its record as `model.sampling` (`attach`); `sampling_metadata(model)`
and `is_student(model)` read it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from pipeline.io.jsonfile import read_json

SAMPLING_FILE = "sampling.json"
ROLES = ("teacher", "student")
LEGACY_KEYS = ("prediction", "denoising_steps", "shift")  # once written into config.json by our stages
_ATTR = "sampling"  # the attribute `attach` sets on a model


def sampling_record(prediction: str = "flow", denoising_steps=None, shift: float | None = None,
                    attention: str | None = None) -> dict:
    """The record a stage writes: what the network predicts and, with `denoising_steps`, a student's sampler
    (a student attends block-causally); a teacher's `attention` (`pretrain_teacher.attention`).

    The keyword arguments are those training stages pass to `save_weights` (`student_config(cfg)`).
    """
    student = {}
    if denoising_steps is not None:
        student["denoising_steps"] = list(denoising_steps)
    if shift is not None:
        student["shift"] = shift
    teacher = {"pretrain_teacher": {"attention": attention}} if attention is not None and not student else {}
    return {"role": "student" if student else "teacher",
            "config": {"model": {"prediction": prediction}, **({"student": student} if student else {}), **teacher}}


def recorded_attention(record: dict | None) -> str | None:
    """How the model of `record` attends ("bidirectional" | "block_causal"), None where it does not say
    (a stock diffusers folder). A student is block-causal by definition."""
    if (record or {}).get("role") == "student":
        return "block_causal"
    return ((record or {}).get("config") or {}).get("pretrain_teacher", {}).get("attention")


def sampling_settings(cfg, role: str, prediction: str | None = None) -> dict:
    """The record of a model trained under the run config `cfg`: the sections sampling reads (frames
    per chunk, the student's sampler, the teacher's sampler and attention), as `convert` stores it."""
    asdict = dataclasses.asdict
    return {"role": role, "config": {
        "data": asdict(cfg.data), "model": {"prediction": prediction or cfg.model.prediction},
        "student": asdict(cfg.student),
        "pretrain_teacher": {"attention": cfg.pretrain_teacher.attention,
                             "sampler": asdict(cfg.pretrain_teacher.sampler)}}}


def prediction_of(record: dict | None) -> str | None:
    """What the network predicts ("flow" or "x0") per `record`, None where it does not say."""
    return ((record or {}).get("config") or {}).get("model", {}).get("prediction")


def legacy_record(config: dict) -> dict | None:
    """The record of a folder written before `sampling.json`: the keys our stages then added to its
    `config.json` (`prediction`; a student's `denoising_steps` and `shift`). None without them."""
    if not any(k in config for k in LEGACY_KEYS):
        return None
    return sampling_record(config.get("prediction", "flow"), config.get("denoising_steps"), config.get("shift"))


def read_sampling(folder: str | Path, config: dict | None = None) -> dict | None:
    """The sampling record of a transformer folder: its `sampling.json`, else the legacy keys of its
    `config.json` (`config`: that file already read), else None.

    Raises:
        ValueError: one line naming the file, for a `sampling.json` that is not a record.
    """
    folder = Path(folder)
    file = folder / SAMPLING_FILE
    if file.is_file():
        return check_record(read_json(file, expect=None), where=str(file))
    if config is None:
        if not (folder / "config.json").is_file():
            return None
        config = read_json(folder / "config.json")
    return legacy_record(config)


def check_record(record, *, where: str) -> dict:
    """`record` (read from `where`: a file, a file's metadata), when it is a sampling record.

    Raises:
        ValueError: one line naming `where` and what is wrong.
    """
    if not isinstance(record, dict) or record.get("role") not in ROLES \
            or not isinstance(record.get("config", {}), dict):
        raise ValueError(f"{where}: expected {{\"role\": \"teacher\" | \"student\", \"config\": {{...}}}}")
    bad = next((k for k, v in record.get("config", {}).items() if not isinstance(v, dict)), None)
    if bad is not None:
        raise ValueError(f"{where}: config section '{bad}' must be an object of its keys, got {record['config'][bad]!r}")
    return record


def write_sampling(folder: str | Path, record: dict | None) -> None:
    """Write `record` as `folder/sampling.json` (nothing when None). `folder` is the temporary folder a
    whole save is renamed from (`pipeline/io/guard.py: replacing`), so the file appears with the weights."""
    if record is not None:
        (Path(folder) / SAMPLING_FILE).write_text(json.dumps(record, indent=1))


def attach(model, record: dict | None):
    """Give `model` its sampling record (read back by `sampling_metadata`); returns `model`."""
    setattr(model, _ATTR, record)
    return model


def sampling_metadata(model) -> dict | None:
    """The sampling record the loader attached to `model` (None: a model not loaded from a folder or
    file that says, e.g. one just built from a config)."""
    return getattr(model, _ATTR, None)


def is_student(model) -> bool:
    """Whether `model` samples with the few-step student sampler (its record's role)."""
    return (sampling_metadata(model) or {}).get("role") == "student"
