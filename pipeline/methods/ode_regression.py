"""ODE regression: the causal few-step student initialised as CausVid does.

1. The student is the teacher's backbone (block-causal, `data.frames_per_chunk`) starting from the
   teacher's EMA weights.
2. ODE pairs: the teacher samples videos from noise with its many-step sampler (`pretrain_teacher.sampler`,
   guidance included) on a path through the student's levels `student.denoising_steps` (warped by
   `student.shift`); the states there and the clean end point go to `ode_pairs/shard_*.safetensors`
   (`pipeline/data/ode_pairs.py`; resumable shard by shard). The sampler follows the teacher's attention
   (`pipeline/models/roles.py`): a bidirectional teacher (a stock Wan model: CausVid, Self-Forcing)
   denoises whole clips synchronously; a block-causal one (Causal-Forcing) chunk by chunk with its KV
   cache, as `pretrain_teacher.sampler.kind` says.
3. Regression (`pipeline/diffusion/losses.py: ode_regression_loss`): per chunk a random entry of the stored
   path, loss `mean((G_θ(x_σk, σk) - x0)²)` over the noisy chunks (clean ones are context only).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch
from diffusers.training_utils import EMAModel

from pipeline.io.run_dir import is_stage_folder
from pipeline.config import Config
from pipeline.data.ode_pairs import OdePairs, pairs_missing, write_ode_pairs
from pipeline.data.sources import build_source, latent_shape
from pipeline.data.sprites import NULL_CLASS
from pipeline.diffusion.losses import ode_regression_loss, pick_ode_states
from pipeline.diffusion.sampling import Denoiser, few_step_sigmas
from pipeline.diffusion.videos import preview
from pipeline.methods.base import OneModelMethod, Trained, register
from pipeline.models.loading import load_source, student_config
from pipeline.models.roles import load_role
from pipeline.training.distributed import shared_generator
from pipeline.training.optim import averaged, make_optimizer, trainable
from pipeline.training.stage_io import data_inputs
from pipeline.training.settings import flatten


def ode_sampler(sampler, attention: str):
    """The teacher's sampler for ODE pairs: a bidirectional teacher has no causal order to follow, so it
    denoises whole clips synchronously (with the sampler's steps, shift and guidance)."""
    return replace(sampler, kind="synchronous") if attention == "bidirectional" else sampler


def teacher_path(cfg: Config) -> Path:
    return Path(cfg.init_student.teacher or Path(cfg.run.dir) / "pretrain_teacher")


def stage_input(path: Path) -> Path:
    """The weights a stage reads from `path`: a stage folder's EMA transformer, else `path` itself."""
    return path / "transformer_ema" if is_stage_folder(path) else path


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


@register("ode_regression")
class OdeRegression(OneModelMethod):
    """The student regressed on the teacher's ODE trajectories; it starts as the teacher's EMA weights
    (the same module: no separate frozen copy)."""

    stage = "init_student"

    def __init__(self, *, cfg, section=None):
        super().__init__(cfg=cfg, section=section or cfg.init_student)
        self.source_path = teacher_path(cfg)

    def inputs(self) -> dict:
        return {"init_student.teacher": self.source_path, **data_inputs(self.cfg)}

    def recorded_inputs(self) -> dict:
        return {"teacher": stage_input(self.source_path)}

    def fingerprint_sections(self) -> list[str]:  # the model comes from the teacher; the pairs from its sampler
        return ["run.seed", "run.mixed_precision", "data", "student", "pretrain_teacher.sampler",
                "pretrain_teacher.attention"]

    def harmless_settings(self) -> tuple[str, ...]:  # the student's rollout settings: its preview only
        return tuple(f"student.{k}" for k in ("context_sigma", "max_context_frames", "sink_frames", "clip_x0", "rope",
                                              "kv_cache"))

    def load(self) -> None:
        role = load_role("teacher", self.source_path, configured=self.section.teacher_attention,
                         key="init_student.teacher_attention", run=self.cfg,
                         model_config=self.section.teacher_config)  # EMA weights
        self.teacher, self.table, self.attention = role.model, role.table, role.attention
        self.prediction = role.prediction  # the student predicts what the teacher does

    def build(self, accelerator) -> None:
        ic = self.section
        model = trainable(self.teacher, ic, name="student")
        self.ema = EMAModel(averaged(model), decay=ic.ema_decay)
        optimizer, scheduler = make_optimizer(model, ic)
        self.trained = {"model": Trained(model, optimizer, scheduler, ic.grad_clip, f"{self.stage}.lr")}
        self.gen = shared_generator(accelerator, self.cfg.run.seed + 2)  # pair draws and step indices

    def restore(self, *, step, extra, rng) -> None:
        self.resumed_at = step
        super().restore(step=step, extra=extra, rng=rng)

    @torch.no_grad()
    def prepare_data(self, *, stage_path: Path) -> None:
        """Sample (or finish sampling) the teacher's ODE pairs into `<stage>/ode_pairs/`, the shards shared
        out over the processes."""
        cfg, ic, tc, acc = self.cfg, self.section, self.cfg.pretrain_teacher, self.accelerator
        folder = stage_path / "ode_pairs"
        acc.wait_for_everyone()  # the manifest (begun by the main process) records the teacher's hash
        teacher_rec = json.loads((stage_path / "manifest.json").read_text()).get("inputs", {}).get("teacher", {})
        sigmas = few_step_sigmas(cfg.student.denoising_steps, cfg.student.shift)
        provenance = {"teacher_sha256": teacher_rec.get("sha256"), **flatten(tc.sampler, "pretrain_teacher.sampler"),
                      "pretrain_teacher.attention": self.attention, "student_sigmas": sigmas.tolist(),
                      "run.seed": cfg.run.seed, "latent_shape": list(latent_shape(cfg)),
                      "init_student.ode_batch_size": ic.ode_batch_size}
        teacher = self.teacher
        if self.resumed_at and pairs_missing(folder, ic.ode_pairs, ic.ode_shard_size, sigmas, provenance):
            teacher = load_source(self.source_path)[0]  # the student's module holds resumed weights now
        denoiser = Denoiser.of_sampler(teacher.to(acc.device).eval(), self.attention, cfg.data.frames_per_chunk,
                                       self.prediction, tc.sampler)
        conditions, uncond = pair_conditions(cfg, self.table)
        with self.peaks.phase("ODE pairs"):
            paths = write_ode_pairs(folder, denoiser, conditions, uncond if tc.sampler.guidance != 1.0 else None,
                                    ic.ode_pairs, ic.ode_shard_size, latent_shape(cfg), sigmas,
                                    ode_sampler(tc.sampler, self.attention), seed=cfg.run.seed, device=acc.device,
                                    rank=acc.process_index, world=acc.num_processes, batch_size=ic.ode_batch_size,
                                    provenance=provenance)
        acc.wait_for_everyone()  # every process trains on all shards
        self.pairs_folder = folder
        self.pairs = OdePairs(folder, paths)

    def bind(self) -> None:
        self.student = Denoiser(self.trained["model"].module, "block_causal", self.cfg.data.frames_per_chunk,
                                self.prediction)

    def step_loss(self, batch: dict):
        x, sigma = pick_ode_states(batch["states"], self.pairs.sigmas, self.cfg.data.frames_per_chunk, self.gen)
        return ode_regression_loss(self.student, x, sigma, batch["context"], batch["states"][:, -1],
                                   self.global_norm((sigma > 0).float())), {}

    def batch(self, i: int) -> dict:
        return self.pairs.next_batch(self.section.batch_size, self.gen, self.accelerator.device)

    def checkpoint_extra(self) -> dict:
        return {"loss": self.loss.item()}

    def sampling_settings(self) -> dict:
        return {"prediction": self.prediction, **student_config(self.cfg)}

    def preview(self, model, path: Path) -> Path:
        return preview(self.cfg, model, path, n=self.section.preview_n)

    def extra_outputs(self, stage_path: Path) -> dict:
        return {"ode_pairs": str(self.pairs_folder)}

    def metrics(self, *, step: int, extra: dict) -> dict:
        return {"final_loss": self.loss.item() if self.loss is not None else extra.get("loss"),
                "ode_pairs": len(self.pairs)}
