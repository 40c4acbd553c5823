"""Models in and out of folders: stage outputs saved as diffusers folders with their sampling record
(`sampling.json`, `pipeline/models/sampling_meta.py`), any source loaded for sampling."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import torch
from safetensors.torch import save_file

from pipeline.config import Config, ConfigError, ModelConfig, load_config
from pipeline.data.sources import class_table
from pipeline.io.guard import replacing
from pipeline.io.readers import read_diffusers_folder, read_source
from pipeline.io.jsonfile import read_json
from pipeline.io.weights import ConvertError, Weights, check_fits
from pipeline.models.causal_wan import CausalWanTransformer
from pipeline.models.sampling_meta import (attach, is_student, prediction_of, sampling_metadata,  # noqa: F401
                                           sampling_record, sampling_settings, write_sampling)
from pipeline.training.checkpoint import CheckpointError, read_safetensors


def student_config(cfg: Config) -> dict:
    """What a student's `sampling.json` records about its sampler (keyword arguments of `save_weights`)."""
    return {"denoising_steps": list(cfg.student.denoising_steps), "shift": cfg.student.shift}


def save_weights(stage_path: Path, raw: torch.nn.Module, ema, cfg: Config, **model_config) -> dict:
    """Write `transformer/` (raw) and `transformer_ema/` as diffusers folders, plus the class table.

    `model_config` (`prediction`: what the network predicts; a student's `denoising_steps` and `shift`,
    see `student_config`) is recorded in each folder's `sampling.json` (`sampling_meta.sampling_record`)
    and attached to `raw`, so a bare folder still says how to sample from it.
    """
    from pipeline.training.optim import averaged

    attach(raw, sampling_record(**model_config))
    save_model(raw, stage_path / "transformer")
    ema.store(averaged(raw))
    ema.copy_to(averaged(raw))
    save_model(raw, stage_path / "transformer_ema")
    if cfg.data.kind == "sprites":
        with replacing(stage_path / "conditioning.safetensors") as tmp:
            save_file({"class_table": class_table(cfg).contiguous()}, str(tmp))
    return {"transformer": str(stage_path / "transformer"), "transformer_ema": str(stage_path / "transformer_ema")}


def save_model(model, folder: Path, sampling: dict | None = None) -> Path:
    """`model.save_pretrained` (`config.json`: constructor arguments; the weights) and `sampling.json`
    (`sampling`, default: the record attached to `model`, none if it has none) into a temporary folder
    renamed onto `folder` (a stage's own output: an earlier copy, e.g. of a killed run, is replaced whole)."""
    from pipeline.models.lora import has_lora, merged_copy

    if has_lora(model):  # adapters folded into plain weights: the folder is an ordinary transformer
        model = merged_copy(model)
    with replacing(folder) as tmp:
        model.save_pretrained(tmp)
        write_sampling(tmp, sampling if sampling is not None else sampling_metadata(model))
    return folder


def build_model(weights: Weights) -> CausalWanTransformer:
    """A `CausalWanTransformer` holding `weights` (no copy), in eval mode, its sampling record attached
    (`sampling_meta.sampling_metadata(model)`)."""
    # NaN / inf weights give NaN videos and poison whatever trains on them: refused here, for every load
    weights.check_finite(hint="a model built from them outputs NaN (only convert --allow-nonfinite reads them)")
    model = check_fits(weights.state_dict, weights.model_config(), CausalWanTransformer)
    model.load_state_dict(weights.state_dict, strict=True, assign=True)
    return attach(model, weights.sampling).eval()


def load_model(folder: Path) -> CausalWanTransformer:
    """A transformer folder written by `save_model` (or any diffusers transformer folder), with its
    sampling record (`sampling.json`; for a folder written before it, the old keys of `config.json`)."""
    return build_model(read_diffusers_folder(Path(folder)))


def sampling_config(weights: Weights, text_dim: int):
    """Our `Config` for sampling a converted model: defaults < its stored sampling settings."""
    partial = dict((weights.sampling or {}).get("config", {}))
    # the model section is the weights' own shape (patch, channels, ...), checked against the data settings
    shape = {f.name: list(v) if isinstance(v, (tuple, list)) else v for f in fields(ModelConfig)
             if (v := (weights.config or {}).get(f.name)) is not None}
    partial["model"] = {**shape, **(partial.get("model") or {})}
    if "kind" not in (partial.get("data") or {}) and partial["model"].get("in_channels", 3) != 3:
        # no record of its data (a stock Wan folder): latents, not the default RGB sprites its channels contradict
        partial["data"] = {**(partial.get("data") or {}), "kind": "latents"}
    if (partial.get("data") or {}).get("kind") == "prompts":  # trained on prompts alone: no stage that needs videos
        partial["run"] = {"stages": ["init_student", "distill"], **(partial.get("run") or {})}
    try:
        return load_config(None, [f"model.text_dim={text_dim}"], partial=partial,
                           partial_source=f"sampling settings of {weights.origin}")
    except ConfigError as e:
        raise ConvertError(str(e)) from None


