"""The record every checkpoint reader gives and every writer takes (`Weights`), and its model config:
constructor arguments read from a `config.json`, inferred from weight shapes, checked against the weights.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass

import torch
from accelerate import init_empty_weights
from diffusers import WanTransformer3DModel

from pipeline.training.checkpoint import CheckpointError

WAN_HEAD_DIM = 128  # both released Wan2.1 sizes (1.3B: 12 heads, 14B: 40 heads)


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
        return self.config if self.config is not None else infer_wan_config(self.state_dict)

    def cast(self, dtype: torch.dtype | None) -> "Weights":
        if dtype is None:
            return self
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in self.state_dict.items()}
        return dataclasses.replace(self, state_dict=sd)


def constructor_args(config: dict) -> dict:
    """The `WanTransformer3DModel` constructor arguments of a diffusers `config.json` (without diffusers'
    own `_class_name`, `_diffusers_version`, ..., or any key the constructor does not take)."""
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
