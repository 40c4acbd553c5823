"""Flow matching under a trajectory distribution: the Diffusion-Forcing teacher (seed 000).

    loss = Σ_f w_f · mean((v_θ(x_σ, σ, prompt) - (ε - x0))²)_f / Σ_f w_f,   x_σ = (1-σ)x0 + σε

(`pipeline/diffusion/losses.py: flow_matching_loss`) with per-frame levels σ `[B, F]` and weights w drawn
from the configured trajectory distribution (`pipeline/diffusion/trajectories.py`: df, tf or bid). With
`model.prediction=x0` the same L2 is taken on x0 (the flow loss reweighted by σ² per frame).
"""

from __future__ import annotations

from pathlib import Path

from diffusers.training_utils import EMAModel

from pipeline.config import ConfigError
from pipeline.data import shard
from pipeline.data.sources import build_source
from pipeline.diffusion.losses import flow_matching_loss
from pipeline.diffusion.sampling import Denoiser
from pipeline.diffusion.trajectories import TrajectoryDistribution
from pipeline.diffusion.videos import preview
from pipeline.methods.base import OneModelMethod, Trained, register
from pipeline.models.conditioning import drop_prompts
from pipeline.models.causal_wan import build_transformer
from pipeline.training.distributed import local_batch, shared_generator
from pipeline.training.optim import averaged, make_optimizer, trainable
from pipeline.training.stage_io import data_inputs


@register("flow_matching")
class FlowMatching(OneModelMethod):
    """The teacher: one model trained by flow matching (or x0 regression) from scratch or `model.pretrained`."""

    stage = "pretrain_teacher"

    def __init__(self, *, cfg, section=None):
        super().__init__(cfg=cfg, section=section or cfg.pretrain_teacher)
        if cfg.data.kind == "prompts":
            raise ConfigError("pretrain_teacher needs videos: data.kind=prompts has none; use data.kind=latents")

    def inputs(self) -> dict:
        return {"model.pretrained": self.cfg.model.pretrained, **data_inputs(self.cfg)}

    def recorded_inputs(self) -> dict | None:
        return {"pretrained": self.cfg.model.pretrained} if self.cfg.model.pretrained else None

    def harmless_settings(self) -> tuple[str, ...]:
        return ("pretrain_teacher.sampler",)  # the preview's sampler

    def build(self, accelerator) -> None:
        cfg, tc = self.cfg, self.section
        model = trainable(build_transformer(cfg.model), tc)
        self.ema = EMAModel(averaged(model), decay=tc.ema_decay)
        optimizer, scheduler = make_optimizer(model, tc)
        self.trained = {"model": Trained(model, optimizer, scheduler, tc.grad_clip, f"{self.stage}.lr")}
        self.source = build_source(cfg, seed=cfg.run.seed)
        self.trajectories = TrajectoryDistribution(
            kind=tc.trajectory, frames_per_chunk=cfg.data.frames_per_chunk, per_chunk=tc.per_chunk,
            tf_prob=tc.tf_prob, bid_prob=tc.bid_prob, sigma_kind=tc.sigma_kind, sigma_mean=tc.sigma_mean,
            sigma_std=tc.sigma_std, sigma_shift=tc.sigma_shift)
        self.gen = shared_generator(accelerator, cfg.run.seed + 1)  # noise levels, noise, label dropout

    def restore(self, *, step, extra, rng) -> None:
        if step:
            self.source.load_state_dict(extra["data"])
        super().restore(step=step, extra=extra, rng=rng)

    def bind(self) -> None:
        device = self.accelerator.device
        self.denoiser = Denoiser(self.trained["model"].module, self.section.attention, self.cfg.data.frames_per_chunk,
                                 self.cfg.model.prediction)
        self.null = self.source.null_context(self.section.batch_size).to(device)

    def batch(self, i: int) -> dict:
        """One micro-batch: clean videos, prompts (some dropped to the null prompt), levels, weights, noise."""
        tc, device = self.section, self.accelerator.device
        batch = local_batch(self.source, tc.batch_size, self.gen, device)
        context = drop_prompts(batch["context"], self.null, tc.label_dropout, self.gen)
        sigma, weight = self.trajectories.sample(tc.batch_size, batch["x0"].shape[2], self.gen)
        noise = shard.randn(batch["x0"].shape, self.gen).to(device)
        return {"x0": batch["x0"], "context": context, "sigma": sigma, "weight": weight, "noise": noise}

    def step_loss(self, b: dict):
        device = self.accelerator.device
        weight = b["weight"].to(device)
        return flow_matching_loss(self.denoiser, b["x0"], b["context"], b["sigma"].to(device), weight, b["noise"],
                                  self.global_norm(weight)), {}

    def checkpoint_extra(self) -> dict:
        return {"data": self.source.state_dict(), "loss": self.loss.item()}

    def sampling_settings(self) -> dict:  # a teacher records how it attends (`pipeline/models/roles.py`)
        return {"prediction": self.cfg.model.prediction, "attention": self.section.attention}

    def preview(self, model, path: Path) -> Path:
        return preview(self.cfg, model, path, self.section.attention, self.section.sampler, n=self.section.preview_n)

    def metrics(self, *, step: int, extra: dict) -> dict:
        return {"final_loss": self.loss.item() if self.loss is not None else extra.get("loss")}
