"""LoRA adapters through peft on a Wan transformer (LongLive tunes its generator and critic with rank-256 LoRA).

`add_lora` freezes the model and injects peft's LoRA layers into the Linear layers named by `target_modules`
(diffusers' `PeftAdapterMixin.add_adapter`): only `lora_A` / `lora_B` train, `W x + (alpha / r)·B A x`, B starting
at zero so the adapted model starts equal to the model. The model's `state_dict()` then holds the adapters (what a
checkpoint saves and a resume restores, exactly); `merged_copy` folds them into plain weights `W + (alpha/r)·B A`
under the plain names, so exported folders are ordinary Wan / diffusers transformers.
"""

from __future__ import annotations

import copy

import torch


def add_lora(model: torch.nn.Module, *, rank: int, alpha: float | None = None, target_modules=("to_q", "to_k", "to_v", "to_out.0"),
             dropout: float = 0.0) -> int:
    """Freeze `model` and add LoRA adapters of `rank` to its `target_modules`; returns the trainable parameter count."""
    from peft import LoraConfig

    model.requires_grad_(False)
    try:
        model.add_adapter(LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=list(target_modules),
                                     lora_dropout=dropout, init_lora_weights=True))
    except ValueError as e:  # peft: no module of the model matches a target
        raise ValueError(f"lora.target_modules {list(target_modules)}: {str(e).splitlines()[0]}") from None
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def has_lora(model: torch.nn.Module) -> bool:
    """Whether adapters were added (diffusers' flag; no peft import for plain models)."""
    return bool(getattr(model, "_hf_peft_config_loaded", False))


def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's weights with every adapter folded in, under the plain (adapter-free) names."""
    from peft.tuners.lora import LoraLayer

    merged = copy.deepcopy(model)
    for module in merged.modules():
        if isinstance(module, LoraLayer):
            module.merge()
    return {k.replace(".base_layer.", "."): v for k, v in merged.state_dict().items() if ".lora_" not in k}


def merged_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A plain model of `model`'s class and config holding its merged weights, with its sampling record."""
    from pipeline.models.sampling_meta import attach, sampling_metadata

    plain = type(model).from_config(model.config)
    plain.load_state_dict(merged_state_dict(model), strict=True)
    return attach(plain.to(next(model.parameters()).device), sampling_metadata(model))