def for_inference(model: CausalWanTransformer, device: torch.device, precision: str) -> CausalWanTransformer:
    """A loaded transformer on `device`, frozen, computing in `precision` ("bf16" or "no": the run's
    `mixed_precision(cfg)`, bf16 on a GPU that supports it): in bf16 its matmul weights are held in bf16
    (`hold_frozen`) and every call runs under bf16 autocast with fp32 outputs, as the training stages call their
    models, so a sampler's arithmetic between calls stays fp32. Returns the model."""
    from pipeline.training.distributed import autocast_forward
    from pipeline.training.optim import hold_frozen

    model = hold_frozen(model.to(device), precision)
    if precision == "bf16":
        autocast_forward(model, torch.autocast(device.type, dtype=torch.bfloat16))
    return model


def load_source(source: str | Path, raw: bool = False, attention_backend: str | None = None, *,
                model_config: str | Path | None = None):
    """Model, class table and config of any source `pipeline.io.readers.read_source` reads.

    A stage folder gives its EMA weights (`raw`: the raw ones), class table and config; any other
    source (diffusers folder, safetensors file, `.pt` checkpoint, ...) the default config under the
    sampling record it carries (`sampling.json`, safetensors metadata, a stage folder's config).
    The model carries its sampling record (`is_student(model)`) and attends with `attention_backend`
    (None: the returned config's `model.attention_backend`). `model_config`: a diffusers `config.json`
    for a source without one (`sample --model-config`, as `convert`'s).
    """
    model, table, cfg = _load_source(source, raw, model_config)
    model.set_attention_backend(attention_backend or cfg.model.attention_backend)
    return model, table, cfg


def _load_source(source: str | Path, raw: bool, model_config: str | Path | None = None):
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"model source not found: {path}")
    if (path / "manifest.json").is_file():  # a stage folder
        if model_config is not None:
            raise ValueError(f"--model-config: {path} is a stage folder, whose config.yaml gives the model")
        status = read_json(path / "manifest.json").get("status")
        if status != "done" or not (path / "transformer_ema").is_dir():
            raise CheckpointError(f"{path}: the stage has not finished (status '{status}'); run it to the end first")
        cfg = load_config(path / "config.yaml")
        model = load_model(path / ("transformer" if raw else "transformer_ema"))
        # the stage's whole record (its attention and samplers from config.yaml), as `convert` would store it
        record = sampling_metadata(model)
        attach(model, sampling_settings(cfg, (record or {}).get("role", "teacher"), prediction_of(record)))
        table = None
        if cfg.data.kind == "sprites":
            file = path / "conditioning.safetensors"
            table = read_safetensors(file).get("class_table")
            if table is None:
                raise CheckpointError(f"{file}: no 'class_table' tensor (the class embeddings sprites models need)")
        return model, table, cfg
    weights = read_source(path, ema=not raw)
    weights = weights.with_config_file(model_config)
    model = build_model(weights).float()  # a bf16/fp16 export samples in fp32 (an exact upcast)
    cfg = sampling_config(weights, model.config.text_dim)
    if (path / "model_index.json").is_file():  # a pipeline folder (`convert --to pipeline`)
        return model, *pipeline_folder_parts(path, cfg)
    return model, class_table(cfg) if cfg.data.kind == "sprites" else None, cfg


def pipeline_class_table(path: Path) -> torch.Tensor | None:
    """The class-embedding table `[classes, tokens, D]` a sprites pipeline folder keeps in `class_prompts/`,
    or None where it has none."""
    kept = Path(path) / "class_prompts" / "diffusion_pytorch_model.safetensors"
    return read_safetensors(kept)["table"] if kept.is_file() else None


def pipeline_folder_parts(path: Path, cfg: Config):
    """The class table and config of a `CausalWanPipeline` folder sampled as a SOURCE: sprites, the table of its
    `class_prompts/`; text models, its own `vae/`, `text_encoder/`, `tokenizer/` and the run's prompt length and
    dtypes (`model_index.json`) as the `components` defaults (`sample --vae` etc. still override them)."""
    if cfg.data.kind == "sprites":
        kept = pipeline_class_table(path)
        return (class_table(cfg) if kept is None else kept), cfg
    index = read_json(path / "model_index.json")
    c = cfg.components
    for name in ("vae", "text_encoder", "tokenizer"):
        if (path / name).is_dir():
            setattr(c, name, str(path))
    for key in ("max_sequence_length", "text_encoder_dtype", "vae_dtype"):
        if index.get(key) is not None:
            setattr(c, key, index[key])
    return None, cfg
