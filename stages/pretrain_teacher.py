"""Stage `pretrain_teacher`: a Diffusion-Forcing teacher trained with the flow-matching L2 loss.

    loss = Σ_f w_f · mean((v_θ(x_σ, σ, prompt) - (ε - x0))²)_f / Σ_f w_f,   x_σ = (1-σ)x0 + σε

with per-frame levels σ `[B, F]` and weights w drawn from the configured trajectory distribution
(`pipeline/trajectories.py`: df, tf or bid). With `model.prediction=x0` the same L2 is taken on x0
(`(x̂0 - x0)²`, the flow loss reweighted by σ² per frame). Run: `python -m stages.pretrain_teacher --config CONFIG [k=v ...]`.
"""

from __future__ import annotations

import shutil
import sys
import time
import warnings

import torch
from accelerate import Accelerator
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from safetensors.torch import save_file
from tqdm.auto import tqdm

from pipeline.causal_wan import build_transformer
from pipeline.checkpoint import latest_checkpoint, load_training_checkpoint, save_training_checkpoint
from pipeline.conditioning import drop_prompts
from pipeline.config import Config, to_yaml
from pipeline.data import build_source, class_table
from pipeline.flow import add_noise, flow_target
from pipeline.run_dir import StageDir
from pipeline.sampling import Denoiser
from pipeline.trajectories import TrajectoryDistribution
from stages.common import NonFiniteLoss, make_accelerator, preview, stage_main

STAGE = "pretrain_teacher"


def flow_matching_loss(denoiser: Denoiser, x0, context, sigma, weight, noise):
    """Weighted per-frame L2 in the space the network predicts (flow `ε - x0`, or x0; the two differ
    by a per-level weight `1/σ²`). x0/noise `[B, C, F, H, W]`, σ/weight `[B, F]` → scalar."""
    pred = denoiser.raw(add_noise(x0, noise, sigma), sigma, context)
    target = x0 if denoiser.prediction == "x0" else flow_target(x0, noise)
    per_frame = (pred.float() - target.float()).pow(2).mean(dim=(1, 3, 4))  # [B, F]
    return (per_frame * weight).sum() / weight.sum().clamp_min(1e-8)


