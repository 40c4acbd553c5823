"""DMD distillation of the few-step student as training methods (the equations: `pipeline/methods/dmd.py`).

Three models: the generator (the `init_student` student, trained), the real score (the teacher, frozen,
guided by `distill.real_guidance`) and the fake score (a critic, trained on the generator's samples,
initialised from `distill.critic`, default the teacher). Each comes from its own source with its own
attention (`pipeline/models/roles.py`): Self-Forcing's recipe distils with a bidirectional 14B real score
and a bidirectional 1.3B fake score. Every step updates the critic by its denoising loss; every
`critic_steps_per_generator_step`-th step first updates the generator by the DMD loss, on samples from a
Self-Forcing rollout (`SelfForcing`, `distill.method=sf_dmd`) or from noised clean videos (`CausVid`,
`df_dmd`, CausVid's approximation).
"""

from __future__ import annotations

import copy
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

from accelerate import cpu_offload
from accelerate.utils import DistributedType
from diffusers.training_utils import EMAModel

from pipeline.io.run_dir import is_stage_folder
from pipeline.config import Config, ConfigError
from pipeline.data.ode_pairs import OdePairs
from pipeline.data.shard import ShardedGenerator
from pipeline.data.sources import build_source, latent_shape
from pipeline.diffusion.sampling import Denoiser, few_step_sigmas
from pipeline.diffusion.videos import preview
from pipeline.methods.base import Method, Trained, register
from pipeline.methods.dmd import DFDMD, DMD, SelfForcingDMD
from pipeline.methods.gan import GAN, Discriminator
from pipeline.methods.ode_regression import stage_input
from pipeline.models.discriminator import FrameDiscriminatorHead
from pipeline.models.loading import load_source, student_config
from pipeline.models.roles import Role, check_compatible, load_role
from pipeline.models.sampling_meta import attach, sampling_record
from pipeline.training.distributed import local_batch, shared_generator, zero3
from pipeline.training.optim import averaged, hold_frozen, make_optimizer, trainable
from pipeline.training.stage_io import data_inputs


def sources(cfg: Config) -> tuple[Path, Path, Path | None]:
    """The student to start from, the teacher (real score) and the critic's start (None: the teacher)."""
    run, dc = Path(cfg.run.dir), cfg.distill
    return (Path(dc.student or run / "init_student"), Path(dc.teacher or run / "pretrain_teacher"),
            Path(dc.critic) if dc.critic else None)


def generator_updates(step: int, ratio: int, warmup: int = 0) -> int:
    """Generator updates within the first `step` steps (it updates at steps 0, ratio, 2·ratio, ..., those from
    `warmup` on)."""
    return (step + ratio - 1) // ratio - (min(warmup, step) + ratio - 1) // ratio


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


