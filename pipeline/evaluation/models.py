"""The models of an evaluation report (`entries`) and each one loaded for sampling (`ModelSampler`).

Built-in entries, in report order (`evaluate.models`): `teacher` (the DF teacher with its many-step sampler),
`teacher_few_step` (the same teacher through the student's few-step sampler: the "no distillation"
baseline), `student_init` and `student` (init_student and distill, few-step); then `evaluate.extra`, further
stage (or diffusers) folders by name.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from pipeline.config import Config, ConfigError
from pipeline.diffusion.videos import sample_videos
from pipeline.io.run_dir import StageDir
from pipeline.models.loading import for_inference, is_student, load_source
from pipeline.training.distributed import mixed_precision


@dataclass
class Entry:
    """One model of the report: `source` folder, and whether it samples with the student's few steps
    although it is a teacher (`few_step`)."""

    name: str
    source: Path
    few_step: bool = False


def entries(cfg: Config) -> list[Entry]:
    """The models to evaluate, in report order; built-in ones whose stage is not done are skipped."""
    run = Path(cfg.run.dir)
    teacher = Path(cfg.distill.teacher or run / "pretrain_teacher")
    builtin = {"teacher": Entry("teacher", teacher), "teacher_few_step": Entry("teacher_few_step", teacher, True),
               "student_init": Entry("student_init", Path(cfg.distill.student or run / "init_student")),
               "student": Entry("student", run / "distill")}
    out = []
    for name in cfg.evaluate.models:
        e = builtin[name]
        if (e.source / "manifest.json").is_file() and not StageDir(e.source.parent, e.source.name).done:
            print(f"[evaluate] skipping {name}: {e.source} has not finished")
        elif not e.source.exists():
            print(f"[evaluate] skipping {name}: {e.source} not found")
        else:
            out.append(e)
    for name, path in cfg.evaluate.extra.items():
        if not Path(path).exists():
            raise FileNotFoundError(f"evaluate.extra.{name}: {path} not found")
        out.append(Entry(name, Path(path)))
    if not out:
        raise FileNotFoundError(f"evaluate: none of the models exists under {run}; run the training stages first")
    return out


def weights_of(source: Path) -> Path:
    """The weights a model's result depends on (hashed into the manifest): a stage's EMA folder, else `source`."""
    return source / "transformer_ema" if (source / "transformer_ema").is_dir() else source


class ModelSampler:
    """One sprites model loaded for sampling: `sampler(labels [N], frames, on_chunk)` → videos `[N, F, 3, S, S]`.

    Attributes: `model` (the transformer, for the speed meter), `desc` (the sampler, for the report),
    `causal` (a prefix of a long rollout is a short rollout), `few_step` (which sampler runs).
    """

    def __init__(self, entry: Entry, cfg: Config, device: torch.device):
        model, table, mcfg = load_source(entry.source)
        if table is None:
            raise ConfigError(f"{entry.source}: evaluate scores sprites models (class prompts); this one has none")
        if not (entry.source / "manifest.json").is_file():  # a bare diffusers folder: the run's samplers
            mcfg = replace(cfg, model=replace(cfg.model, prediction=mcfg.model.prediction),
                           student=mcfg.student if is_student(model) else cfg.student)
        self.model = for_inference(model, device, mixed_precision(cfg))  # bf16 where the run computes in it
        self.table, self.cfg, self.mcfg = table.to(device), cfg, mcfg
        self.student, self.sampler = None, None
        attention = mcfg.pretrain_teacher.attention
        self.few_step = is_student(model) or (entry.few_step and attention == "block_causal")
        if self.few_step:  # a student, or the teacher through the student's sampler
            self.student = mcfg.student if is_student(model) else cfg.student
            st = self.student
            self.desc = {"kind": "few_step", "denoising_steps": list(st.denoising_steps), "shift": st.shift,
                         "max_context_frames": st.max_context_frames}
            self.causal = True
        else:
            self.sampler = mcfg.pretrain_teacher.sampler
            if entry.few_step:  # a bidirectional teacher has no KV cache: its own sampler, the student's step count
                self.sampler = replace(self.sampler, steps=len(cfg.student.denoising_steps), lag=0)
            sp = self.sampler
            self.desc = {"kind": sp.kind, "steps": sp.steps, "lag": sp.lag, "guidance": sp.guidance,
                         "attention": attention, "max_context_frames": sp.max_context_frames}
            self.causal = sp.kind == "autoregressive" and attention == "block_causal"

    def __call__(self, labels: torch.Tensor, frames: int, on_chunk=None, recache: bool = False) -> torch.Tensor:
        """`labels [N]`, or a class schedule `[N, frames]` (switched videos; `recache` as `sample_videos`)."""
        c, e = self.cfg, self.cfg.evaluate
        return sample_videos(self.model, self.table, labels, frames=frames, size=c.data.size,
                             frames_per_chunk=c.data.frames_per_chunk, prediction=self.mcfg.model.prediction,
                             student=self.student, sampler=self.sampler, attention=self.mcfg.pretrain_teacher.attention,
                             seed=e.seed, batch_size=e.batch_size, few_step=self.few_step, on_chunk=on_chunk,
                             recache=recache)
