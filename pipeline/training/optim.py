"""Optimisers, schedules, EMA and how models are held for training (trained, frozen) and stepped."""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from diffusers.optimization import get_scheduler


@contextmanager
def no_parameter_grads(*modules: torch.nn.Module):
    """Gradients flow through `modules` to their inputs but their own parameters collect none (the
    generator's GAN loss must not leave gradients in the discriminator); and a gradient-free call of a trained
    model under bf16 autocast leaves no bf16 copy of its weights in autocast's cache (it caches only the casts of
    weights that require grad): the DMD scores' critic pass and the critic update's sampling by the generator
    would otherwise hold 2 bytes per parameter until the step's autocast ends. Nested, the inner one changes
    nothing."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite."""


def trainable(model: torch.nn.Module, section, lora: bool = True, name: str = "model") -> torch.nn.Module:
    """Put a model to be trained in train mode with gradients, and with gradient checkpointing when the
    section asks for it (every trained full-sequence pass recomputes its blocks in the backward pass:
    the same numbers, only the layer inputs kept). With `section.lora.rank` (and `lora`), only LoRA adapters
    train (`pipeline/models/lora.py`); the trainable count is printed. Returns the model."""
    model.train().requires_grad_(True)
    lc = getattr(section, "lora", None)
    if lora and lc is not None and lc.rank:
        from pipeline.models.lora import add_lora

        n = add_lora(model, rank=lc.rank, alpha=lc.alpha, target_modules=lc.target_modules, dropout=lc.dropout)
        total = sum(p.numel() for p in model.parameters())
        print(f"[lora] {name}: rank {lc.rank}, {n:,} trainable parameters of {total:,} ({100 * n / total:.2f} %)")
    if section.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model


