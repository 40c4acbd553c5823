"""Stage `distill`: DMD distillation of the few-step student (`pipeline/methods/dmd.py` has the equations).

Three models: the generator (the `init_student` student, trained), the real score (the teacher,
frozen, guided by `distill.real_guidance`) and the fake score (a critic initialised from the teacher,
trained on the generator's samples). Every step updates the critic by its denoising loss; every
`critic_steps_per_generator_step`-th step first updates the generator by the DMD loss

    g = (x̂0_fake - x̂0_real) / mean|x - x̂0_real|,    loss = 0.5·‖x - stopgrad(x - g)‖²

on samples x from a Self-Forcing rollout (`distill.method=sf_dmd`) or from noised clean videos
(`df_dmd`, CausVid's approximation). Run: `python -m stages.distill --config CONFIG [k=v ...]`.
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from pipeline.training.checkpoint import save_training_checkpoint
from pipeline.config import Config, to_yaml
from pipeline.data.sources import build_source, latent_shape
from pipeline.methods.dmd import DFDMD, SelfForcingDMD
from pipeline.training.faults import maybe_kill
from pipeline.data.ode_pairs import OdePairs
from pipeline.io.run_dir import StageDir
from pipeline.diffusion.sampling import Denoiser, few_step_sigmas
from pipeline.data.shard import ShardedGenerator
from pipeline.cli import stage_main
from pipeline.diffusion.videos import preview
from pipeline.models.loading import load_source, save_model, save_weights, student_config
from pipeline.training.distributed import check_replicas, full_optimizer_state, local_batch, make_accelerator, mixed_precision, prepare, restore_optimizer_state, shared_generator
from pipeline.training.optim import ema_step, hold_frozen, make_optimizer, optimizer_step, place_ema, replay_schedule, trainable
from pipeline.training.resume import data_inputs, finished_already, resume

STAGE = "distill"


def sources(cfg: Config) -> tuple[Path, Path]:
    """The student to start from and the teacher (real score, critic start)."""
    run = Path(cfg.run.dir)
    return (Path(cfg.distill.student or run / "init_student"), Path(cfg.distill.teacher or run / "pretrain_teacher"))


def stage_input(path: Path) -> Path:
    return path / "transformer_ema" if (path / "manifest.json").is_file() else path


def generator_updates(step: int, ratio: int) -> int:
    """Generator updates within the first `step` steps (it updates at steps 0, ratio, 2·ratio, ...)."""
    return (step + ratio - 1) // ratio


class Batches:
    """Prompts (and clean videos for df_dmd) per step, from the data source or init_student's ODE pairs."""

    def __init__(self, cfg: Config, student_path: Path, gen: ShardedGenerator, device):
        dc = cfg.distill
        self.source = build_source(cfg, seed=cfg.run.seed + 3)
        self.pairs = None
        if dc.method == "df_dmd" and dc.clean_source == "ode_pairs":
            folder = student_path / "ode_pairs"
            if not folder.is_dir():
                raise FileNotFoundError(f"distill.clean_source=ode_pairs: no ODE pairs in {folder}")
            self.pairs = OdePairs(folder)
        self.gen, self.device, self.n = gen, device, dc.batch_size
        self.shape = latent_shape(cfg)
        self.null = self.source.null_context(self.n).to(device)

    def next(self) -> dict:
        if self.pairs is not None:
            b = self.pairs.next_batch(self.n, self.gen, self.device)
            batch = {"x0": b["states"][:, -1], "context": b["context"]}
        else:
            batch = local_batch(self.source, self.n, self.gen, self.device)
        if "x0" in batch:
            self.shape = tuple(batch["x0"].shape[1:])
        return {**batch, "null": self.null, "shape": self.shape}


