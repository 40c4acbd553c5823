"""`./launch.sh CONFIG [--stages ...] [--num-processes N] [--accelerate-config F] [--dry-run] [--force] [k=v ...]`

Validates the config, prints the plan, then runs the selected stages in order; stages already done are
skipped (`--force` reruns them), an interrupted stage resumes from its last checkpoint. The run directory is
locked for the whole command (`pipeline/io/guard.py`: a second command on it refuses, naming this one); with
`--num-processes N` this process holds the lock and the workers it starts run under it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from pipeline.training import memory
from pipeline.models.causal_wan import CausalWanTransformer, wan_config
from pipeline.config import STAGES, Config, ConfigError, load_config
from pipeline.data.sources import latent_shape
from pipeline.io.run_dir import StageDir
from pipeline.diffusion.sampling import few_step_sigmas
from pipeline.cli import USER_ERRORS, parse_with_overrides
from pipeline.training.distributed import mixed_precision, run_device
from pipeline.training.resume import lock_run_dir

BACKENDS = ("NO", "MULTI_CPU", "MULTI_GPU", "DEEPSPEED", "FSDP")  # accelerate's distributed_type values we run
AVAILABLE = {"pretrain_teacher": "stages.pretrain_teacher", "init_student": "stages.init_student",
             "distill": "stages.distill", "evaluate": "stages.evaluate"}


def parse(argv):
    ap = argparse.ArgumentParser(prog="./launch.sh CONFIG")
    ap.add_argument("config")
    ap.add_argument("--stages", help="comma-separated subset of: " + ",".join(STAGES))
    ap.add_argument("--num-processes", type=int, default=1)
    ap.add_argument("--accelerate-config")
    ap.add_argument("--dry-run", action="store_true")
    ap.add_argument("--force", action="store_true")
    ap.add_argument("overrides", nargs="*")
    return parse_with_overrides(ap, argv)


def accelerate_backend(config_file: str) -> tuple[str, int]:
    """`distributed_type` of an accelerate config file (MULTI_GPU, DEEPSPEED, FSDP, ...) and its ZeRO
    stage (0 unless DeepSpeed)."""
    path = Path(config_file)
    if not path.is_file():
        raise FileNotFoundError(f"--accelerate-config: file not found: {path}")
    try:
        conf = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"--accelerate-config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    kind = str(conf.get("distributed_type", "")).upper()
    if kind not in BACKENDS:
        raise ConfigError(f"--accelerate-config {path}: distributed_type must be one of {', '.join(BACKENDS)}, "
                          f"got '{conf.get('distributed_type')}'")
    zero = int((conf.get("deepspeed_config") or {}).get("zero_stage", 2)) if kind == "DEEPSPEED" else 0
    if zero not in (0, 1, 2, 3):
        raise ConfigError(f"--accelerate-config {path}: deepspeed_config.zero_stage must be 0..3")
    return kind, zero


def accelerate_command(num_processes: int, config_file: str | None, backend: str | None) -> tuple[list, dict]:
    """The `accelerate launch` command line and environment for `num_processes` processes.

    On a machine without a GPU: plain `accelerate launch --num_processes N` silently starts one
    process, so DDP goes through `--multi_gpu` with `ACCELERATE_USE_CPU=1` (gloo); DeepSpeed must not
    see `ACCELERATE_USE_CPU` (it gets gloo from `make_accelerator`); FSDP does not engage on a CPU.
    """
    env = dict(os.environ, CVD_PLAN_PRINTED="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(num_processes),
           "--num_machines", "1", "--main_process_port", str(free_port())]
    if config_file:
        cmd += ["--config_file", config_file]
    gpu = torch.cuda.is_available()
    if backend in (None, "MULTI_GPU", "MULTI_CPU", "NO") and num_processes > 1:
        cmd += ["--multi_gpu"]
    if not gpu:
        if backend == "FSDP":
            raise ConfigError("FSDP runs on GPUs only (accelerate does not engage it on a CPU); "
                              "use configs/accelerate/ddp.yaml or deepspeed_zero2.yaml here")
        if backend == "DEEPSPEED":
            env.pop("ACCELERATE_USE_CPU", None)
        else:
            env["ACCELERATE_USE_CPU"] = "1"
    return cmd, env


def free_port() -> int:
    """A TCP port nobody listens on (so two runs on one machine do not collide)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


def memory_estimate(cfg: Config, stage: str, ms: dict | None = None, num_processes: int = 1, backend: str | None = None,
                    stage_zero: int = 0) -> memory.MemoryEstimate:
    """The per-device memory estimate of a training stage (`pipeline/training/memory.py`); `ms`: `model_summary(cfg)`."""
    ms = ms or model_summary(cfg)
    shape = memory.Shape(ms["parameters"], ms["dim"], ms["ffn"], ms["layers"], ms["tokens_per_frame"], cfg.data.frames,
                         cfg.data.frames_per_chunk)
    return memory.estimate_config(cfg, stage, shape, backend or "DDP", stage_zero, num_processes,
                                  bf16=mixed_precision(cfg) == "bf16", masked=masked_attention(cfg))


def memory_line(cfg: Config, stage: str, ms: dict, num_processes: int, backend: str | None, stage_zero: int) -> str:
    return f"  memory: {memory_estimate(cfg, stage, ms, num_processes, backend, stage_zero).line()}"


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


def exit_worker() -> None:
    """End a process started by `accelerate launch` once its stages have finished and written everything
    (each stage's `end_training` closed its trackers and process group). Without a GPU, tearing down
    gloo's threads at interpreter shutdown aborts now and then ("terminate called without an active
    exception", SIGABRT, about one 2-process run in ten here), which would fail a run that succeeded;
    so the worker leaves without that teardown."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(argv=None) -> int:
    args = parse(argv if argv is not None else sys.argv[1:])
    lock = None
    try:
        cfg = load_config(args.config, args.overrides)
        stages = args.stages.split(",") if args.stages else list(cfg.run.stages)
        for s in stages:
            if s not in STAGES:
                raise ConfigError(f"--stages: unknown stage '{s}' (stages: {', '.join(STAGES)})")
        child = "LOCAL_RANK" in os.environ  # started by accelerate launch (below)
        backend, zero = accelerate_backend(args.accelerate_config) if args.accelerate_config else (None, 0)
        if not child or (os.environ["LOCAL_RANK"] == "0" and "CVD_PLAN_PRINTED" not in os.environ):
            print(plan(cfg, stages, args.num_processes, backend, zero))
        if args.dry_run:
            return 0
        argv = argv if argv is not None else sys.argv[1:]
        if int(os.environ.get("RANK", "0")) == 0:  # one command at a time per run directory (pipeline/io/guard.py);
            # the processes `accelerate launch` starts below find it held by this one (CVD_LOCKS) and go on
            lock = lock_run_dir(cfg, stages, f"./launch.sh {shlex.join(argv)}")
        if (args.num_processes > 1 or args.accelerate_config) and not child:
            cmd, env = accelerate_command(args.num_processes, args.accelerate_config, backend)
            env = lock.env(env) if lock is not None else env
            return subprocess.call([*cmd, "-m", "stages.launch", *argv], env=env)
        import importlib

        for s in stages:
            if s == "evaluate" and int(os.environ.get("RANK", "0")) != 0:
                continue  # sampling and scoring run on the main process; the others would write the same files
            importlib.import_module(AVAILABLE[s]).run(cfg, force=args.force)
        if child:
            if lock is not None:
                lock.release()
            exit_worker()
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if lock is not None:
            lock.release()
    return 0


if __name__ == "__main__":
    sys.exit(main())
