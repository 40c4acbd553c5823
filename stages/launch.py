"""`./launch.sh CONFIG [--stages ...] [--num-processes N] [--accelerate-config F] [--dry-run] [--force] [k=v ...]`

Validates the config, prints the plan, then runs the selected stages in order; stages already done are
skipped (`--force` reruns them), an interrupted stage resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from pipeline.causal_wan import build_transformer
from pipeline.config import STAGES, Config, ConfigError, load_config
from pipeline.run_dir import StageDir
from pipeline.sampling import few_step_sigmas
from stages.common import USER_ERRORS, parse_with_overrides

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


def model_summary(cfg: Config) -> dict:
    """Parameter count and token shapes without allocating weights (meta device)."""
    if cfg.model.pretrained:
        conf = json.loads((Path(cfg.model.pretrained) / "config.json").read_text())
        params = "from " + cfg.model.pretrained
        patch = conf["patch_size"]
    else:
        with torch.device("meta"):
            m = build_transformer(cfg.model)
        params = sum(p.numel() for p in m.parameters())
        patch = cfg.model.patch_size
    s, f = cfg.data.size, cfg.data.frames
    tokens = (s // patch[1]) * (s // patch[2])
    return {"class": "CausalWanTransformer (diffusers WanTransformer3DModel)", "parameters": params,
            "latent": [cfg.model.in_channels, f, s, s], "tokens_per_frame": tokens, "sequence": tokens * f}


def plan(cfg: Config, stages: list[str]) -> str:
    lines = [f"run dir: {cfg.run.dir}", f"device: {'cuda' if torch.cuda.is_available() and cfg.run.device != 'cpu' else 'cpu'}"
             f" ({torch.cuda.device_count()} GPU visible)", f"data: {cfg.data.kind} size={cfg.data.size} "
             f"frames={cfg.data.frames} frames_per_chunk={cfg.data.frames_per_chunk}"]
    ms = model_summary(cfg)
    lines.append(f"model: {ms['class']}, {ms['parameters']:,} parameters, latent {ms['latent']}, "
                 f"{ms['tokens_per_frame']} tokens/frame, {ms['sequence']} tokens/clip"
                 if isinstance(ms["parameters"], int) else f"model: {ms['class']}, {ms['parameters']}")
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
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse(argv if argv is not None else sys.argv[1:])
    try:
        cfg = load_config(args.config, args.overrides)
        stages = args.stages.split(",") if args.stages else list(cfg.run.stages)
        for s in stages:
            if s not in STAGES:
                raise ConfigError(f"--stages: unknown stage '{s}' (stages: {', '.join(STAGES)})")
        print(plan(cfg, stages))
        if args.dry_run:
            return 0
        if args.num_processes > 1 and "LOCAL_RANK" not in os.environ:
            cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(args.num_processes)]
            if args.accelerate_config:
                cmd += ["--config_file", args.accelerate_config]
            cmd += ["-m", "stages.launch", *(argv if argv is not None else sys.argv[1:])]
            return subprocess.call(cmd)
        import importlib

        for s in stages:
            importlib.import_module(AVAILABLE[s]).run(cfg, force=args.force)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
