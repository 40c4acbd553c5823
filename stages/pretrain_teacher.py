"""Stage `pretrain_teacher`: a Diffusion-Forcing teacher trained with the flow-matching L2 loss.

    loss = Σ_f w_f · mean((v_θ(x_σ, σ, prompt) - (ε - x0))²)_f / Σ_f w_f,   x_σ = (1-σ)x0 + σε

(`pipeline/diffusion/losses.py: flow_matching_loss`) with per-frame levels σ `[B, F]` and weights w drawn from the configured trajectory distribution
(`pipeline/diffusion/trajectories.py`: df, tf or bid). With `model.prediction=x0` the same L2 is taken on x0
(`(x̂0 - x0)²`, the flow loss reweighted by σ² per frame). Run: `python -m stages.pretrain_teacher --config CONFIG [k=v ...]`.
"""

from __future__ import annotations

import sys
import time

import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from pipeline.data import shard
from pipeline.models.causal_wan import build_transformer
from pipeline.training.checkpoint import save_training_checkpoint
from pipeline.models.conditioning import drop_prompts
from pipeline.config import Config, ConfigError, to_yaml
from pipeline.data.sources import build_source
from pipeline.training.faults import maybe_kill
from pipeline.diffusion.losses import flow_matching_loss
from pipeline.io.run_dir import StageDir
from pipeline.diffusion.sampling import Denoiser
from pipeline.diffusion.trajectories import TrajectoryDistribution
from pipeline.cli import stage_main
from pipeline.diffusion.videos import preview
from pipeline.models.loading import save_weights
from pipeline.training.distributed import check_replicas, full_optimizer_state, global_norm, local_batch, make_accelerator, prepare, restore_optimizer_state, shared_generator
from pipeline.training.optim import ema_step, make_optimizer, optimizer_step, place_ema, trainable
from pipeline.training.resume import data_inputs, finished_already, resume

STAGE = "pretrain_teacher"


def run(cfg: Config, force: bool = False) -> StageDir:
    tc = cfg.pretrain_teacher
    if cfg.data.kind == "prompts":
        raise ConfigError("pretrain_teacher needs videos: data.kind=prompts has none; use data.kind=latents")
    stage = StageDir(cfg.run.dir, STAGE)
    stage.guard({"model.pretrained": cfg.model.pretrained, **data_inputs(cfg)}, force)
    if finished_already(stage, tc, force):
        return stage
    accelerator: Accelerator = make_accelerator(cfg, stage.path, grad_accum=tc.grad_accum, batch_size=tc.batch_size,
                                                models={"model": tc.grad_clip})
    torch.manual_seed(cfg.run.seed)  # the same initial weights on every process

    model = trainable(build_transformer(cfg.model), tc)
    ema = EMAModel(model.parameters(), decay=tc.ema_decay)
    optimizer, scheduler = make_optimizer(model, tc)
    source = build_source(cfg, seed=cfg.run.seed)
    trajectories = TrajectoryDistribution(
        kind=tc.trajectory, frames_per_chunk=cfg.data.frames_per_chunk, per_chunk=tc.per_chunk,
        tf_prob=tc.tf_prob, bid_prob=tc.bid_prob, sigma_kind=tc.sigma_kind, sigma_mean=tc.sigma_mean,
        sigma_std=tc.sigma_std, sigma_shift=tc.sigma_shift)
    gen = shared_generator(accelerator, cfg.run.seed + 1)  # noise levels, noise, label dropout

    ckpt_root = stage.path / "checkpoints"
    step, extra, rng = resume(ckpt_root, model, ema, optimizer, scheduler, force, accelerator)
    if step:
        source.load_state_dict(extra["data"])
        gen.set_state(rng["train"])
    if accelerator.is_main_process:  # after the checkpoint was read: a failed resume writes nothing
        stage.begin(to_yaml(cfg), inputs={"pretrained": cfg.model.pretrained} if cfg.model.pretrained else None,
                    force=force)

    loaded = optimizer.state_dict()  # DeepSpeed re-creates the optimizer state
    model, optimizer = prepare(accelerator, "model", model, optimizer)
    if step:
        restore_optimizer_state(accelerator, model, loaded)
    place_ema(ema, tc, accelerator.device)
    denoiser = Denoiser(model, tc.attention, cfg.data.frames_per_chunk, cfg.model.prediction)
    null = source.null_context(tc.batch_size).to(accelerator.device)
    accelerator.init_trackers("logs")

    # the bar is closed on errors too, so that an error message starts its own line
    with tqdm(total=tc.steps, initial=step, desc=STAGE, disable=not accelerator.is_main_process) as bar:
        t0, seen = time.time(), 0
        loss = None  # stays None when resuming a checkpoint of the final step (crash after it)
        elapsed0 = extra.get("elapsed_s", 0.0)
        while step < tc.steps:
            model.train()
            for _ in range(tc.grad_accum):
                with accelerator.accumulate(model):
                    batch = local_batch(source, tc.batch_size, gen, accelerator.device)
                    context = drop_prompts(batch["context"], null, tc.label_dropout, gen)
                    sigma, weight = trajectories.sample(tc.batch_size, batch["x0"].shape[2], gen)
                    noise = shard.randn(batch["x0"].shape, gen).to(accelerator.device)
                    with accelerator.autocast():
                        weight = weight.to(accelerator.device)
                        loss = flow_matching_loss(denoiser, batch["x0"], context, sigma.to(accelerator.device), weight,
                                                  noise, global_norm(accelerator, weight))
                    grad_norm = optimizer_step(accelerator, model, optimizer, scheduler, loss, f"{STAGE}.lr",
                                               tc.grad_clip, step)
                    seen += tc.batch_size * accelerator.num_processes
            ema_step(ema, accelerator.unwrap_model(model).parameters())
            step += 1
            maybe_kill("step", step)
            bar.update(1)
            if step % tc.log_every == 0 or step == tc.steps:
                rate = seen / (time.time() - t0)
                loss = accelerator.reduce(loss.detach(), "mean")  # the global batch's loss
                accelerator.log({"loss": loss.item(), "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0],
                                 "samples_per_s": rate}, step=step)
                bar.set_postfix(loss=f"{loss.item():.4f}")
            if step % tc.checkpoint_every == 0 or step == tc.steps:
                opt_state = full_optimizer_state(accelerator, model, optimizer)
                if accelerator.is_main_process:
                    save_training_checkpoint(ckpt_root, step, accelerator.unwrap_model(model), ema, opt_state,
                                             extra={"data": source.state_dict(), "loss": loss.item(),
                                                    "elapsed_s": elapsed0 + time.time() - t0},
                                             rng={"train": gen.get_state()}, keep=tc.keep_checkpoints)
    replicas = check_replicas(accelerator, model=model)

    outputs = {}
    if accelerator.is_main_process:
        raw = accelerator.unwrap_model(model)
        outputs.update(save_weights(stage.path, raw, ema, cfg, prediction=cfg.model.prediction))  # raw now holds EMA
        if cfg.data.kind == "sprites":
            outputs["preview"] = str(preview(cfg, raw, stage.path / "preview.gif", tc.attention, tc.sampler,
                                             n=tc.preview_n))
        ema.restore(raw.parameters())
    accelerator.end_training()
    final_loss = loss.item() if loss is not None else extra.get("loss")
    if accelerator.is_main_process:
        stage.finish(outputs, {"final_loss": final_loss, "steps": step, "processes": accelerator.num_processes,
                               "replicas_identical": replicas})
    return stage


def main(argv=None):
    return stage_main(STAGE, run, argv)


if __name__ == "__main__":
    sys.exit(main())
