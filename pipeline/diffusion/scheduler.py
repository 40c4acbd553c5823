"""The few-step student's streaming schedule as a diffusers scheduler config (`CausalWanPipeline`'s `scheduler`).

A causal student does not step through a diffusers scheduler: every chunk goes through its few levels
(`sampling.few_step_sigmas`: the student's `denoising_steps` warped by `shift`), predicting x̂0 and re-noising it
to the next level, and a finished chunk enters the KV cache at `context_sigma` (`sampling.few_step_chunks`). What
a saved pipeline must remember is therefore the student's sampler section (`student.*` of our config), the
causal unit (`frames_per_chunk`), what the network predicts, and the default video size in latent frames and
pixels: this class registers exactly those (`scheduler/scheduler_config.json`) and checks them against our
config schema, so a hand-edited file fails with one line naming the key.
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from pipeline.diffusion.sampling import few_step_sigmas, uniform_denoising_steps

# student.* keys of our config this scheduler registers (`StudentConfig`)
STUDENT_KEYS = ("denoising_steps", "shift", "context_sigma", "clip_x0", "max_context_frames", "sink_frames", "rope",
                "kv_cache")


class CausalFewStepScheduler(SchedulerMixin, ConfigMixin):
    """The student's sampler settings (see the module docstring).

    Args:
        denoising_steps, shift, context_sigma, clip_x0, max_context_frames, sink_frames, rope, kv_cache: the
            student's sampler (`student.*`, pipeline/config.py: `StudentConfig`).
        frames_per_chunk: latent frames per causal chunk (`data.frames_per_chunk`).
        prediction: what the transformer outputs, "flow" or "x0" (`model.prediction`).
        num_frames: default video length in latent frames (`data.frames`).
        sample_size: default `[H, W]` of a latent frame (`data.latent_size`, sprites: `[size, size]`).
    """

    config_name = "scheduler_config.json"
    order = 1

    @register_to_config
    def __init__(self, denoising_steps: list[int] = (1000, 750, 500, 250), shift: float = 5.0,
                 context_sigma: float = 0.0, clip_x0: float = 0.0, max_context_frames: int | None = None,
                 sink_frames: int = 0, rope: str = "relative", kv_cache: str = "auto", frames_per_chunk: int = 3,
                 prediction: str = "flow", num_frames: int = 21, sample_size: list[int] = (60, 104)):
        from pipeline.config import ConfigError, load_config

        try:  # our schema's checks (ranges, decreasing steps, enums, frames a multiple of the chunk)
            load_config(None, partial={"student": self.student_settings(), "model": {"prediction": prediction},
                                       "data": {"kind": "latents", "frames": num_frames,
                                                "frames_per_chunk": frames_per_chunk,
                                                "latent_size": list(sample_size)}},
                        partial_source="scheduler_config.json")
        except ConfigError as e:
            raise ValueError(str(e)) from None
        self.set_timesteps()

    def student_settings(self) -> dict:
        """The registered `student.*` keys, as our config's `student` section."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in ((k, self.config[k]) for k in STUDENT_KEYS)}

    def set_timesteps(self, num_inference_steps: int | None = None, device: str | torch.device | None = None) -> None:
        """The levels of one chunk: the registered `denoising_steps`, or (`num_inference_steps` = K) K evenly spaced
        steps (`sample --steps K`); sets `timesteps` (Wan's 0..1000 units, `[K]`) and `sigmas` (`[K]`, warped by
        `shift`, `sampling.few_step_sigmas`)."""
        steps = uniform_denoising_steps(num_inference_steps) if num_inference_steps else list(self.config.denoising_steps)
        self.timesteps = torch.tensor(steps, dtype=torch.long, device=device)
        self.sigmas = few_step_sigmas(steps, self.config.shift).to(device)
        self.num_inference_steps = len(steps)

    @classmethod
    def from_run_config(cls, cfg) -> "CausalFewStepScheduler":
        """The schedule of a student trained under our `Config` `cfg` (its `student`, `data`, `model` sections)."""
        import dataclasses

        student = dataclasses.asdict(cfg.student)
        return cls(**{k: str(student[k].value) if hasattr(student[k], "value") else student[k] for k in STUDENT_KEYS},
                   frames_per_chunk=cfg.data.frames_per_chunk, prediction=str(cfg.model.prediction),
                   num_frames=cfg.data.frames, sample_size=list(cfg.data.frame_size()))