def averaged(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters the EMA averages (and checkpoints store it for): the trained ones, i.e. all of a fully
    trained model, only the adapters of a LoRA one (its frozen base would be averaged to itself)."""
    return [p for p in model.parameters() if p.requires_grad]


def hold_frozen(model: torch.nn.Module, mixed_precision: str) -> torch.nn.Module:
    """A frozen model (evaluation mode, no gradients), its matmul weights held in bf16 when the run
    computes in bf16: those of every Linear and Conv layer outside diffusers' `_keep_in_fp32_modules`
    (norms, modulation tables, time embedding, RoPE stay fp32). Autocast casts exactly those weights
    to bf16 at every call anyway, so the outputs are unchanged and the weights take half the memory.
    With `mixed_precision` no, nothing changes. Returns the model."""
    model.eval().requires_grad_(False)
    if mixed_precision != "bf16":
        return model
    keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv3d)) and not any(k in name.split(".") for k in keep):
            module.to(torch.bfloat16)
    return model


def place_ema(ema, section, device) -> None:
    """Put the EMA copy where `section.ema_device` says: on the trained model's `device` (`same`) or on
    the CPU (`cpu`: 4 bytes per parameter off the accelerator; `ema_step` brings the weights over)."""
    ema.to(torch.device("cpu") if section.ema_device == "cpu" else device)


def ema_step(ema, parameters) -> None:
    """`ema.step(parameters)`, also when the EMA copy lives on another device than the weights
    (`ema_device: cpu`): then the weights are copied to it first, keeping `requires_grad` (which decides
    between averaging and copying); the same arithmetic, on the EMA's device. Under ZeRO-3 the partitioned
    weights are gathered while they are read (by `EMAModel.step` itself, or by the copy)."""
    import contextlib

    params = list(parameters)
    zero3 = _zero3_enabled()
    if zero3:  # diffusers' EMAModel gathers with `deepspeed`, which it imports only if ZeRO-3 was on when
        # diffusers itself was imported (long before the accelerator here)
        import deepspeed
        import diffusers.training_utils

        diffusers.training_utils.deepspeed = deepspeed
    if ema.shadow_params and any(p.device != s.device for p, s in zip(params, ema.shadow_params)):
        gather = contextlib.nullcontext()
        if zero3:
            import deepspeed

            gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        with gather:
            params = [p.detach().to(s.device).requires_grad_(p.requires_grad)
                      for p, s in zip(params, ema.shadow_params)]
    ema.step(params)


def _zero3_enabled() -> bool:
    """Whether the active DeepSpeed config partitions the weights (ZeRO-3): the test diffusers' `EMAModel.step`
    makes itself (so the copy below gathers exactly when `EMAModel` does; `distributed.zero3` asks the
    accelerator the same of the trained models' plugin, which `prepare` leaves active)."""
    try:
        from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
    except ImportError:
        return False
    return is_deepspeed_zero3_enabled()


def make_optimizer(model: torch.nn.Module, section, lr: float | None = None, total_steps: int | None = None):
    """AdamW and its LR schedule from a training section (lr, betas, weight_decay, warmup_steps,
    lr_schedule); `lr` overrides the section's, `total_steps` (default `section.steps`) is where a
    cosine schedule reaches 0."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=section.lr if lr is None else lr, betas=tuple(section.betas),
                                  weight_decay=section.weight_decay)
    name = {"constant": "constant_with_warmup", "cosine": "cosine"}[section.lr_schedule]
    return optimizer, get_scheduler(name, optimizer, num_warmup_steps=section.warmup_steps,
                                    num_training_steps=total_steps or section.steps)


def replay_schedule(scheduler, steps: int) -> None:
    """Step an LR schedule `steps` times (after a resume)."""
    with warnings.catch_warnings():  # replaying the schedule, not stepping out of order
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(steps):
            scheduler.step()


def optimizer_step(accelerator: Accelerator, model, optimizer, scheduler, loss: torch.Tensor, lr_key: str,
                   grad_clip: float, step: int, also: tuple = ()):
    """One backward pass and (when gradients sync, i.e. at the end of an accumulation) one clipped
    optimiser and LR-schedule step. A NaN/inf loss stops the run with a one-line `NonFiniteLoss`
    naming the config key `lr_key` to lower. `also`: `(model, optimizer, scheduler, grad_clip)` of
    further models the same loss trains (a discriminator's head), each clipped and stepped on its own.
    Under DeepSpeed `model` is an engine, whose backward reaches the `also` models too; those are plain
    modules (`prepare(engine=False)`: an engine's backward handles only its own parameters), whose
    gradients are averaged over the processes here, as DDP would.

    Returns:
        the gradient norm before clipping, or None between accumulation steps.
    """
    if not torch.isfinite(loss):
        raise NonFiniteLoss(f"loss is {loss.item()} at step {step}; lower {lr_key} or check the data")
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # `accelerator.backward` drives only the first engine prepared; every engine steps itself
        # (clipping at its plugin's gradient_clipping, optimizer step, zero grad), as accelerate's wrapper does.
        model.set_gradient_accumulation_boundary(accelerator.sync_gradients)
        model.backward(loss)
        if not accelerator.sync_gradients:
            return None
        model.step()
        scheduler.step()
        norm = model.get_global_grad_norm()
        for m, opt, sched, clip in also:
            for p in m.parameters():
                if p.grad is not None:
                    p.grad = accelerator.reduce(p.grad, "mean")
            torch.nn.utils.clip_grad_norm_(m.parameters(), clip)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        return float("nan") if norm is None else float(norm)
    accelerator.backward(loss)
    grad_norm = None
    for i, (m, opt, sched, clip) in enumerate(((model, optimizer, scheduler, grad_clip), *also)):
        norm = accelerator.clip_grad_norm_(m.parameters(), clip) if accelerator.sync_gradients else None
        grad_norm = norm if i == 0 else grad_norm
        opt.step()
        if accelerator.sync_gradients:
            sched.step()
        opt.zero_grad(set_to_none=True)
    return grad_norm
