"""Models in and out of folders: stage outputs saved as diffusers folders, any source loaded for sampling."""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers.utils import logging as diffusers_logging
from safetensors.torch import save_file

from pipeline.models.causal_wan import CausalWanTransformer
from pipeline.training.checkpoint import CheckpointError, read_safetensors
from pipeline.config import Config, load_config
from pipeline.io.convert import build_model, read_source, sampling_config
from pipeline.data.sources import class_table
from pipeline.io.guard import replacing
from pipeline.io.run_dir import StageDir




def student_config(cfg: Config) -> dict:
    """What a student's config.json records about its sampler."""
    return {"denoising_steps": list(cfg.student.denoising_steps), "shift": cfg.student.shift}


def save_weights(stage_path: Path, raw: torch.nn.Module, ema, cfg: Config, **model_config) -> dict:
    """Write `transformer/` (raw) and `transformer_ema/` as diffusers folders, plus the class table.

    `model_config` is recorded in each config.json (what the network predicts, a student's sampler),
    so a bare folder still says how to sample from it.
    """
    raw.register_to_config(**model_config)
    save_model(raw, stage_path / "transformer")
    ema.store(raw.parameters())
    ema.copy_to(raw.parameters())
    save_model(raw, stage_path / "transformer_ema")
    if cfg.data.kind == "sprites":
        with replacing(stage_path / "conditioning.safetensors") as tmp:
            save_file({"class_table": class_table(cfg).contiguous()}, str(tmp))
    return {"transformer": str(stage_path / "transformer"), "transformer_ema": str(stage_path / "transformer_ema")}


def save_model(model, folder: Path) -> Path:
    """`model.save_pretrained` into a temporary folder renamed onto `folder` (a stage's own output: an
    earlier copy, e.g. of a killed run, is replaced whole)."""
    with replacing(folder) as tmp:
        model.save_pretrained(tmp)
    return folder


def load_model(folder: Path) -> CausalWanTransformer:
    """`from_pretrained` without diffusers' warning about the keys we add to config.json (prediction,
    a student's sampler): they are ours, read back through `model.config`."""
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        return CausalWanTransformer.from_pretrained(folder)
    finally:
        diffusers_logging.set_verbosity(level)


def load_source(source: str | Path, raw: bool = False, attention_backend: str | None = None):
    """Model, class table and config of any source `pipeline.io.convert.read_source` reads.

    A stage folder gives its EMA weights (`raw`: the raw ones), class table and config; any other
    source (diffusers folder, safetensors file, `.pt` checkpoint, ...) the default config under the
    sampling settings it carries (`sampling.json`, safetensors metadata, a stage folder's config.json).
    The model attends with `attention_backend` (None: the returned config's `model.attention_backend`).
    """
    model, table, cfg = _load_source(source, raw)
    model.set_attention_backend(attention_backend or cfg.model.attention_backend)
    return model, table, cfg


def _load_source(source: str | Path, raw: bool):
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"model source not found: {path}")
    if (path / "manifest.json").is_file():  # a stage folder
        status = StageDir(path.parent, path.name).manifest().get("status")
        if status != "done" or not (path / "transformer_ema").is_dir():
            raise CheckpointError(f"{path}: the stage has not finished (status '{status}'); run it to the end first")
        cfg = load_config(path / "config.yaml")
        model = load_model(path / ("transformer" if raw else "transformer_ema"))
        table = read_safetensors(path / "conditioning.safetensors")["class_table"] if cfg.data.kind == "sprites" \
            else None
        return model, table, cfg
    weights = read_source(path, ema=not raw)
    model = build_model(weights).float()  # a bf16/fp16 export samples in fp32 (an exact upcast)
    cfg = sampling_config(weights, model.config.text_dim)
    return model, class_table(cfg) if cfg.data.kind == "sprites" else None, cfg


def is_student(model) -> bool:
    return "denoising_steps" in model.config