def run(cfg: Config, force: bool = False) -> StageDir:
    tc = cfg.pretrain_teacher
    stage = StageDir(cfg.run.dir, STAGE)
    if stage.done and not force:
        done_steps = stage.manifest().get("metrics", {}).get("steps", 0)
        if done_steps >= tc.steps:
            print(f"[{STAGE}] done already: {stage.path} (use --force to rerun)")
            return stage
        print(f"[{STAGE}] done at {done_steps} steps; continuing to {tc.steps}")
    accelerator: Accelerator = make_accelerator(cfg, stage.path, grad_accum=tc.grad_accum)
    stage.begin(to_yaml(cfg), inputs={"pretrained": cfg.model.pretrained} if cfg.model.pretrained else None)
    torch.manual_seed(cfg.run.seed)

    model = build_transformer(cfg.model)
    ema = EMAModel(model.parameters(), decay=tc.ema_decay)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)
    scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=tc.warmup_steps)
    source = build_source(cfg, seed=cfg.run.seed)
    trajectories = TrajectoryDistribution(
        kind=tc.trajectory, frames_per_chunk=cfg.data.frames_per_chunk, per_chunk=tc.per_chunk,
        tf_prob=tc.tf_prob, bid_prob=tc.bid_prob, sigma_kind=tc.sigma_kind, sigma_mean=tc.sigma_mean,
        sigma_std=tc.sigma_std, sigma_shift=tc.sigma_shift)
    gen = torch.Generator().manual_seed(cfg.run.seed + 1)  # noise levels, noise, label dropout

    step = 0
    ckpt_root = stage.path / "checkpoints"
    if force:  # a rerun from scratch: stale checkpoints must not be resumed from later
        shutil.rmtree(ckpt_root, ignore_errors=True)
    last = latest_checkpoint(ckpt_root)
    if last is not None:
        step, extra, rng = load_training_checkpoint(last, model, ema, optimizer)
        source.load_state_dict(extra["data"])
        gen.set_state(rng["train"])
        with warnings.catch_warnings():  # replaying the schedule, not stepping out of order
            warnings.simplefilter("ignore", UserWarning)
            for _ in range(step):
                scheduler.step()
        accelerator.print(f"[{STAGE}] resuming from {last.name} (step {step})")

    model, optimizer = accelerator.prepare(model, optimizer)
    ema.to(accelerator.device)
    denoiser = Denoiser(model, tc.attention, cfg.data.frames_per_chunk, cfg.model.prediction)
    null = source.null_context(tc.batch_size).to(accelerator.device)
    accelerator.init_trackers("logs")

    bar = tqdm(total=tc.steps, initial=step, desc=STAGE, disable=not accelerator.is_main_process)
    t0, seen = time.time(), 0
    loss = None  # stays None when resuming a checkpoint of the final step (crash after it)
    elapsed0 = extra["elapsed_s"] if last is not None else 0.0
    while step < tc.steps:
        model.train()
        for _ in range(tc.grad_accum):
            with accelerator.accumulate(model):
                batch = source.next_batch(tc.batch_size, accelerator.device)
                context = drop_prompts(batch["context"], null, tc.label_dropout, gen)
                sigma, weight = trajectories.sample(tc.batch_size, batch["x0"].shape[2], gen)
                noise = torch.randn(batch["x0"].shape, generator=gen).to(accelerator.device)
                with accelerator.autocast():
                    loss = flow_matching_loss(denoiser, batch["x0"], context, sigma.to(accelerator.device),
                                              weight.to(accelerator.device), noise)
                if not torch.isfinite(loss):
                    raise NonFiniteLoss(f"loss is {loss.item()} at step {step}; lower pretrain_teacher.lr "
                                        "or check the data")
                accelerator.backward(loss)
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), tc.grad_clip) \
                    if accelerator.sync_gradients else None
                optimizer.step()
                scheduler.step() if accelerator.sync_gradients else None
                optimizer.zero_grad(set_to_none=True)
                seen += tc.batch_size
        ema.step(accelerator.unwrap_model(model).parameters())
        step += 1
        bar.update(1)
        if step % tc.log_every == 0 or step == tc.steps:
            rate = seen / (time.time() - t0)
            accelerator.log({"loss": loss.item(), "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0],
                             "samples_per_s": rate}, step=step)
            bar.set_postfix(loss=f"{loss.item():.4f}")
        if step % tc.checkpoint_every == 0 or step == tc.steps:
            if accelerator.is_main_process:
                save_training_checkpoint(ckpt_root, step, accelerator.unwrap_model(model), ema, optimizer,
                                         extra={"data": source.state_dict(), "elapsed_s": elapsed0 + time.time() - t0,
                                                "loss": loss.item()},
                                         rng={"train": gen.get_state()}, keep=tc.keep_checkpoints)
    bar.close()

    outputs = {}
    if accelerator.is_main_process:
        raw = accelerator.unwrap_model(model)
        # Recorded in config.json so a bare diffusers folder still says what the network outputs.
        raw.register_to_config(prediction=cfg.model.prediction)
        raw.save_pretrained(stage.path / "transformer")
        ema.store(raw.parameters())
        ema.copy_to(raw.parameters())
        raw.save_pretrained(stage.path / "transformer_ema")
        if cfg.data.kind == "sprites":
            save_file({"class_table": class_table(cfg).contiguous()}, str(stage.path / "conditioning.safetensors"))
            outputs["preview"] = str(preview(cfg, raw, stage.path / "preview.gif", tc.attention, tc.sampler,
                                             n=tc.preview_n))
        ema.restore(raw.parameters())
        outputs.update(transformer=str(stage.path / "transformer"), transformer_ema=str(stage.path / "transformer_ema"))
    accelerator.end_training()
    final_loss = loss.item() if loss is not None else extra.get("loss")
    stage.finish(outputs, {"final_loss": final_loss, "steps": step})
    return stage


def main(argv=None):
    return stage_main(STAGE, run, argv)


if __name__ == "__main__":
    sys.exit(main())
