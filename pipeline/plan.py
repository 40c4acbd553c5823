"""The plan `./launch.sh CONFIG --dry-run` prints (and every run prints first): stages, model shape and
parameter count (on the meta device: no weights allocated), the student's levels, missing local paths, and
each training stage's per-device memory estimate (`pipeline/training/memory.py`;
benchmarks/memory_estimate.py checks it against measured peaks)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from pipeline.config import Config
from pipeline.data.sources import latent_shape
from pipeline.diffusion.sampling import few_step_sigmas
from pipeline.io.run_dir import StageDir
from pipeline.models.causal_wan import CausalWanTransformer, wan_config
from pipeline.training import memory
from pipeline.training.distributed import mixed_precision, run_device
from pipeline.training.settings import is_harmless


def source_config(source: str | Path | None, config_file: str | None = None) -> tuple[dict | None, str]:
    """The `config.json` of a model source, read without its weights: a stage folder's `transformer_ema/`,
    a pipeline folder's `transformer/`, a diffusers folder's own, a safetensors file's metadata; else
    `config_file` (a `*_config` key). Returns (the config or None, where it came from)."""
    path = Path(source) if source else None
    found = None
    if path is not None and path.is_dir():
        found = next((c for c in (path / "transformer_ema" / "config.json", path / "transformer" / "config.json",
                                  path / "config.json") if c.is_file()), None)
        if found is not None:
            return json.loads(found.read_text()), str(path)
    if path is not None and path.suffix == ".safetensors" and path.is_file():
        from safetensors import safe_open
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        if "config" in meta:
            return json.loads(meta["config"]), str(path)
    if config_file and Path(config_file).is_file():
        return json.loads(Path(config_file).read_text()), config_file
    return None, ""


def model_summary(cfg: Config, config: dict | None = None, origin: str = "") -> dict:
    """Parameter count and token shapes without allocating weights (meta device). `config`: a diffusers
    config.json's arguments (else a `model.pretrained` folder's; when it is missing, the shape of
    `model.*` is used and the path named)."""
    source = ""
    kw = wan_config(cfg.model)
    if config is not None:
        kw.update({k: v for k, v in config.items() if k in kw})
        source = f" from {origin}" if origin else ""
    elif cfg.model.pretrained:
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
            "ffn": kw["ffn_dim"], "heads": kw["num_attention_heads"]}


def masked_attention(cfg: Config) -> str:
    """How the training passes' block-causal attention runs on the run's device: "dense" (a boolean mask
    through SDPA, which saves an `[Lq, Lk]` bias per block) or "flex" (FlexAttention block mask)."""
    try:
        from pipeline.models.attention import masked_method
    except ImportError:  # no attention backends: SDPA with a boolean mask
        return "dense"
    return masked_method(getattr(cfg.model, "attention_backend", "auto"), run_device(cfg), requires_grad=True)


def _shape(cfg: Config, ms: dict) -> memory.Shape:
    return memory.Shape(ms["parameters"], ms["dim"], ms["ffn"], ms["layers"], ms["tokens_per_frame"], cfg.data.frames,
                        cfg.data.frames_per_chunk, ms["heads"])


def distill_roles(cfg: Config) -> dict[str, tuple[dict, str | None]]:
    """`{role: (model_summary, attention or None where neither the config nor the source says)}` of distill's
    student, real score and fake score, read from their sources' config.json (else their `*_config` key,
    else the shape of `model.*`) without loading weights."""
    from pipeline.methods.distillation import sources
    from pipeline.models.roles import choose_attention, source_attention

    dc = cfg.distill
    student, teacher, critic = sources(cfg)

    def attention(source, configured, key):  # the rule `load_role` applies, on what the source records on disk
        path = Path(source)
        own = path == Path(cfg.run.dir) / "pretrain_teacher" and not path.exists()  # this run will train it
        recorded = str(cfg.pretrain_teacher.attention) if own else source_attention(path)
        return choose_attention(configured, recorded, key=key, source=path, required=False)

    real = (model_summary(cfg, *source_config(teacher, dc.teacher_config)), attention(teacher, dc.teacher_attention,
                                                                                           "distill.teacher_attention"))
    fake = real if critic is None else (model_summary(cfg, *source_config(critic, dc.critic_config)),
                                        attention(critic, dc.critic_attention, "distill.critic_attention"))
    if critic is None and dc.critic_attention is not None:
        fake = (fake[0], str(dc.critic_attention))
    return {"student": (model_summary(cfg, *source_config(student, dc.student_config)), "block_causal"),
            "real score": real, "fake score": fake}


def memory_estimate(cfg: Config, stage: str, *, ms: dict | None = None, num_processes: int = 1,
                    backend: str | None = None, stage_zero: int = 0,
                    deepspeed: memory.DeepSpeed = memory.DeepSpeed(), phase: str | None = None) -> memory.MemoryEstimate:
    """The per-device memory estimate of a training stage (`pipeline/training/memory.py`) at its peak phase or at
    `phase`; `ms`: `model_summary(cfg)`.
    distill's three models each get their own shape (`distill_roles`). `deepspeed`: the DeepSpeed config's CPU
    offload and reduce bucket."""
    ms = ms or model_summary(cfg)
    real = fake = None
    kw = {}
    if stage == "distill":
        roles = distill_roles(cfg)
        ms = roles["student"][0]
        real, fake = _shape(cfg, roles["real score"][0]), _shape(cfg, roles["fake score"][0])
        kw = {"teacher_attention": roles["fake score"][1], "real_attention": roles["real score"][1]}
    return memory.estimate_config(cfg, stage, _shape(cfg, ms), backend or "DDP", stage_zero, num_processes,
                                  bf16=mixed_precision(cfg) == "bf16", masked=masked_attention(cfg), real=real,
                                  fake=fake, deepspeed=deepspeed, phase=phase, **kw)


def memory_remedies(cfg: Config, stage: str, *, ms: dict | None = None, num_processes: int = 1,
                    backend: str | None = None, stage_zero: int = 0, deepspeed: memory.DeepSpeed = memory.DeepSpeed()
                    ) -> list[tuple[str, memory.MemoryEstimate]]:
    """The settings of this config that would lower a training stage's per-device memory, one change at a time, each
    as `key=value` overrides with the estimate it would have (lowest first): gradient checkpointing, the EMA copy on
    the CPU, the real score offloaded to the CPU (distill), the teacher's ODE pairs sampled one video at a time
    (init_student), half the batch with twice the accumulation (the same global batch). Sharding over GPUs (ZeRO) is
    the other way, not listed (the process count is the user's)."""
    section = getattr(cfg, stage)
    options = []
    if not section.gradient_checkpointing:
        options.append({"gradient_checkpointing": True})
    if str(section.ema_device) != "cpu":
        options.append({"ema_device": "cpu"})
    if stage == "distill" and not section.teacher_offload and section.method != "sf_gan":  # (sf_gan: no real score)
        options.append({"teacher_offload": True})
    if stage == "init_student" and (section.ode_batch_size or section.ode_shard_size) > 1 and \
            min(section.ode_shard_size, section.ode_pairs) > 1:
        options.append({"ode_batch_size": 1})
    if section.batch_size % 2 == 0:
        options.append({"batch_size": section.batch_size // 2, "grad_accum": section.grad_accum * 2})
    # (`ms`: the model's summary, which none of these changes; read once)
    kw = dict(ms=ms or model_summary(cfg), num_processes=num_processes, backend=backend, stage_zero=stage_zero,
              deepspeed=deepspeed)
    now = memory_estimate(cfg, stage, **kw).total
    out = []
    for change in options:
        est = memory_estimate(replace(cfg, **{stage: replace(section, **change)}), stage, **kw)
        if est.total < now:
            text = " ".join(f"{stage}.{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in change.items())
            out.append((text, est))
    return sorted(out, key=lambda r: r[1].total)


def remedies_text(remedies: list[tuple[str, memory.MemoryEstimate]], started: bool = False,
                  harmless: tuple[str, ...] = ()) -> str:
    """`memory_remedies` in words: `distill.ema_device=cpu (~53.6 GiB), ...`; `started` (the stage has a
    checkpoint): a change a resume would refuse (`settings.is_harmless`, with the method's `harmless` keys) says
    that it restarts the stage."""
    def note(text: str) -> str:
        restarts = started and not all(is_harmless(kv.split("=")[0], harmless) for kv in text.split())
        return "; with --force: restarts the stage" if restarts else ""

    return ", ".join(f"{text} (~{memory.size_text(est.total)}{note(text)})" for text, est in remedies)


def memory_line(cfg: Config, stage: str, ms: dict, num_processes: int, backend: str | None, stage_zero: int,
                deepspeed: memory.DeepSpeed = memory.DeepSpeed()) -> str:
    est = memory_estimate(cfg, stage, ms=ms, num_processes=num_processes, backend=backend, stage_zero=stage_zero,
                          deepspeed=deepspeed)
    lines = [f"  memory: {est.line()}", *(f"    {line}" for line in est.model_lines())]
    remedies = memory_remedies(cfg, stage, ms=ms, num_processes=num_processes, backend=backend,
                               stage_zero=stage_zero, deepspeed=deepspeed)
    if remedies:
        lines.append(f"    lower with: {remedies_text(remedies)}")
    return "\n".join(lines)


def missing_paths(cfg: Config) -> dict[str, str]:
    """Configured local paths (weights, data, components) that do not exist, by config key. The stages'
    own outputs (data.path when prepare_data has yet to write it) count as missing too."""
    keys = {"model.pretrained": cfg.model.pretrained, "data.path": cfg.data.path, "data.videos": cfg.data.videos,
            "data.prompts": cfg.data.prompts, "components.text_encoder": cfg.components.text_encoder,
            "components.tokenizer": cfg.components.tokenizer, "components.vae": cfg.components.vae,
            "init_student.teacher": cfg.init_student.teacher, "distill.student": cfg.distill.student,
            "distill.teacher": cfg.distill.teacher}
    return {k: v for k, v in keys.items() if v and not Path(v).exists()}


def role_lines(cfg: Config) -> list[str]:
    """distill's models: shape and attention of each (`pipeline/models/roles.py`)."""
    keys = {"real score": "distill.teacher_attention", "fake score": "distill.critic_attention"}
    out = []
    for role, (ms, attention) in distill_roles(cfg).items():
        said = attention or f"not recorded by its source: set {keys[role]} (the run stops here otherwise)"
        unused = ""
        if role == "real score" and cfg.distill.method == "sf_gan":  # the GAN alone: no score calls
            unused = " (sf_gan: not loaded" + (", only the critic's start)" if cfg.distill.critic is None else ")")
        out.append(f"  {role}: {memory.params_text(ms['parameters'])} ({ms['layers']} layers x {ms['dim']}), "
                   f"attention {said}{unused}")
    return out


def plan(cfg: Config, stages: list[str], num_processes: int = 1, backend: str | None = None, zero: int = 0,
         deepspeed: memory.DeepSpeed = memory.DeepSpeed()) -> str:
    device = run_device(cfg).type
    _, _, h, w = latent_shape(cfg)
    how = backend or ("DDP" if num_processes > 1 else "single")
    if backend == "DEEPSPEED":
        how += f", ZeRO-{zero}"
        if deepspeed.offload:
            how += f", CPU offload of the {' and '.join(deepspeed.offload)}"
        if deepspeed.reduce_bucket != memory.DEEPSPEED_REDUCE_BUCKET:
            how += f", reduce bucket {deepspeed.reduce_bucket:,}"
    lines = [f"run dir: {cfg.run.dir}",
             f"processes: {num_processes} ({how})",
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
        if s == "distill":
            lines += role_lines(cfg)
        if s in ("pretrain_teacher", "init_student", "distill"):
            lines.append(memory_line(cfg, s, ms, num_processes, backend, zero, deepspeed))
        if s == "distill" and cfg.distill.teacher_offload and cfg.distill.method != "sf_gan":  # what offloading saves
            other = replace(cfg, distill=replace(cfg.distill, teacher_offload=not cfg.distill.teacher_offload))
            est = memory_estimate(other, s, num_processes=num_processes, backend=backend, stage_zero=zero,
                                  deepspeed=deepspeed)
            lines.append(f"    with distill.teacher_offload={str(not cfg.distill.teacher_offload).lower()}: "
                         f"{est.line().split(' per device')[0]} in all")
    return "\n".join(lines)
