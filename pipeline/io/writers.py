"""`Weights` written out: a diffusers folder (`config.json` + weights + `sampling.json`), or one
safetensors file in diffusers or original-Wan names whose metadata carries the model config and the
sampling record, so every round trip gives back the same model and the same sampler."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from pipeline.io.keys import diffusers_to_wan
from pipeline.io.weights import Weights, check_fits
from pipeline.models.sampling_meta import write_sampling


def write_diffusers(weights: Weights, dest: Path, max_shard_size: str = "10GB") -> None:
    """A folder `WanTransformer3DModel.from_pretrained` loads with no missing or unexpected keys, plus
    `sampling.json` (the sampling record) where known."""
    model = check_fits(weights.state_dict, weights.model_config())
    model.load_state_dict(weights.state_dict, strict=True, assign=True)  # the tensors themselves, any dtype
    model.save_pretrained(dest, max_shard_size=max_shard_size)
    write_sampling(dest, weights.sampling)


def write_file(weights: Weights, dest: Path, names: str) -> None:
    """One safetensors file in `names` ("diffusers" or "wan") naming; config and sampling record in its
    metadata."""
    config = weights.model_config()
    check_fits(weights.state_dict, config)
    sd = diffusers_to_wan(weights.state_dict) if names == "wan" else weights.state_dict
    meta = {"format": "pt", "config": json.dumps(config)}
    if weights.sampling is not None:
        meta["sampling"] = json.dumps(weights.sampling)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(dest), metadata=meta)
