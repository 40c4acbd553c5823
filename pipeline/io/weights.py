"""The record every checkpoint reader gives and every writer takes (`Weights`), and its model config:
constructor arguments read from a `config.json`, inferred from weight shapes, checked against the weights.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import WanTransformer3DModel

from pipeline.io.jsonfile import read_json
from pipeline.training.checkpoint import CheckpointError

# The head count is in no weight's shape (q/k norms span all heads): only Wan's own widths are known, from the
# released configs (Wan2.1 T2V-1.3B: dim 1536, 12 heads; Wan2.2 TI2V-5B: 3072, 24; Wan2.1/2.2 14B: 5120, 40).
WAN_HEADS = {1536: 12, 3072: 24, 5120: 40}


class ConvertError(CheckpointError):
    """A source that cannot be read or does not fit its target, reported as one line."""


@dataclass
class Weights:
    """A transformer's weights and what is needed to rebuild and sample it.

    Attributes:
        state_dict: diffusers-named tensors (`WanTransformer3DModel.state_dict()` keys).
        config: `WanTransformer3DModel` constructor arguments, or None where the source has none.
        sampling: the sampling record (`pipeline/models/sampling_meta.py`: `{"role": "teacher" | "student",
            "config": {section: {key: value}}}`), or None where the source says nothing about sampling.
        origin: what was read, for messages (`stage runs/tiny/distill: transformer_ema/`).
    """

    state_dict: dict
    config: dict | None
    sampling: dict | None
    origin: str

    def model_config(self) -> dict:
        return self.config if self.config is not None else infer_wan_config(self.state_dict, origin=self.origin)

    def with_config_file(self, path: str | Path | None) -> "Weights":
        """These weights with the shape of a `--model-config` / `*_config` file (`read_model_config`) where they
        record none (a bare `.pt`, a DeepSpeed folder); weights that record their shape keep it."""
        if path is None or self.config is not None:
            return self
        return dataclasses.replace(self, config=read_model_config(path))

    def check_finite(self, *, after: str | None = None, hint: str = "pass --allow-nonfinite to convert anyway") -> None:
        """Refuse NaN / inf in any floating tensor, in one line naming the first such key (`after`: what
        produced them, e.g. a cast; `hint`: how to proceed)."""
        for key, value in self.state_dict.items():
            if value.is_floating_point() and not bool(torch.isfinite(value).all()):
                bad = "NaN" if bool(torch.isnan(value).any()) else "inf"
                n = int((~torch.isfinite(value)).sum())
                cause = f" after {after}" if after else ""
                raise ConvertError(f"{self.origin}: non-finite weights{cause}: '{key}' holds {bad} ({n} of "
                                   f"{value.numel()} values); {hint}")

    def cast(self, dtype: torch.dtype | None) -> "Weights":
        if dtype is None:
            return self
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in self.state_dict.items()}
        return dataclasses.replace(self, state_dict=sd)


def read_model_config(path: str | Path) -> dict:
    """The `WanTransformer3DModel` arguments of a `--model-config` file (a diffusers `config.json`)."""
    config = read_json(path, what="--model-config")
    for key in ("num_attention_heads", "attention_head_dim"):
        if key in config and (not isinstance(config[key], int) or isinstance(config[key], bool) or config[key] < 1):
            raise ConvertError(f"--model-config {path}: '{key}' must be a positive integer, got {config[key]!r}")
    return constructor_args(config)


def constructor_args(config: dict) -> dict:
    """The `WanTransformer3DModel` constructor arguments of a diffusers `config.json` (without diffusers'
    own `_class_name`, `_diffusers_version`, ..., or any key the constructor does not take)."""
    keys = WanTransformer3DModel._get_init_keys(WanTransformer3DModel) - {"self"}
    out = {k: v for k, v in config.items() if k in keys}
    if "patch_size" in out:
        out["patch_size"] = list(out["patch_size"])
    return out


def infer_wan_config(sd: dict, *, origin: str | None = None) -> dict:
    """`WanTransformer3DModel` arguments read off diffusers-named weight shapes (`origin`: what they were
    read from, for messages). The head count is in no shape: it is known only for Wan's own widths
    (`WAN_HEADS`); any other width is an error asking for `--model-config`, never a guess."""
    where = f"{origin}: " if origin else ""

    def need(key):
        if key not in sd:
            raise ConvertError(f"{where}cannot infer the model config: no '{key}' in the weights; pass "
                               "--model-config CONFIG.json")
        return sd[key].shape

    pe = need("patch_embedding.weight")  # [dim, in_channels, pt, ph, pw]
    dim, patch = pe[0], list(pe[2:])
    if dim not in WAN_HEADS:
        known = ", ".join(f"{w} → {h}" for w, h in WAN_HEADS.items())
        raise ConvertError(f"{where}the head count of a {dim}-wide model cannot be read from its weights (known only "
                           f"for Wan's widths: {known} heads); pass --model-config CONFIG.json (a diffusers "
                           "config.json with num_attention_heads and attention_head_dim)")
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    config = dict(patch_size=patch, num_attention_heads=WAN_HEADS[dim], attention_head_dim=dim // WAN_HEADS[dim],
                  in_channels=pe[1], out_channels=need("proj_out.weight")[0] // math.prod(patch),
                  text_dim=need("condition_embedder.text_embedder.linear_1.weight")[1],
                  freq_dim=need("condition_embedder.time_embedder.linear_1.weight")[1],
                  ffn_dim=need("blocks.0.ffn.net.0.proj.weight")[0], num_layers=len(blocks),
                  cross_attn_norm="blocks.0.norm2.weight" in sd,
                  qk_norm="rms_norm_across_heads" if "blocks.0.attn1.norm_q.weight" in sd else None)
    if "condition_embedder.image_embedder.norm1.weight" in sd:  # image-to-video
        config.update(image_dim=sd["condition_embedder.image_embedder.norm1.weight"].shape[0], added_kv_proj_dim=dim)
    return config


def empty_model(config: dict, cls=WanTransformer3DModel):
    """The target architecture (`cls`: `WanTransformer3DModel` or a subclass with its constructor)
    without memory (meta tensors)."""
    try:
        with init_empty_weights():
            return cls(**constructor_args(config))
    except (TypeError, ValueError) as e:
        raise ConvertError(f"model config does not build a WanTransformer3DModel: {e}") from None


def check_fits(state_dict: dict, config: dict, cls=WanTransformer3DModel):
    """Every key the target expects is there with its shape, and nothing else.

    Returns:
        the target architecture on the meta device (`empty_model(config, cls)`), for the caller to fill.

    Raises:
        ConvertError: naming the first missing or unexpected key, or a key with both shapes.
    """
    model = empty_model(config, cls)
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
