"""Stage `init_student`: the causal few-step student, initialised as CausVid does.

1. The student is the teacher's backbone (block-causal, `data.frames_per_chunk`) starting from the
   teacher's EMA weights.
2. ODE pairs: the teacher samples videos from noise with its many-step sampler (`pretrain_teacher.sampler`,
   guidance included) on a path through the student's levels `student.denoising_steps` (warped by
   `student.shift`); the states there and the clean end point go to `ode_pairs/shard_*.safetensors`
   (`pipeline/data/ode_pairs.py`; resumable shard by shard).
3. Regression (`pipeline/diffusion/losses.py: ode_regression_loss`): per chunk a random entry of the stored path,
   loss `mean((G_θ(x_σk, σk) - x0)²)` over the noisy chunks (clean ones are context only).

Run: `python -m stages.init_student --config CONFIG [k=v ...]`.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from pipeline.training.checkpoint import save_training_checkpoint
from pipeline.config import Config, to_yaml
from pipeline.data.sources import build_source, latent_shape
from pipeline.training.faults import maybe_kill
from pipeline.diffusion.losses import ode_regression_loss, pick_ode_states
from pipeline.data.ode_pairs import OdePairs, write_ode_pairs
from pipeline.io.run_dir import StageDir
from pipeline.diffusion.sampling import Denoiser, few_step_sigmas
from pipeline.data.sprites import NULL_CLASS
from pipeline.cli import stage_main
from pipeline.diffusion.videos import preview
from pipeline.models.loading import load_source, save_weights, student_config
from pipeline.training.distributed import check_replicas, full_optimizer_state, global_norm, make_accelerator, prepare, restore_optimizer_state, shared_generator
from pipeline.training.optim import ema_step, make_optimizer, optimizer_step, place_ema, trainable
from pipeline.training.resume import data_inputs, finished_already, remove_own, resume

STAGE = "init_student"


def teacher_path(cfg: Config) -> Path:
    return Path(cfg.init_student.teacher or Path(cfg.run.dir) / "pretrain_teacher")


def pair_conditions(cfg: Config, table: torch.Tensor | None):
    """The prompts of ODE pairs: classes in turn for sprites, the shards' prompt embeddings for latents and
    prompts (a `PromptSource` reads its rows from disk)."""
    if cfg.data.kind == "sprites":
        def conditions(start, n):
            labels = torch.arange(start, start + n) % cfg.data.num_classes
            return table[labels], labels
        return conditions, table[NULL_CLASS][None]
    source = build_source(cfg, seed=cfg.run.seed)

    def conditions(start, n):
        idx = torch.arange(start, start + n) % len(source.embeds)
        return source.embeds[idx].float(), torch.full((n,), -1, dtype=torch.long)
    return conditions, source.null_context(1)


def make_pairs(cfg: Config, stage: StageDir, teacher, table, prediction: str, accelerator: Accelerator) -> Path:
    """Sample (or finish sampling) the teacher's ODE pairs into `<stage>/ode_pairs/`, the shards shared out
    over the processes."""
    device = accelerator.device
    ic, tc = cfg.init_student, cfg.pretrain_teacher
    folder = stage.path / "ode_pairs"
    denoiser = Denoiser(teacher.to(device).eval(), tc.attention, cfg.data.frames_per_chunk, prediction,
                        tc.sampler.clip_x0, rope=tc.sampler.rope, kv_cache=tc.sampler.kv_cache)
    conditions, uncond = pair_conditions(cfg, table)
    write_ode_pairs(folder, denoiser, conditions, uncond if tc.sampler.guidance != 1.0 else None, ic.ode_pairs,
                    ic.ode_shard_size, latent_shape(cfg), few_step_sigmas(cfg.student.denoising_steps, cfg.student.shift),
                    tc.sampler, seed=cfg.run.seed, device=device, rank=accelerator.process_index,
                    world=accelerator.num_processes, batch_size=ic.ode_batch_size)
    accelerator.wait_for_everyone()  # every process trains on all shards
    return folder


def run(cfg: Config, force: bool = False) -> StageDir:
    ic = cfg.init_student
    stage = StageDir(cfg.run.dir, STAGE)
    source = teacher_path(cfg)
    stage.guard({"init_student.teacher": source, **data_inputs(cfg)}, force)
    if finished_already(stage, ic, force):
        return stage
    teacher, table, teacher_cfg = load_source(source)  # EMA weights
    prediction = teacher_cfg.model.prediction  # the student predicts what the teacher does
    accelerator: Accelerator = make_accelerator(cfg, stage.path, grad_accum=ic.grad_accum, batch_size=ic.batch_size,
                                                models={"model": ic.grad_clip})
    if accelerator.is_main_process:
        stage.begin(to_yaml(cfg), inputs={"teacher": source / "transformer_ema" if (source / "manifest.json").is_file()
                                      else source}, force=force)
    torch.manual_seed(cfg.run.seed)
    if force and accelerator.is_main_process:  # pairs belong to the run being redone
        remove_own(stage.path / "ode_pairs", ("shard_*.safetensors", ".tmp_shard_*"))
    accelerator.wait_for_everyone()

    with torch.no_grad():
        folder = make_pairs(cfg, stage, teacher, table, prediction, accelerator)
    pairs = OdePairs(folder)

    model = trainable(teacher, ic)  # the student starts as the teacher's EMA weights (no separate frozen copy)
    ema = EMAModel(model.parameters(), decay=ic.ema_decay)
    optimizer, scheduler = make_optimizer(model, ic)
    gen = shared_generator(accelerator, cfg.run.seed + 2)  # pair draws and step indices
    ckpt_root = stage.path / "checkpoints"
    step, extra, rng = resume(ckpt_root, model, ema, optimizer, scheduler, force, accelerator)
    if step:
        gen.set_state(rng["train"])

    loaded = optimizer.state_dict()  # DeepSpeed re-creates the optimizer state
    model, optimizer = prepare(accelerator, "model", model, optimizer)
    if step:
        restore_optimizer_state(accelerator, model, loaded)
    place_ema(ema, ic, accelerator.device)
    student = Denoiser(model, "block_causal", cfg.data.frames_per_chunk, prediction)
    accelerator.init_trackers("logs")

    # the bar is closed on errors too, so that an error message starts its own line
    with tqdm(total=ic.steps, initial=step, desc=STAGE, disable=not accelerator.is_main_process) as bar:
        t0, seen = time.time(), 0
        loss = None
        elapsed0 = extra.get("elapsed_s", 0.0)
        while step < ic.steps:
            model.train()
            for _ in range(ic.grad_accum):
                with accelerator.accumulate(model):
                    batch = pairs.next_batch(ic.batch_size, gen, accelerator.device)
                    x, sigma = pick_ode_states(batch["states"], pairs.sigmas, cfg.data.frames_per_chunk, gen)
                    with accelerator.autocast():
                        loss = ode_regression_loss(student, x, sigma, batch["context"], batch["states"][:, -1],
                                                   global_norm(accelerator, (sigma > 0).float()))
                    grad_norm = optimizer_step(accelerator, model, optimizer, scheduler, loss, f"{STAGE}.lr",
                                               ic.grad_clip, step)
                    seen += ic.batch_size * accelerator.num_processes
            ema_step(ema, accelerator.unwrap_model(model).parameters())
            step += 1
            maybe_kill("step", step)
            bar.update(1)
            if step % ic.log_every == 0 or step == ic.steps:
                loss = accelerator.reduce(loss.detach(), "mean")  # the global batch's loss
                accelerator.log({"loss": loss.item(), "grad_norm": float(grad_norm), "lr": scheduler.get_last_lr()[0],
                                 "samples_per_s": seen / (time.time() - t0)}, step=step)
                bar.set_postfix(loss=f"{loss.item():.4f}")
            if step % ic.checkpoint_every == 0 or step == ic.steps:
                opt_state = full_optimizer_state(accelerator, model, optimizer)  # every process (DeepSpeed gathers)
                if accelerator.is_main_process:
                    save_training_checkpoint(ckpt_root, step, accelerator.unwrap_model(model), ema, opt_state,
                                             extra={"elapsed_s": elapsed0 + time.time() - t0, "loss": loss.item()},
                                             rng={"train": gen.get_state()}, keep=ic.keep_checkpoints)
    replicas = check_replicas(accelerator, model=model)

    outputs = {"ode_pairs": str(folder)}
    if accelerator.is_main_process:
        raw = accelerator.unwrap_model(model)
        outputs.update(save_weights(stage.path, raw, ema, cfg, prediction=prediction,
                                    **student_config(cfg)))  # raw now holds the EMA weights
        if cfg.data.kind == "sprites":
            outputs["preview"] = str(preview(cfg, raw, stage.path / "preview.gif", n=ic.preview_n))
        ema.restore(raw.parameters())
    accelerator.end_training()
    final_loss = loss.item() if loss is not None else extra.get("loss")
    if accelerator.is_main_process:
        stage.finish(outputs, {"final_loss": final_loss, "steps": step, "ode_pairs": len(pairs),
                               "processes": accelerator.num_processes, "replicas_identical": replicas})
    return stage


def main(argv=None):
    return stage_main(STAGE, run, argv)


if __name__ == "__main__":
    sys.exit(main())
