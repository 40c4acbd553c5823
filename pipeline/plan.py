"""The plan `./launch.sh CONFIG --dry-run` prints (and every run prints first): stages, model shape and
parameter count (on the meta device: no weights allocated), the student's levels, missing local paths, and
each training stage's per-device memory estimate (`pipeline/training/memory.py`;
benchmarks/memory_estimate.py checks it against measured peaks)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from pipeline.config import Config
from pipeline.data.sources import latent_shape
from pipeline.diffusion.sampling import few_step_sigmas
from pipeline.io.run_dir import StageDir
from pipeline.models.causal_wan import CausalWanTransformer, wan_config
from pipeline.training import memory
from pipeline.training.distributed import mixed_precision, run_device


def model_summary(cfg: Config) -> dict:
    """Parameter count and token shapes without allocating weights (meta device). A `model.pretrained`
    folder gives its config.json; when it is missing, the shape of `model.*` is used and the path named."""
    source = ""
    kw = wan_config(cfg.model)
    if cfg.model.pretrained:
        conf = Path(cfg.model.pretrained) / "config.json"
        if conf.is_file():
            kw.update({k: v for k, v in json.loads(conf.read_text()).items() if k in kw})
            source = f" from {cfg.model.pretrained}"
        else:
            source = f" (shape of model.*: local weights not found: {conf})"
    with torch.device("meta"):
        m = CausalWanTransformer(**kw)
    params = sum(p.numel() for p in m.parameters())
    patch = kw["patch_size"]
    _, f, h, w = latent_shape(cfg)
    tokens = (h // patch[1]) * (w // patch[2])
    return {"class": "CausalWanTransformer (diffusers WanTransformer3DModel)" + source, "parameters": params,
            "latent": [kw["in_channels"], f, h, w], "tokens_per_frame": tokens, "sequence": tokens * f,
            "dim": kw["num_attention_heads"] * kw["attention_head_dim"], "layers": kw["num_layers"],
            "ffn": kw["ffn_dim"]}


def masked_attention(cfg: Config) -> str:
    """How the training passes' block-causal attention runs on the run's device: "dense" (a boolean mask
    through SDPA, which saves an `[Lq, Lk]` bias per block) or "flex" (FlexAttention block mask)."""
    try:
        from pipeline.models.attention import masked_method
    except ImportError:  # no attention backends: SDPA with a boolean mask
        return "dense"
    return masked_method(getattr(cfg.model, "attention_backend", "auto"), run_device(cfg), requires_grad=True)


def memory_estimate(cfg: Config, stage: str, *, ms: dict | None = None, num_processes: int = 1,
                    backend: str | None = None, stage_zero: int = 0) -> memory.MemoryEstimate:
    """The per-device memory estimate of a training stage (`pipeline/training/memory.py`); `ms`: `model_summary(cfg)`."""
    ms = ms or model_summary(cfg)
    shape = memory.Shape(ms["parameters"], ms["dim"], ms["ffn"], ms["layers"], ms["tokens_per_frame"], cfg.data.frames,
                         cfg.data.frames_per_chunk)
    return memory.estimate_config(cfg, stage, shape, backend or "DDP", stage_zero, num_processes,
                                  bf16=mixed_precision(cfg) == "bf16", masked=masked_attention(cfg))


def memory_line(cfg: Config, stage: str, ms: dict, num_processes: int, backend: str | None, stage_zero: int) -> str:
    est = memory_estimate(cfg, stage, ms=ms, num_processes=num_processes, backend=backend, stage_zero=stage_zero)
    return f"  memory: {est.line()}"


def missing_paths(cfg: Config) -> dict[str, str]:
    """Configured local paths (weights, data, components) that do not exist, by config key. The stages'
    own outputs (data.path when prepare_data has yet to write it) count as missing too."""
    keys = {"model.pretrained": cfg.model.pretrained, "data.path": cfg.data.path, "data.videos": cfg.data.videos,
            "data.prompts": cfg.data.prompts, "components.text_encoder": cfg.components.text_encoder,
            "components.tokenizer": cfg.components.tokenizer, "components.vae": cfg.components.vae,
            "init_student.teacher": cfg.init_student.teacher, "distill.student": cfg.distill.student,
            "distill.teacher": cfg.distill.teacher}
    return {k: v for k, v in keys.items() if v and not Path(v).exists()}


def plan(cfg: Config, stages: list[str], num_processes: int = 1, backend: str | None = None, zero: int = 0) -> str:
    device = run_device(cfg).type
    _, _, h, w = latent_shape(cfg)
    lines = [f"run dir: {cfg.run.dir}",
             f"processes: {num_processes} ({backend or ('DDP' if num_processes > 1 else 'single')})",
             f"device: {device} ({torch.cuda.device_count()} GPU visible)",
             f"data: {cfg.data.kind} {h}x{w} frames={cfg.data.frames} frames_per_chunk={cfg.data.frames_per_chunk}"]
    missing = missing_paths(cfg)
    if missing:
        lines.append("missing local paths: " + ", ".join(f"{k}={v}" for k, v in missing.items()))
    ms = model_summary(cfg)
    lines.append(f"model: {ms['class']}, {ms['parameters']:,} parameters, latent {ms['latent']}, "
                 f"{ms['tokens_per_frame']} tokens/frame, {ms['sequence']} tokens/clip")
    if any(s != "pretrain_teacher" for s in stages):
        st = cfg.student
        levels = ", ".join(f"{v:.3g}" for v in few_step_sigmas(st.denoising_steps, st.shift).tolist())
        lines.append(f"student: {len(st.denoising_steps)} steps {list(st.denoising_steps)} shift {st.shift} -> σ [{levels}], "
                     f"KV window {st.max_context_frames or 'all'} frames (sinks {st.sink_frames})")
    for s in stages:
        state = StageDir(cfg.run.dir, s).manifest().get("status", "pending")
        section = getattr(cfg, s, None)
        detail = f"steps={section.steps} batch={section.batch_size} lr={section.lr}" if hasattr(section, "steps") else ""
        if s == "distill":
            d = cfg.distill
            detail += (f" method={d.method} critic_lr={d.critic_lr} critic_steps_per_generator_step="
                       f"{d.critic_steps_per_generator_step} real_guidance={d.real_guidance} levels={d.timestep_sampling}")
        if s == "evaluate":
            e = cfg.evaluate
            detail = (f"models={','.join(e.models + list(e.extra))} videos={e.num_videos} frames={cfg.data.frames} and "
                      f"{cfg.data.frames * e.long_factor}")
        lines.append(f"stage {s}: {state} {detail}".rstrip())
        if s in ("pretrain_teacher", "init_student", "distill"):
            lines.append(memory_line(cfg, s, ms, num_processes, backend, zero))
    return "\n".join(lines)