class DMDMethod(Method):
    """Generator (DMD loss) and critic (denoising loss) in alternation; the subclass says where the
    generator's samples come from (`losses`)."""

    stage = "distill"

    def __init__(self, *, cfg, section=None):
        super().__init__(cfg=cfg, section=section or cfg.distill)
        self.student_path, self.teacher_path, self.critic_path = sources(cfg)
        self.ratio = self.section.critic_steps_per_generator_step
        self.desc = f"{self.stage} ({self.section.method})"
        self.gan_only = self.section.method == "sf_gan"  # no DMD: the real score is only the critic's start
        self.gan_on = gan_on(self.section)

    def inputs(self) -> dict:
        return {"distill.student": self.student_path, "distill.teacher": self.teacher_path,
                "distill.critic": self.critic_path, **data_inputs(self.cfg)}

    def recorded_inputs(self) -> dict:
        critic = {"critic": stage_input(self.critic_path)} if self.critic_path else {}
        return {"student": stage_input(self.student_path), "teacher": stage_input(self.teacher_path), **critic}

    def harmless_settings(self) -> tuple[str, ...]:  # where the real score's weights wait: same results
        return ("distill.teacher_offload",)

    def fingerprint_sections(self) -> list[str]:  # the models come from the student and teacher folders
        return ["run.seed", "run.mixed_precision", "data", "student"]

    def engines(self) -> dict:
        dc = self.section
        frozen = {} if dc.teacher_offload or self.gan_only else {"teacher": None}  # an offloaded real score: no engine
        return {"generator": dc.grad_clip, "critic": dc.critic_grad_clip, **frozen}  # the GAN's head: no engine

    def load(self) -> None:
        dc = self.section
        stage = is_stage_folder(self.student_path)  # init_student's EMA weights, by default
        self.generator, _, student_cfg = load_source(self.student_path, model_config=None if stage else dc.student_config)
        self.real = load_role("real score", self.teacher_path, configured=dc.teacher_attention,
                              key="distill.teacher_attention", run=self.cfg,
                              model_config=dc.teacher_config)
        if self.critic_path is None:  # the fake score starts as the real one (sf_gan keeps no real score: no copy)
            self.fake = replace(self.real, name="fake score", attention=dc.critic_attention or self.real.attention,
                                model=self.real.model if self.gan_only else copy.deepcopy(self.real.model))
        else:
            self.fake = load_role("fake score", self.critic_path, configured=dc.critic_attention,
                                  key="distill.critic_attention", run=self.cfg,
                                  model_config=dc.critic_config)
        student = Role("student", self.student_path, self.generator, None, student_cfg, "block_causal",
                       student_cfg.model.prediction)
        check_compatible(student, self.real, self.fake)
        self.teacher, self.critic = self.real.model, self.fake.model
        # the saved critic/ says how it attends (a fake score is a teacher-like model)
        attach(self.critic, sampling_record(self.fake.prediction, attention=self.fake.attention))
        self.prediction = student_cfg.model.prediction

    def build(self, accelerator) -> None:
        dc = self.section
        # With dc.gradient_checkpointing every trained pass recomputes its blocks: the generator's (sf_dmd: a
        # chunk's exit step, the only call with gradients) and the critic's (the whole clip).
        trainable(self.generator, dc, name="generator")
        trainable(self.critic, dc, lora=dc.lora.critic, name="critic")
        deepspeed = accelerator.distributed_type == DistributedType.DEEPSPEED
        if self.gan_only:  # the GAN needs no real score: only the critic (the discriminator's backbone) started as it
            self.teacher = None
        else:  # bf16 matmul weights when the run computes in bf16 (a DeepSpeed ZeRO-3 engine partitions it in fp32)
            hold_frozen(self.teacher, "no" if deepspeed and not dc.teacher_offload else self.precision)
        if dc.teacher_offload and self.teacher is not None:  # in CPU memory; each layer visits the device for its call
            cpu_offload(self.teacher, execution_device=accelerator.device)
        self.ema = EMAModel(averaged(self.generator), decay=dc.ema_decay, update_after_step=dc.ema_start)
        gen_opt, gen_sched = make_optimizer(self.generator, dc, total_steps=generator_updates(dc.steps, self.ratio, dc.critic_warmup))
        critic_opt, critic_sched = make_optimizer(self.critic, dc, lr=dc.critic_lr)
        self.trained = {
            "generator": Trained(self.generator, gen_opt, gen_sched, dc.grad_clip, f"{self.stage}.lr",
                                 schedule_steps=lambda step: generator_updates(step, self.ratio, dc.critic_warmup)),
            "critic": Trained(self.critic, critic_opt, critic_sched, dc.critic_grad_clip, f"{self.stage}.critic_lr",
                              partial=self.gan_only)}
        if self.gan_on:
            self.trained["discriminator"] = self.discriminator_head()
            check_zero_stage(dc, 3 if zero3(accelerator) else 0)
        self.frozen = {} if dc.teacher_offload or self.teacher is None else {"teacher": self.teacher}
        self.offloaded = self.teacher if dc.teacher_offload else None
        del self.generator, self.critic, self.teacher  # from here on: self.trained / self.frozen (wrapped)
        self.real.model = self.fake.model = None
        self.gen = shared_generator(accelerator, self.cfg.run.seed + 4)  # rollout noise, exit steps, DMD levels
        self.batches = Batches(self.cfg, self.student_path, self.gen, accelerator.device)
        self.g_loss = self.c_loss = None
        self.scalars: dict = {}

    def discriminator_head(self) -> Trained:
        """The GAN discriminator's head (`pipeline/methods/gan.py`) on the critic's block `disc_layer`, with its
        own optimizer (`distill.disc_lr`). The critic's loss trains it: under DeepSpeed it is no engine of its
        own (`Trained.engine`; it is small), the critic's engine runs the backward for both."""
        dc, critic = self.section, self.critic.config
        self.layer = critic.num_layers // 2 if dc.disc_layer is None else dc.disc_layer
        if self.layer >= critic.num_layers:
            raise ConfigError(f"distill.disc_layer={self.layer}: the critic has {critic.num_layers} blocks "
                              f"(0 .. {critic.num_layers - 1})", "distill.disc_layer")
        head = FrameDiscriminatorHead(dim=critic.num_attention_heads * critic.attention_head_dim, hidden=dc.disc_hidden)
        opt, sched = make_optimizer(head, dc, lr=dc.disc_lr or dc.critic_lr)
        return Trained(head, opt, sched, dc.critic_grad_clip, f"{self.stage}.disc_lr", engine=False)

    def restore(self, *, step, extra, rng) -> None:
        super().restore(step=step, extra=extra, rng=rng)
        if step:
            self.batches.source.load_state_dict(extra["data"])

    def bind(self) -> None:
        fpc, st, dc = self.cfg.data.frames_per_chunk, self.cfg.student, self.section
        real, fake = self.real, self.fake
        gan = None
        if self.gan_on:  # the discriminator reads the critic's features; the generator's loss uses it unwrapped
            critic, head = self.trained["critic"].module, self.trained["discriminator"].module
            unwrap = self.accelerator.unwrap_model
            gan = GAN(disc=Discriminator(critic, head, fake.attention, fpc, self.layer),
                      frozen_disc=Discriminator(unwrap(critic), unwrap(head), fake.attention, fpc, self.layer),
                      draw_sigma=None, r1_weight=dc.r1_weight, r1_sigma=dc.r1_sigma,
                      r1_unwrapped=self.accelerator.distributed_type == DistributedType.DEEPSPEED)
        teacher = self.frozen.get("teacher", self.offloaded)
        self.dmd = self.losses(
            generator=Denoiser(self.trained["generator"].module, "block_causal", fpc, self.prediction, st.clip_x0,
                               rope=st.rope),
            real=None if teacher is None else Denoiser(teacher, real.attention, fpc, real.prediction),
            fake=Denoiser(self.trained["critic"].module, fake.attention, fpc, fake.prediction),
            dmd_weight=0.0 if self.gan_only else 1.0, gan=gan, gan_weight=1.0 if self.gan_only else dc.gan_weight,
            sigmas=few_step_sigmas(st.denoising_steps, st.shift), real_guidance=dc.real_guidance,
            fake_guidance=dc.fake_guidance, per_frame=dc.timestep_sampling == "per_frame",
            sigma_min=dc.sigma_min, sigma_max=dc.sigma_max, sigma_shift=dc.sigma_shift)
        if gan is not None:  # the discriminator's levels: the DMD levels' distribution
            gan.draw_sigma = self.dmd.draw_sigma

    def losses(self, **common) -> DMD:
        """The DMD loss object over the bound denoisers (`pipeline/methods/dmd.py`)."""
        raise NotImplementedError

    def phase_of(self, name: str) -> str:
        return f"{name} update"  # generator, critic

    def train_step(self, step: int) -> None:
        acc, dc, reuse = self.accelerator, self.section, None
        if step % self.ratio == 0 and step >= dc.critic_warmup:  # generator update, Self-Forcing's order: before the critic's
            with self.dmd.gan.frozen() if self.gan_on else nullcontext():  # the discriminator: through the backward
                g = self.optimize("generator", step=step, batch=lambda i: self.batches.next(),
                                  loss=lambda b: self.dmd.generator_loss(b, self.gen))
            seen = [(b, stats.pop("samples", None)) for b, stats in g.seen]
            reuse = seen if dc.critic_samples == "generator" else None
            self.update_ema()
            sigma = g.stats.pop("dmd_sigma", None)  # none under sf_gan
            self.g_loss = acc.reduce(g.loss.detach(), "mean")  # over the global batch
            self.scalars.update(generator_loss=self.g_loss.item(), generator_grad_norm=float(g.grad_norm), **g.stats)
            if sigma is not None:
                self.scalars.update(dmd_sigma_mean=sigma.mean().item(), dmd_sigma_frame_std=sigma.std(dim=1).mean().item())
                if acc.is_main_process and (step // self.ratio) % dc.log_every == 0:  # the levels drawn, whole
                    acc.get_tracker("tensorboard", unwrap=True).add_histogram("dmd_sigma", sigma, step)
        batch = (lambda i: reuse[i]) if reuse else (lambda i: (self.batches.next(),))  # (batch[, samples])
        c = self.optimize("critic", step=step, batch=batch, also=("discriminator",) if self.gan_on else (),
                          loss=lambda pair: self.dmd.critic_loss(pair[0], self.gen, *pair[1:]))
        self.c_loss, self.c_norm = c.loss, c.grad_norm
        self.scalars.update({k: v for k, v in c.stats.items() if k.startswith(("gan_", "d_", "r1"))})

    def logs(self, step: int, *, elapsed: float) -> tuple[dict, dict]:
        self.c_loss = self.accelerator.reduce(self.c_loss.detach(), "mean")
        self.scalars.update(critic_loss=self.c_loss.item(), critic_grad_norm=float(self.c_norm))
        g = self.scalars.get("generator_loss")  # none yet during distill.critic_warmup: not a NaN loss
        return dict(self.scalars), {"gen": "-" if g is None else f"{g:.4f}", "critic": f"{self.c_loss.item():.4f}"}

    def checkpoint_extra(self) -> dict:
        return {"data": self.batches.source.state_dict(), "critic_loss": self.c_loss.item()}

    def sampling_settings(self) -> dict:
        return {"prediction": self.prediction, **student_config(self.cfg)}

    def preview(self, model, path: Path) -> Path:
        return preview(self.cfg, model, path, n=self.section.preview_n)

    def metrics(self, *, step: int, extra: dict) -> dict:
        return {"generator_updates": generator_updates(step, self.ratio, self.section.critic_warmup), "method": self.section.method,
                "final_critic_loss": self.c_loss.item() if self.c_loss is not None else extra.get("critic_loss"),
                "final_generator_loss": self.g_loss.item() if self.g_loss is not None else None}


def gan_on(section) -> bool:
    """Whether a distill section trains a GAN discriminator (`sf_gan`, or DMD + GAN by `gan_weight`)."""
    return section.method == "sf_gan" or section.gan_weight > 0


def check_zero_stage(section, zero: int) -> None:
    """What a distill section cannot do under DeepSpeed's ZeRO stage `zero` (checked before a launch too):
    the GAN's R1 penalty differentiates the discriminator's gradient, whose weights ZeRO-3 frees after their
    first backward (R1 by a finite difference, `r1_sigma`, runs). ConfigError naming the key."""
    if zero == 3 and gan_on(section) and section.r1_weight and section.r1_sigma is None:
        raise ConfigError("distill.r1_weight: R1 differentiates the discriminator's gradient, whose weights ZeRO-3 "
                          "frees after their first backward; set distill.r1_sigma (R1 by a finite difference), "
                          "distill.r1_weight=0 or run ZeRO-2", "distill.r1_weight")


@register("sf_dmd")
class SelfForcing(DMDMethod):
    """Self-Forcing: DMD on the student's own chunk-by-chunk rollouts (reverse KL on what it generates)."""

    def losses(self, **common) -> DMD:
        st, dc = self.cfg.student, self.section
        return SelfForcingDMD(**common, context_sigma=st.context_sigma, max_context_frames=st.max_context_frames,
                              sink_frames=st.sink_frames, per_chunk_exit=dc.exit_step == "per_chunk",
                              switch_prob=dc.switch_prob, switch_recache=dc.switch_recache,
                              long_frames=dc.long_frames, rolling=dc.rollout == "rolling")


@register("sf_gan")
class SelfForcingGAN(SelfForcing):
    """Self-Forcing rollouts trained by the GAN alone (seed 002's SF+GAN, an expected JSD): no DMD, no real
    score; the discriminator is the critic (started as the teacher) read at `disc_layer`, plus a head."""


@register("df_dmd")
class CausVid(DMDMethod):
    """CausVid's DF+DMD: DMD on noised clean videos denoised in one block-causal forward."""

    def losses(self, **common) -> DMD:
        return DFDMD(**common)
