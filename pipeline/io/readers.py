"""Every kind of checkpoint read into one `Weights` record (`read_source`, the kind detected from what
the path holds):

    stage folder of ours      manifest.json; transformer/ (raw), transformer_ema/ (--ema), critic/ (--part critic)
    training checkpoint       checkpoints/step_*/: model, ema, critic .safetensors + meta.json
    diffusers folder          config.json + diffusion_pytorch_model*.safetensors (sharded too); a pipeline
                              folder (model_index.json) gives its transformer/
    .safetensors file         diffusers or original-Wan naming (detected from the keys)
    .pt / .pth file           Self-Forcing / CausVid: `generator`, `generator_ema`, `critic` or `model`
                              entries (or a bare state dict), `model.` prefix or not; read with
                              `torch.load(weights_only=True)` only, so a pickle of arbitrary objects is refused
    accelerate save_state     model.safetensors (first prepared model), model_1.safetensors (second), ...
    DeepSpeed ZeRO folder     `latest` + global_step*/: consolidated by DeepSpeed's own zero_to_fp32, its
                              loads held to weights_only (plus DeepSpeed's own state records)
    torch distributed ckpt    `.metadata` + *.distcp (FSDP's sharded state dict, accelerate's
                              pytorch_model_fsdp_0/): read by torch.distributed.checkpoint itself

Beside the weights come the model config (`WanTransformer3DModel` arguments: a folder's `config.json`,
a file's safetensors metadata, the stage's config, or none) and the sampling record
(`pipeline/models/sampling_meta.py`): a folder's `sampling.json` (or, for a folder written before it,
the old keys of its `config.json`), a file's metadata, a stage's role and config.
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from pipeline.config import load_config
from pipeline.io.jsonfile import get_key, parse_json, read_json
from pipeline.io.keys import naming, strip_wrappers, to_diffusers_names
from pipeline.io.weights import ConvertError, Weights, constructor_args
from pipeline.models.causal_wan import wan_config
from pipeline.models.sampling_meta import check_record, prediction_of, read_sampling, sampling_settings
from pipeline.training.checkpoint import read_safetensors

# Self-Forcing's published student settings, for a `.pt` generator that carries none of its own.
SELF_FORCING_STUDENT = {"data": {"frames_per_chunk": 3}, "model": {"prediction": "flow"},
                        "student": {"denoising_steps": [1000, 750, 500, 250], "shift": 5.0, "context_sigma": 0.0}}


def read_source(source: str | Path, ema: bool = False, part: str = "generator") -> Weights:
    """Read any supported source (see the module docstring) into diffusers-named `Weights`.

    Args:
        ema: take the EMA weights where a source holds both.
        part: "generator" (the model itself) or "critic" (distill's fake score, where a source holds one).
    Raises:
        FileNotFoundError, ConvertError: one line naming the path and the cause.
    """
    if part not in ("generator", "critic"):
        raise ConvertError(f"--part must be generator or critic, got '{part}'")
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"source not found: {path}")
    if path.is_dir():
        if (path / "manifest.json").is_file():
            return _read_stage(path, ema, part)
        if (path / "model_index.json").is_file() and (path / "transformer" / "config.json").is_file():
            return read_source(path / "transformer", ema, part)
        if (path / "config.json").is_file():
            return read_diffusers_folder(path)
        if (path / "meta.json").is_file() and (path / "model.safetensors").is_file():
            return _read_training_checkpoint(path, ema, part)
        if (path / "latest").is_file() or any(path.glob("global_step*/*model_states.pt")):
            return _read_deepspeed(path)
        if (path / "pytorch_model").is_dir() and (path / "pytorch_model" / "latest").is_file():
            return _read_deepspeed(path / "pytorch_model")  # accelerate's save_state under DeepSpeed
        if (path / ".metadata").is_file():
            return _read_distributed_checkpoint(path)
        fsdp = path / f"pytorch_model_fsdp_{0 if part == 'generator' else 1}"  # accelerate's save_state under FSDP
        if (fsdp / ".metadata").is_file():
            return _read_distributed_checkpoint(fsdp)
        if any(path.glob("random_states_*.pkl")) or any(path.glob("model*.safetensors")):
            return _read_accelerate_state(path, part)
        raise ConvertError(f"{path}: not a stage folder, diffusers folder, training checkpoint, accelerate state, "
                           "DeepSpeed or distributed checkpoint")
    if path.suffix == ".safetensors":
        return _read_safetensors_file(path)
    if path.suffix in (".pt", ".pth", ".ckpt", ".bin"):
        return _read_pt(path, ema, part)
    raise ConvertError(f"{path}: unknown source (expected a folder, a .safetensors file or a .pt checkpoint)")


def _read_stage(path: Path, ema: bool, part: str) -> Weights:
    sub = "critic" if part == "critic" else ("transformer_ema" if ema else "transformer")
    if not (path / sub).is_dir():
        what = "no critic (only distill trains one)" if part == "critic" else "no finished weights"
        raise ConvertError(f"{path}: stage has {what} ({sub}/ missing)")
    w = read_diffusers_folder(path / sub)
    cfg = load_config(path / "config.yaml")
    role = w.sampling["role"] if w.sampling else "teacher"
    prediction = prediction_of(w.sampling)
    return Weights(w.state_dict, w.config, sampling_settings(cfg, role, prediction), f"stage {path}: {sub}/")


def read_diffusers_folder(path: Path) -> Weights:
    """A diffusers transformer folder (ours or anyone's): `config.json`, the weights (one file, sharded or
    `.bin`) and the sampling record (`sampling.json`, or the old keys of `config.json`)."""
    config = read_json(path / "config.json")
    index = path / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        weight_map = get_key(read_json(index), "weight_map", where=str(index), expect=dict)
        bad = next((k for k, f in weight_map.items() if not isinstance(f, str) or Path(f).name != f), None)
        if bad is not None:  # a shard is a file name beside the index, nothing else
            raise ConvertError(f"{index}: weight_map['{bad}'] must be a shard file name, got {weight_map[bad]!r}")
        files = sorted(set(weight_map.values()))
        sd = {k: v for f in files for k, v in read_safetensors(path / f).items()}
    elif (path / "diffusion_pytorch_model.safetensors").is_file():
        sd = read_safetensors(path / "diffusion_pytorch_model.safetensors")
    elif (path / "diffusion_pytorch_model.bin").is_file():
        sd = _torch_load(path / "diffusion_pytorch_model.bin")
    else:
        raise ConvertError(f"{path}: config.json but no diffusion_pytorch_model*.safetensors")
    return Weights(to_diffusers_names(sd), constructor_args(config), read_sampling(path, config),
                   f"diffusers folder {path}")


def _read_training_checkpoint(path: Path, ema: bool, part: str) -> Weights:
    name = "critic" if part == "critic" else ("ema" if ema else "model")
    if not (path / f"{name}.safetensors").is_file():
        raise ConvertError(f"{path}: checkpoint has no {name}.safetensors")
    stage = path.parent.parent  # <stage>/checkpoints/step_*
    sd = read_safetensors(path / f"{name}.safetensors")
    if not (stage / "config.yaml").is_file():
        return Weights(to_diffusers_names(sd), None, None, f"training checkpoint {path}: {name}")
    cfg = load_config(stage / "config.yaml")
    role = "student" if stage.name in ("init_student", "distill") and part == "generator" else "teacher"
    # what the stage predicts (a student follows its teacher), where its finished weights say
    prediction = prediction_of(read_sampling(stage / "transformer"))
    return Weights(sd, wan_config(cfg.model), sampling_settings(cfg, role, prediction),
                   f"training checkpoint {path}: {name}")


def _read_safetensors_file(path: Path) -> Weights:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ConvertError(f"corrupt safetensors file {path}: {_first_line(e)}") from None
    sd = read_safetensors(path)
    config = constructor_args(parse_json(meta["config"], where=f"{path}: metadata 'config'")) \
        if "config" in meta else None
    sampling = check_record(parse_json(meta["sampling"], where=f"{path}: metadata 'sampling'", expect=None),
                            where=f"{path}: metadata 'sampling'") if "sampling" in meta else None
    return Weights(to_diffusers_names(sd), config, sampling, f"safetensors file {path} ({naming(strip_wrappers(sd))} names)")


def _first_line(e: Exception) -> str:
    """The first line of an exception's message (some, e.g. an `EOFError`, have none)."""
    return (str(e).splitlines() or [type(e).__name__])[0]


def _refusal(e: Exception) -> str:
    """The object `torch.load(weights_only=True)` refused, from its long message."""
    found = re.search(r"GLOBAL ([\w.]+)", str(e))
    return f"it pickles {found.group(1)}" if found else _first_line(e)[:120]


def _torch_load(path: Path):
    """`torch.load(weights_only=True)`: tensors and plain containers only, never arbitrary objects."""
    if path.stat().st_size == 0:
        raise ConvertError(f"corrupt checkpoint {path}: an empty file (0 bytes)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConvertError(f"{path}: refused by torch.load(weights_only=True), it holds objects other than "
                           f"tensors ({_refusal(e)})") from None
    except Exception as e:  # zip/pickle corruption surfaces as several exception types
        raise ConvertError(f"corrupt checkpoint {path}: {type(e).__name__}: {_first_line(e)[:120]}") from None


def _read_pt(path: Path, ema: bool, part: str) -> Weights:
    obj = _torch_load(path)
    if not isinstance(obj, dict):
        raise ConvertError(f"{path}: expected a dict of state dicts, got {type(obj).__name__}")
    if obj and all(torch.is_tensor(v) for v in obj.values()):
        entry, sd = "state dict", obj
    else:
        order = ["critic"] if part == "critic" else (["generator_ema", "generator", "model"] if ema
                                                     else ["generator", "model", "generator_ema"])
        entry = next((k for k in order if isinstance(obj.get(k), dict)), None)
        if entry is None:
            raise ConvertError(f"{path}: no {' / '.join(order)} entry (it has: {', '.join(map(str, obj))[:200]})")
        sd = obj[entry]
    bad = next((k for k, v in sd.items() if not torch.is_tensor(v)), None)
    if bad is not None:
        raise ConvertError(f"{path}: entry '{entry}' is not a state dict: '{bad}' holds a {type(sd[bad]).__name__}, "
                           "not a tensor")
    sampling = ({"role": "student", "config": SELF_FORCING_STUDENT}
                if entry in ("generator", "generator_ema") else None)
    return Weights(to_diffusers_names(sd), None, sampling, f"checkpoint {path}: {entry}")


def _read_accelerate_state(path: Path, part: str) -> Weights:
    name = "model" if part == "generator" else "model_1"  # accelerate numbers models in prepare() order
    for file in (path / f"{name}.safetensors", path / f"pytorch_{name}.bin"):
        if file.is_file():
            sd = read_safetensors(file) if file.suffix == ".safetensors" else _torch_load(file)
            return Weights(to_diffusers_names(sd), None, None, f"accelerate state {path}: {file.name}")
    raise ConvertError(f"{path}: accelerate state without {name}.safetensors")


def _read_deepspeed(path: Path) -> Weights:
    """DeepSpeed's own consolidation (`zero_to_fp32`), its `torch.load` calls forced to `weights_only=True`
    with only DeepSpeed's plain state records allowed besides tensors (it asks for `weights_only=False`)."""
    from unittest import mock

    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    load = torch.load

    def weights_only_load(*args, **kwargs):
        return load(*args, **{**kwargs, "weights_only": True})

    try:
        with torch.serialization.safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]), \
                mock.patch.object(torch, "load", weights_only_load):
            sd = get_fp32_state_dict_from_zero_checkpoint(str(path))
    except pickle.UnpicklingError as e:
        raise ConvertError(f"{path}: refused, a DeepSpeed file holds objects other than tensors and DeepSpeed's "
                           f"state records ({_refusal(e)})") from None
    except (FileNotFoundError, ValueError, RuntimeError, KeyError) as e:
        raise ConvertError(f"{path}: DeepSpeed could not consolidate it: {_first_line(e)[:160]}") from None
    return Weights(to_diffusers_names(dict(sd)), None, None, f"DeepSpeed checkpoint {path}")


def _read_distributed_checkpoint(path: Path) -> Weights:
    """A `torch.distributed.checkpoint` folder (sharded FSDP state), read whole in this one process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        reader = dcp.FileSystemReader(str(path))
        tensors = {k: m for k, m in reader.read_metadata().state_dict_metadata.items()
                   if isinstance(m, TensorStorageMetadata)}
        sd = {k: torch.empty(m.size, dtype=m.properties.dtype) for k, m in tensors.items()}
        with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
            warnings.simplefilter("ignore", UserWarning)
            dcp.load(sd, storage_reader=reader, no_dist=True)
    except Exception as e:  # torch wraps reader failures in several exception types
        raise ConvertError(f"{path}: unreadable distributed checkpoint: {_first_line(e)[:160]}") from None
    return Weights(to_diffusers_names(sd), None, None, f"distributed checkpoint {path}")
