"""Checkpoints without pickles: weights, EMA, optimizer and RNG state as safetensors, plus JSON.

A training checkpoint is a folder `step_XXXXXXX/` written under a temporary name and renamed into
place, so a crash mid-write never leaves a half checkpoint that looks complete:

    model.safetensors      raw weights (state-dict keys of the model)
    ema.safetensors        EMA weights, same keys
    optimizer.safetensors  optimizer tensors, flattened `state.<param index>.<name>`; its
                           param_groups and scalars go to meta.json
    meta.json              step, optimizer scalars, EMA counters, data-stream and RNG states
    <name>.safetensors, <name>_optimizer.safetensors
                           further trained models and their optimizers (distill's critic)
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pipeline.training.faults import maybe_kill


class CheckpointError(RuntimeError):
    """A missing or unreadable checkpoint, reported as one line."""


def read_safetensors(path: str | Path, device="cpu") -> dict[str, torch.Tensor]:
    """Load a safetensors file, turning any failure into a one-line `CheckpointError`."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing file: {path}")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"corrupt safetensors file {path}: {str(e).splitlines()[0]}") from None


def _contiguous(sd: dict) -> dict:
    return {k: v.detach().contiguous().cpu() for k, v in sd.items()}


def optimizer_to_flat(optimizer: torch.optim.Optimizer | dict) -> tuple[dict, dict]:
    """Split an optimizer state dict (or an optimizer's) into tensors (for safetensors) and JSON-able rest."""
    sd = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"state.{idx}.{name}"] = value
            else:
                scalars[f"{idx}.{name}"] = value
    return _contiguous(tensors), {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(optimizer: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_training_checkpoint(root: str | Path, step: int, model: torch.nn.Module, ema, optimizer,
                             extra: dict, rng: dict[str, torch.Tensor], keep: int = 2,
                             others: dict | None = None) -> Path:
    """Write `root/step_{step:07d}/` atomically and keep only the newest `keep` checkpoints.

    Args:
        model: the unwrapped model (its `state_dict()` keys are saved).
        ema: a diffusers `EMAModel` over `model.parameters()`.
        extra: JSON-able state (data stream, scheduler step, ...).
        rng: named generator states (uint8 tensors from `Generator.get_state()`).
        optimizer: the optimizer or its state dict (`full_optimizer_state` under DeepSpeed).
        others: `{name: (model, optimizer)}` trained alongside (no EMA), saved as `<name>.safetensors`
            and `<name>_optimizer.safetensors`.
    """
    root = Path(root)
    final = root / f"step_{step:07d}"
    tmp = root / f".tmp_step_{step:07d}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        _write_checkpoint(tmp, step, model, ema, optimizer, extra, rng, others)
    except (OSError, SafetensorError) as e:  # a full disk, a quota, a vanished mount: keep what was there
        shutil.rmtree(tmp, ignore_errors=True)
        last = latest_checkpoint(root)
        kept = f"the last complete checkpoint ({last.name}) is kept" if last else "no earlier checkpoint exists"
        reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
        raise CheckpointError(f"could not write checkpoint step {step} in {root}: {reason}; {kept}") from None
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in sorted(root.glob("step_*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _frozen_under_lora(model: torch.nn.Module) -> set[str]:
    """The frozen parameters of a model with LoRA adapters (none otherwise): checkpoints leave them out, since
    they are the stage's recorded input, loaded again the same on resume (a 1.3B base is 2.6 GB in bf16 per
    checkpoint; its rank-256 adapters a fraction of it)."""
    from pipeline.models.lora import has_lora

    return {n for n, p in model.named_parameters() if not p.requires_grad} if has_lora(model) else set()


def _saved_weights(model: torch.nn.Module) -> dict:
    frozen = _frozen_under_lora(model)
    return _contiguous({k: v for k, v in model.state_dict().items() if k not in frozen})


def _write_checkpoint(tmp: Path, step: int, model, ema, optimizer, extra: dict, rng: dict, others: dict | None):
    """The files of one checkpoint into the folder `tmp` (see `save_training_checkpoint`)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]  # what the EMA averages (`optim.averaged`)
    save_file(_saved_weights(model), str(tmp / "model.safetensors"))
    maybe_kill("checkpoint", step)  # crash tests: a half-written checkpoint must never be picked up
    save_file(_contiguous(dict(zip(names, ema.shadow_params))), str(tmp / "ema.safetensors"))
    opt_tensors, opt_meta = optimizer_to_flat(optimizer)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    save_file(_contiguous(rng), str(tmp / "rng.safetensors"))
    ema_meta = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
    meta = {"step": step, "optimizer": opt_meta, "ema": ema_meta, "extra": extra, "others": {}}
    for name, (other, other_opt) in (others or {}).items():
        save_file(_saved_weights(other), str(tmp / f"{name}.safetensors"))
        tensors, meta["others"][name] = optimizer_to_flat(other_opt)
        save_file(tensors, str(tmp / f"{name}_optimizer.safetensors"))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete `step_*` folder under root, or None."""
    found = sorted(p for p in Path(root).glob("step_*") if (p / "meta.json").is_file())
    return found[-1] if found else None


def _load_weights(model: torch.nn.Module, path: Path, checkpoint: Path) -> None:
    try:
        missing, unexpected = model.load_state_dict(read_safetensors(path), strict=False)
    except RuntimeError as e:  # shape mismatches: the model config changed since the checkpoint
        detail = next((ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln), str(e).splitlines()[0])
        raise CheckpointError(f"checkpoint {checkpoint} does not fit the model ({path.name}: {detail}); "
                              "rerun with --force or restore the config it was made with") from None
    missing = [k for k in missing if k not in _frozen_under_lora(model)]  # LoRA: the base is not saved
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {checkpoint} does not fit the model: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}")


def _load_optimizer(optimizer, path: Path, meta: dict, checkpoint: Path) -> None:
    try:
        optimizer_from_flat(optimizer, read_safetensors(path), meta)
    except (ValueError, KeyError, RuntimeError, TypeError, AttributeError) as e:
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"checkpoint {checkpoint}: optimizer state {path.name} does not fit "
                              f"({str(e).splitlines()[0]})") from None


# meta.json's keys (`_write_checkpoint`) and what each must be; others may be added freely
_META_KEYS = {"step": (int, "an integer"), "optimizer": (dict, "an object"), "ema": (dict, "an object"),
              "extra": (dict, "an object")}


def _read_meta(path: Path) -> dict:
    """`path/meta.json`, checked to be what `_write_checkpoint` writes: one line naming the file and the key
    otherwise (a `{}` or a list is a hand-edited or foreign file, not a checkpoint)."""
    file = path / "meta.json"
    try:
        meta = json.loads(file.read_bytes().decode())
    except (OSError, ValueError) as e:  # ValueError: JSON and UTF-8 errors
        raise CheckpointError(f"corrupt checkpoint {path}: meta.json unreadable ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"corrupt checkpoint {path}: {file.name} must be a JSON object, got "
                              f"{type(meta).__name__}")
    for key, (kind, words) in _META_KEYS.items():
        if key not in meta:
            raise CheckpointError(f"corrupt checkpoint {path}: {file.name} has no key '{key}'")
        if not isinstance(meta[key], kind) or isinstance(meta[key], bool):
            raise CheckpointError(f"corrupt checkpoint {path}: {file.name} key '{key}' must be {words}, got "
                                  f"{type(meta[key]).__name__}")
    others = meta.get("others", {})
    if not isinstance(others, dict) or not all(isinstance(v, dict) for v in others.values()):
        raise CheckpointError(f"corrupt checkpoint {path}: {file.name} key 'others' must map names to objects")
    for section, value in [("optimizer", meta["optimizer"]), *((f"others.{k}", v) for k, v in others.items())]:
        if not isinstance(value.get("param_groups"), list) or not isinstance(value.get("scalars"), dict):
            raise CheckpointError(f"corrupt checkpoint {path}: {file.name} key '{section}' needs 'param_groups' "
                                  "(a list) and 'scalars' (an object)")
    return meta


def load_training_checkpoint(path: str | Path, model: torch.nn.Module, ema, optimizer,
                             others: dict | None = None) -> tuple[int, dict, dict]:
    """Restore model, EMA and optimizer (and `others`, as saved) in place from a `step_*` folder.

    Returns:
        (step, extra, rng) as saved.
    """
    path = Path(path)
    meta = _read_meta(path)
    _load_weights(model, path / "model.safetensors", path)
    ema_weights = read_safetensors(path / "ema.safetensors")
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    missing = [n for n in names if n not in ema_weights]
    if missing:
        raise CheckpointError(f"checkpoint {path} does not fit the model: ema.safetensors has no {missing[:3]}")
    try:
        ema.load_state_dict({**meta["ema"], "shadow_params": [ema_weights[n] for n in names]})
    except (ValueError, TypeError, KeyError) as e:  # diffusers' EMAModel checks its counters' types
        raise CheckpointError(f"corrupt checkpoint {path}: meta.json key 'ema' does not restore the EMA "
                              f"({(str(e).splitlines() or [type(e).__name__])[0]})") from None
    _load_optimizer(optimizer, path / "optimizer.safetensors", meta["optimizer"], path)
    for name, (other, other_opt) in (others or {}).items():
        if name not in meta.get("others", {}):
            raise CheckpointError(f"checkpoint {path} has no '{name}' (saved by another stage?)")
        _load_weights(other, path / f"{name}.safetensors", path)
        _load_optimizer(other_opt, path / f"{name}_optimizer.safetensors", meta["others"][name], path)
    return meta["step"], meta["extra"], read_safetensors(path / "rng.safetensors")


class CheckpointManager:
    """The checkpoints of one training stage under `root` (`<stage>/checkpoints/step_*/`).

    The first trained model is the checkpoint's `model` (with its EMA and optimizer); the others are
    saved beside it by name (distill's critic). Saving is atomic and keeps the newest `keep`; restoring
    is bit-exact (weights, EMA, every optimizer; the caller restores data position and generators from
    the returned `extra` and `rng`).
    """

    def __init__(self, root: str | Path, *, keep: int = 2, accelerator=None):
        self.root, self.keep, self.accelerator = Path(root), keep, accelerator

    def restore(self, *, model, ema, optimizer, others: dict | None = None) -> tuple[int, dict, dict]:
        """Restore the newest complete checkpoint in place (every process reads the same one).

        Returns:
            (step, extra, rng): 0, {}, {} when there is none.
        """
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()
        last = latest_checkpoint(self.root)
        if last is None:
            return 0, {}, {}
        step, extra, rng = load_training_checkpoint(last, model, ema, optimizer, others)
        print(f"resuming from {last.name} (step {step}) in {last.parent}")
        return step, extra, rng

    def save(self, step: int, *, model, ema, optimizer, extra: dict, rng: dict, others: dict | None = None) -> Path:
        """`save_training_checkpoint` (looked up at call time: crash tests wrap it)."""
        return save_training_checkpoint(self.root, step, model, ema, optimizer, extra=extra, rng=rng, keep=self.keep,
                                        others=others)