def run(cfg: Config, force: bool = False) -> StageDir:
    dc = cfg.distill
    stage = StageDir(cfg.run.dir, STAGE)
    student_path, teacher_path = sources(cfg)
    stage.guard({"distill.student": student_path, "distill.teacher": teacher_path, **data_inputs(cfg)}, force)
    if finished_already(stage, dc, force):
        return stage
    generator, _, student_cfg = load_source(student_path)  # EMA weights of init_student
    teacher, _, teacher_cfg = load_source(teacher_path)
    critic = copy.deepcopy(teacher)  # the fake score starts as the real one
    prediction = student_cfg.model.prediction
    accelerator: Accelerator = make_accelerator(cfg, stage.path, grad_accum=dc.grad_accum, batch_size=dc.batch_size,
                                                models={"generator": dc.grad_clip, "critic": dc.critic_grad_clip,
                                                        "teacher": None})
    torch.manual_seed(cfg.run.seed)

    # With dc.gradient_checkpointing every trained pass recomputes its blocks: the generator's (sf_dmd: a
    # chunk's exit step, the only call with gradients) and the critic's (the whole clip).
    trainable(generator, dc)
    trainable(critic, dc)
    # the real score: bf16 matmul weights when the run computes in bf16 (a DeepSpeed engine casts it itself)
    hold_frozen(teacher, "no" if accelerator.distributed_type == DistributedType.DEEPSPEED else mixed_precision(cfg))
    ema = EMAModel(generator.parameters(), decay=dc.ema_decay, update_after_step=dc.ema_start)
    gen_opt, gen_sched = make_optimizer(generator, dc,
                                        total_steps=generator_updates(dc.steps, dc.critic_steps_per_generator_step))
    critic_opt, critic_sched = make_optimizer(critic, dc, lr=dc.critic_lr)
    gen = shared_generator(accelerator, cfg.run.seed + 4)  # rollout noise, exit steps, DMD levels
    batches = Batches(cfg, student_path, gen, accelerator.device)

    ckpt_root = stage.path / "checkpoints"
    step, extra, rng = resume(ckpt_root, generator, ema, gen_opt, None, force, accelerator,
                              others={"critic": (critic, critic_opt)})
    if accelerator.is_main_process:  # after the checkpoint was read: a failed resume writes nothing
        stage.begin(to_yaml(cfg), inputs={"student": stage_input(student_path), "teacher": stage_input(teacher_path)},
                    force=force)
    ratio = dc.critic_steps_per_generator_step
    replay_schedule(gen_sched, generator_updates(step, ratio))
    replay_schedule(critic_sched, step)
    if step:
        gen.set_state(rng["train"])
        batches.source.load_state_dict(extra["data"])

    loaded = gen_opt.state_dict(), critic_opt.state_dict()  # DeepSpeed re-creates the optimizer state
    generator, gen_opt = prepare(accelerator, "generator", generator, gen_opt)
    critic, critic_opt = prepare(accelerator, "critic", critic, critic_opt)
    teacher = prepare(accelerator, "teacher", teacher)
    if step:
        restore_optimizer_state(accelerator, generator, loaded[0])
        restore_optimizer_state(accelerator, critic, loaded[1])
    place_ema(ema, dc, accelerator.device)
    fpc, st = cfg.data.frames_per_chunk, cfg.student
    teacher_attention = teacher_cfg.pretrain_teacher.attention
    common = dict(generator=Denoiser(generator, "block_causal", fpc, prediction, st.clip_x0, rope=st.rope),
                  real=Denoiser(teacher, teacher_attention, fpc, teacher_cfg.model.prediction),
                  fake=Denoiser(critic, teacher_attention, fpc, teacher_cfg.model.prediction),
                  sigmas=few_step_sigmas(st.denoising_steps, st.shift), real_guidance=dc.real_guidance,
                  fake_guidance=dc.fake_guidance, per_frame=dc.timestep_sampling == "per_frame",
                  sigma_min=dc.sigma_min, sigma_max=dc.sigma_max, sigma_shift=dc.sigma_shift)
    if dc.method == "sf_dmd":
        method = SelfForcingDMD(**common, context_sigma=st.context_sigma, max_context_frames=st.max_context_frames,
                                sink_frames=st.sink_frames, per_chunk_exit=dc.exit_step == "per_chunk")
    else:
        method = DFDMD(**common)
    accelerator.init_trackers("logs")

    # the bar is closed on errors too, so that an error message starts its own line
    with tqdm(total=dc.steps, initial=step, desc=f"{STAGE} ({dc.method})",
              disable=not accelerator.is_main_process) as bar:
        t0, elapsed0 = time.time(), extra.get("elapsed_s", 0.0)
        g_loss = c_loss = None
        logs: dict = {}
        def update(model, optimizer, scheduler, loss_fn, lr_key: str, grad_clip: float, reuse=None):
            """One optimiser step of `model` on `loss_fn(batch, gen[, samples]) -> (loss, stats)`, over `grad_accum`
            batches (`reuse`: the `(batch, samples)` pairs to take instead of new batches).

            Returns:
                (loss, stats, grad norm, the `(batch, stats["samples"])` pairs seen).
            """
            seen = []
            for i in range(dc.grad_accum):
                batch, extra_args = (reuse[i][0], reuse[i][1:]) if reuse else (batches.next(), ())
                with accelerator.accumulate(model):
                    with accelerator.autocast():
                        loss, stats = loss_fn(batch, gen, *extra_args)
                    norm = optimizer_step(accelerator, model, optimizer, scheduler, loss, lr_key, grad_clip, step)
                seen.append((batch, stats.pop("samples", None)))
            return loss, stats, norm, seen

        while step < dc.steps:
            reuse = None
            if step % ratio == 0:  # generator update (DMD), Self-Forcing's order: before the critic's
                g_loss, g_stats, grad_norm, seen = update(generator, gen_opt, gen_sched, method.generator_loss,
                                                          f"{STAGE}.lr", dc.grad_clip)
                reuse = seen if dc.critic_samples == "generator" else None
                ema_step(ema, accelerator.unwrap_model(generator).parameters())
                sigma = g_stats.pop("dmd_sigma")
                g_loss = accelerator.reduce(g_loss.detach(), "mean")  # over the global batch
                logs.update(generator_loss=g_loss.item(), generator_grad_norm=float(grad_norm), **g_stats,
                            dmd_sigma_mean=sigma.mean().item(), dmd_sigma_frame_std=sigma.std(dim=1).mean().item())
                if accelerator.is_main_process and (step // ratio) % dc.log_every == 0:  # the levels drawn, whole
                    accelerator.get_tracker("tensorboard", unwrap=True).add_histogram("dmd_sigma", sigma, step)
            c_loss, _, c_norm, _ = update(critic, critic_opt, critic_sched, method.critic_loss, f"{STAGE}.critic_lr",
                                          dc.critic_grad_clip, reuse)
            step += 1
            maybe_kill("step", step)
            bar.update(1)
            if step % dc.log_every == 0 or step == dc.steps:
                c_loss = accelerator.reduce(c_loss.detach(), "mean")
                logs.update(critic_loss=c_loss.item(), critic_grad_norm=float(c_norm))
                accelerator.log(logs, step=step)
                bar.set_postfix(gen=f"{logs.get('generator_loss', float('nan')):.4f}", critic=f"{c_loss.item():.4f}")
            if step % dc.checkpoint_every == 0 or step == dc.steps:
                opt_states = [full_optimizer_state(accelerator, m, o)  # every process: a collective under DeepSpeed
                              for m, o in ((generator, gen_opt), (critic, critic_opt))]
                if accelerator.is_main_process:
                    save_training_checkpoint(
                        ckpt_root, step, accelerator.unwrap_model(generator), ema, opt_states[0],
                        extra={"data": batches.source.state_dict(), "elapsed_s": elapsed0 + time.time() - t0,
                               "critic_loss": c_loss.item()},
                        rng={"train": gen.get_state()}, keep=dc.keep_checkpoints,
                        others={"critic": (accelerator.unwrap_model(critic), opt_states[1])})
    replicas = check_replicas(accelerator, generator=generator, critic=critic)

    outputs = {}
    if accelerator.is_main_process:
        raw_critic = accelerator.unwrap_model(critic)
        save_model(raw_critic, stage.path / "critic")
        outputs["critic"] = str(stage.path / "critic")
        raw = accelerator.unwrap_model(generator)
        raw.disable_gradient_checkpointing()
        outputs.update(save_weights(stage.path, raw, ema, cfg, prediction=prediction,
                                    **student_config(cfg)))  # raw now holds the EMA weights
        if cfg.data.kind == "sprites":
            outputs["preview"] = str(preview(cfg, raw, stage.path / "preview.gif", n=dc.preview_n))
        ema.restore(raw.parameters())
    accelerator.end_training()
    metrics = {"steps": step, "generator_updates": generator_updates(step, ratio), "method": dc.method,
               "processes": accelerator.num_processes, "replicas_identical": replicas,
               "final_critic_loss": c_loss.item() if c_loss is not None else extra.get("critic_loss"),
               "final_generator_loss": g_loss.item() if g_loss is not None else None}
    if accelerator.is_main_process:
        stage.finish(outputs, metrics)
    return stage


def main(argv=None):
    return stage_main(STAGE, run, argv)


if __name__ == "__main__":
    sys.exit(main())
