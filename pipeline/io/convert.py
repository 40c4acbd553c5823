"""Checkpoint conversion: every kind of source read into one `Weights` record, written as a diffusers
folder, one safetensors file in diffusers naming, or one in the original Wan naming.

Sources (`read_source`, detected from what the path holds):

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

Naming: original Wan (`blocks.0.self_attn.q.weight`, `head.head.weight`, `blocks.0.norm3` = the
cross-attention norm) to diffusers goes through diffusers' `convert_wan_transformer_to_diffusers`;
`diffusers_to_wan` is its inverse, checked key by key against it on every call.

Beside the weights travel the model config (`WanTransformer3DModel` arguments) and the sampling
settings (`Weights.sampling`: the model's role, teacher or student, and the sections of our config that
sampling reads: frames per chunk, the student's step list and shift, the teacher's sampler, ...). A
diffusers folder keeps them in `config.json` and `sampling.json`; a single file in its safetensors
metadata; so every round trip gives back the same model and the same sampler.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from pipeline.training.checkpoint import CheckpointError, read_safetensors
from pipeline.config import ConfigError, StudentConfig, load_config
from pipeline.io.guard import Lock, check_output, replacing
from pipeline.models.causal_wan import wan_config

TARGETS = ("diffusers", "safetensors", "wan")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SAMPLING_FILE = "sampling.json"  # beside a diffusers folder's config.json
WAN_HEAD_DIM = 128  # both released Wan2.1 sizes (1.3B: 12 heads, 14B: 40 heads)
# Self-Forcing's published student settings, for a `.pt` generator that carries none of its own.
SELF_FORCING_STUDENT = {"data": {"frames_per_chunk": 3}, "model": {"prediction": "flow"},
                        "student": {"denoising_steps": [1000, 750, 500, 250], "shift": 5.0, "context_sigma": 0.0}}
_WRAPPER_PREFIXES = ("model.", "module.", "_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


class ConvertError(CheckpointError):
    """A source that cannot be read or does not fit its target, reported as one line."""


@dataclass
class Weights:
    """A transformer's weights and what is needed to rebuild and sample it.

    Attributes:
        state_dict: diffusers-named tensors (`WanTransformer3DModel.state_dict()` keys).
        config: `WanTransformer3DModel` constructor arguments, or None where the source has none.
        sampling: `{"role": "teacher" | "student", "config": {section: {key: value}}}` (partial config
            of ours), or None where the source says nothing about sampling.
        origin: what was read, for messages (`stage runs/tiny/distill: transformer_ema/`).
    """

    state_dict: dict
    config: dict | None
    sampling: dict | None
    origin: str

    def model_config(self) -> dict:
        return self.config if self.config is not None else infer_wan_config(self.state_dict)

    def cast(self, dtype: torch.dtype | None) -> "Weights":
        if dtype is None:
            return self
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in self.state_dict.items()}
        return dataclasses.replace(self, state_dict=sd)


# ---------------------------------------------------------------------------------------- key naming

_DIFFUSERS_TO_WAN = [  # (pattern on a diffusers key, original Wan replacement), applied in order
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^condition_embedder\.image_embedder\.norm1\.", "img_emb.proj.0."),
    (r"^condition_embedder\.image_embedder\.ff\.net\.0\.proj\.", "img_emb.proj.1."),
    (r"^condition_embedder\.image_embedder\.ff\.net\.2\.", "img_emb.proj.3."),
    (r"^condition_embedder\.image_embedder\.norm2\.", "img_emb.proj.4."),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^proj_out\.", "head.head."),
    (r"\.scale_shift_table$", ".modulation"),
    (r"\.attn1\.", ".self_attn."),
    (r"\.attn2\.", ".cross_attn."),
    (r"\.to_q\.", ".q."),
    (r"\.to_k\.", ".k."),
    (r"\.to_v\.", ".v."),
    (r"\.to_out\.0\.", ".o."),
    (r"\.add_k_proj\.", ".k_img."),
    (r"\.add_v_proj\.", ".v_img."),
    (r"\.norm_added_k\.", ".norm_k_img."),
    (r"\.ffn\.net\.0\.proj\.", ".ffn.0."),
    (r"\.ffn\.net\.2\.", ".ffn.2."),
    # diffusers' norm2 is Wan's norm3 (the cross-attention norm) and the other way round
    (r"^(blocks\.\d+)\.norm2\.", r"\1.norm__swap."),
    (r"^(blocks\.\d+)\.norm3\.", r"\1.norm2."),
    (r"^(blocks\.\d+)\.norm__swap\.", r"\1.norm3."),
]


def naming(state_dict: dict) -> str:
    """"wan" or "diffusers", from the keys; a one-line error for anything else."""
    keys = list(state_dict)
    if any(re.match(r"blocks\.\d+\.(self_attn|cross_attn)\.", k) or k.startswith("head.head.") for k in keys):
        return "wan"
    if any(re.match(r"blocks\.\d+\.attn[12]\.", k) or k.startswith("proj_out.") for k in keys):
        return "diffusers"
    raise ConvertError(f"keys are neither original-Wan nor diffusers Wan names (first keys: {keys[:3]})")


def wan_to_diffusers(state_dict: dict) -> dict:
    """Original Wan names → diffusers names (diffusers' own converter; the input is left untouched)."""
    return convert_wan_transformer_to_diffusers(dict(state_dict))


def diffusers_to_wan(state_dict: dict) -> dict:
    """diffusers names → original Wan names, the inverse of `wan_to_diffusers`.

    Raises:
        ConvertError: a key whose Wan name does not map back to it (a module this inverse does not know).
    """
    out = {}
    for key, value in state_dict.items():
        for pattern, repl in _DIFFUSERS_TO_WAN:
            key = re.sub(pattern, repl, key)
        out[key] = value
    back = wan_to_diffusers(dict.fromkeys(out))
    wrong = [k for k, b in zip(state_dict, back) if k != b]
    if len(out) != len(state_dict) or wrong:
        raise ConvertError(f"no original-Wan name for {wrong[:3] or 'some keys'}")
    return out


def strip_wrappers(state_dict: dict) -> dict:
    """Drop the prefixes training wrappers add (`model.` of Self-Forcing's WanDiffusionWrapper, DDP's
    `module.`, torch.compile's `_orig_mod.`, FSDP's), when every key has them."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if state_dict and all(k.startswith(prefix) for k in state_dict):
                state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
                changed = True
    return state_dict


def to_diffusers_names(state_dict: dict) -> dict:
    state_dict = strip_wrappers(state_dict)
    return wan_to_diffusers(state_dict) if naming(state_dict) == "wan" else state_dict


# ----------------------------------------------------------------------------- config and shape check

def clean_config(config: dict) -> dict:
    """Only `WanTransformer3DModel`'s constructor arguments (drops `_class_name`, our sampling keys, ...)."""
    keys = WanTransformer3DModel._get_init_keys(WanTransformer3DModel) - {"self"}
    out = {k: v for k, v in config.items() if k in keys}
    if "patch_size" in out:
        out["patch_size"] = list(out["patch_size"])
    return out


def infer_wan_config(sd: dict) -> dict:
    """`WanTransformer3DModel` arguments read off diffusers-named weight shapes. The head count is not
    in any shape: Wan's head width (128) is assumed."""
    def need(key):
        if key not in sd:
            raise ConvertError(f"cannot infer the model config: no '{key}' in the weights; pass --model-config")
        return sd[key].shape

    pe = need("patch_embedding.weight")  # [dim, in_channels, pt, ph, pw]
    dim, patch = pe[0], list(pe[2:])
    if dim % WAN_HEAD_DIM:
        raise ConvertError(f"cannot infer the head count of a {dim}-wide model (Wan's heads are {WAN_HEAD_DIM} "
                           "wide); pass --model-config CONFIG.json")
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    config = dict(patch_size=patch, num_attention_heads=dim // WAN_HEAD_DIM, attention_head_dim=WAN_HEAD_DIM,
                  in_channels=pe[1], out_channels=need("proj_out.weight")[0] // math.prod(patch),
                  text_dim=need("condition_embedder.text_embedder.linear_1.weight")[1],
                  freq_dim=need("condition_embedder.time_embedder.linear_1.weight")[1],
                  ffn_dim=need("blocks.0.ffn.net.0.proj.weight")[0], num_layers=len(blocks),
                  cross_attn_norm="blocks.0.norm2.weight" in sd,
                  qk_norm="rms_norm_across_heads" if "blocks.0.attn1.norm_q.weight" in sd else None)
    if "condition_embedder.image_embedder.norm1.weight" in sd:  # image-to-video
        config.update(image_dim=sd["condition_embedder.image_embedder.norm1.weight"].shape[0], added_kv_proj_dim=dim)
    return config


def empty_model(config: dict) -> WanTransformer3DModel:
    """The target architecture without memory (meta tensors)."""
    try:
        with init_empty_weights():
            return WanTransformer3DModel(**clean_config(config))
    except (TypeError, ValueError) as e:
        raise ConvertError(f"model config does not build a WanTransformer3DModel: {e}") from None


def check_fits(state_dict: dict, config: dict) -> WanTransformer3DModel:
    """Every key the target expects is there with its shape, and nothing else.

    Returns:
        the target architecture on the meta device (`empty_model(config)`), for the caller to fill.

    Raises:
        ConvertError: naming the first missing or unexpected key, or a key with both shapes.
    """
    model = empty_model(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    if missing or unexpected:
        raise ConvertError(f"weights do not fit the model config: {len(missing)} missing keys {missing[:3]}, "
                           f"{len(unexpected)} unexpected keys {unexpected[:3]}")
    for key, shape in expected.items():
        if tuple(state_dict[key].shape) != shape:
            raise ConvertError(f"shape mismatch for {key}: weights have {tuple(state_dict[key].shape)}, the model "
                               f"config expects {shape}")
    return model


# ------------------------------------------------------------------------------------------- sources

def sampling_settings(cfg, role: str, prediction: str | None = None) -> dict:
    """The sections of a run config that sampling reads, as stored beside a converted model."""
    asdict = dataclasses.asdict
    return {"role": role, "config": {
        "data": asdict(cfg.data), "model": {"prediction": prediction or cfg.model.prediction},
        "student": asdict(cfg.student),
        "pretrain_teacher": {"attention": cfg.pretrain_teacher.attention,
                             "sampler": asdict(cfg.pretrain_teacher.sampler)}}}


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
            return _read_diffusers(path)
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
    w = _read_diffusers(path / sub)
    cfg = load_config(path / "config.yaml")
    role = w.sampling["role"] if w.sampling else "teacher"
    prediction = (w.sampling or {}).get("config", {}).get("model", {}).get("prediction")
    return Weights(w.state_dict, w.config, sampling_settings(cfg, role, prediction), f"stage {path}: {sub}/")


def _read_diffusers(path: Path) -> Weights:
    config = json.loads((path / "config.json").read_text())
    index = path / "diffusion_pytorch_model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        sd = {k: v for f in files for k, v in read_safetensors(path / f).items()}
    elif (path / "diffusion_pytorch_model.safetensors").is_file():
        sd = read_safetensors(path / "diffusion_pytorch_model.safetensors")
    elif (path / "diffusion_pytorch_model.bin").is_file():
        sd = _torch_load(path / "diffusion_pytorch_model.bin")
    else:
        raise ConvertError(f"{path}: config.json but no diffusion_pytorch_model*.safetensors")
    sampling = None
    if (path / SAMPLING_FILE).is_file():
        sampling = json.loads((path / SAMPLING_FILE).read_text())
    elif "denoising_steps" in config or "prediction" in config:  # a stage's own folder records them in config.json
        student = {k: config[k] for k in ("denoising_steps", "shift") if k in config}
        sampling = {"role": "student" if student else "teacher",
                    "config": {"model": {"prediction": config.get("prediction", "flow")},
                               **({"student": student} if student else {})}}
    return Weights(to_diffusers_names(sd), clean_config(config), sampling, f"diffusers folder {path}")


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
    done = stage / "transformer" / "config.json"  # what the stage predicts (a student follows its teacher)
    prediction = json.loads(done.read_text()).get("prediction") if done.is_file() else None
    return Weights(sd, wan_config(cfg.model), sampling_settings(cfg, role, prediction),
                   f"training checkpoint {path}: {name}")


def _read_safetensors_file(path: Path) -> Weights:
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise ConvertError(f"corrupt safetensors file {path}: {str(e).splitlines()[0]}") from None
    sd = read_safetensors(path)
    config = json.loads(meta["config"]) if "config" in meta else None
    sampling = json.loads(meta["sampling"]) if "sampling" in meta else None
    return Weights(to_diffusers_names(sd), config, sampling, f"safetensors file {path} ({naming(strip_wrappers(sd))} names)")


def _refusal(e: Exception) -> str:
    """The object `torch.load(weights_only=True)` refused, from its long message."""
    found = re.search(r"GLOBAL ([\w.]+)", str(e))
    return f"it pickles {found.group(1)}" if found else str(e).splitlines()[0][:120]


def _torch_load(path: Path):
    """`torch.load(weights_only=True)`: tensors and plain containers only, never arbitrary objects."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ConvertError(f"{path}: refused by torch.load(weights_only=True), it holds objects other than "
                           f"tensors ({_refusal(e)})") from None
    except Exception as e:  # zip/pickle corruption surfaces as several exception types
        raise ConvertError(f"corrupt checkpoint {path}: {type(e).__name__}: {str(e).splitlines()[0][:120]}") from None


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
        raise ConvertError(f"{path}: DeepSpeed could not consolidate it: {str(e).splitlines()[0][:160]}") from None
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
        raise ConvertError(f"{path}: unreadable distributed checkpoint: {str(e).splitlines()[0][:160]}") from None
    return Weights(to_diffusers_names(sd), None, None, f"distributed checkpoint {path}")


# --------------------------------------------------------------------------------------------- targets

def write_diffusers(weights: Weights, dest: Path, max_shard_size: str = "10GB") -> None:
    """A folder `WanTransformer3DModel.from_pretrained` loads with no missing or unexpected keys, plus
    `sampling.json` (the sampling settings) where known."""
    model = check_fits(weights.state_dict, weights.model_config())
    model.load_state_dict(weights.state_dict, strict=True, assign=True)  # the tensors themselves, any dtype
    model.save_pretrained(dest, max_shard_size=max_shard_size)
    if weights.sampling is not None:
        (dest / SAMPLING_FILE).write_text(json.dumps(weights.sampling, indent=1))


def write_file(weights: Weights, dest: Path, names: str) -> None:
    """One safetensors file in `names` ("diffusers" or "wan") naming; config and sampling settings in its
    metadata."""
    config = weights.model_config()
    check_fits(weights.state_dict, config)
    sd = diffusers_to_wan(weights.state_dict) if names == "wan" else weights.state_dict
    meta = {"format": "pt", "config": json.dumps(config)}
    if weights.sampling is not None:
        meta["sampling"] = json.dumps(weights.sampling)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(dest), metadata=meta)


def convert(source: str | Path, dest: str | Path, to: str, ema: bool = False, dtype: str | None = None,
            part: str = "generator", force: bool = False, model_config: str | Path | None = None,
            command: str | None = None) -> Weights:
    """Read `source`, write it to `dest` as `to` ("diffusers", "safetensors" or "wan").

    Args:
        dtype: "fp32", "bf16" or "fp16" to cast floating tensors (None: keep).
        model_config: a diffusers `config.json` for sources that carry no config.
    Returns:
        the `Weights` written.
    """
    if to not in TARGETS:
        raise ConvertError(f"--to must be one of {', '.join(TARGETS)}, got '{to}'")
    if dtype is not None and dtype not in DTYPES:
        raise ConvertError(f"--dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    dest = Path(dest)
    if to != "diffusers" and dest.suffix != ".safetensors":
        raise ConvertError(f"--to {to} writes one file: DEST must end in .safetensors, got {dest}")
    inputs = {"SOURCE": source, "--model-config": model_config}
    check_output(dest, inputs, force, "DEST")  # before reading anything large
    with Lock(dest, command or f"convert {source} {dest} --to {to}"):  # one command at a time per DEST
        check_output(dest, inputs, force, "DEST")  # again, now that no other command can be writing it
        weights = read_source(source, ema, part)
        if model_config is not None:
            path = Path(model_config)
            if not path.is_file():
                raise FileNotFoundError(f"--model-config not found: {path}")
            weights = dataclasses.replace(weights, config=clean_config(json.loads(path.read_text())))
        weights = weights.cast(DTYPES.get(dtype))
        with replacing(dest, force, "DEST") as tmp:
            if to == "diffusers":
                write_diffusers(weights, tmp)
            else:
                write_file(weights, tmp, "wan" if to == "wan" else "diffusers")
    return weights


def sampling_config(weights: Weights, text_dim: int):
    """Our `Config` for sampling a converted model: defaults < its stored sampling settings."""
    partial = (weights.sampling or {}).get("config", {})
    try:
        return load_config(None, [f"model.text_dim={text_dim}"], partial=partial,
                           partial_source=f"sampling settings of {weights.origin}")
    except ConfigError as e:
        raise ConvertError(str(e)) from None


def build_model(weights: Weights):
    """A `CausalWanTransformer` holding `weights` (no copy), its config recording the sampling role as a
    stage's own folders do (`prediction`, and for a student `denoising_steps` and `shift`)."""
    from pipeline.models.causal_wan import CausalWanTransformer

    config = weights.model_config()
    check_fits(weights.state_dict, config)
    with init_empty_weights():
        model = CausalWanTransformer(**clean_config(config))
    model.load_state_dict(weights.state_dict, strict=True, assign=True)
    settings = (weights.sampling or {}).get("config", {})
    record = {"prediction": settings.get("model", {}).get("prediction", "flow")}
    if (weights.sampling or {}).get("role") == "student":
        student = {**StudentConfig().__dict__, **settings.get("student", {})}  # unset keys: the schema's defaults
        record.update(denoising_steps=list(student["denoising_steps"]), shift=student["shift"])
    model.register_to_config(**record)
    return model.eval()
