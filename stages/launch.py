"""`./launch.sh CONFIG [--stages ...] [--num-processes N] [--accelerate-config F] [--dry-run] [--force] [k=v ...]`

Validates the config, prints the plan, then runs the selected stages in order; stages already done are
skipped (`--force` reruns them), an interrupted stage resumes from its last checkpoint. The run directory is
locked for the whole command (`pipeline/io/guard.py`: a second command on it refuses, naming this one); with
`--num-processes N` this process holds the lock and the workers it starts run under it.
"""

from __future__ import annotations

import argparse
import os
import shlex
import socket
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from pipeline.cli import parse_with_overrides, run_command
from pipeline.config import STAGES, ConfigError, load_config
from pipeline.methods.distillation import check_zero_stage
from pipeline.plan import plan
from pipeline.training.distributed import deepspeed_file, offloaded, zero_settings
from pipeline.training.memory import DeepSpeed
from pipeline.training.stage_io import lock_run_dir

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


def accelerate_backend(config_file: str) -> tuple[str, int, DeepSpeed]:
    """`distributed_type` of an accelerate config file (MULTI_GPU, DEEPSPEED, FSDP, ...), its ZeRO
    stage (0 unless DeepSpeed) and its DeepSpeed offload and reduce bucket (from its `deepspeed_config_file`, if
    it names one)."""
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
    if kind != "DEEPSPEED":
        return kind, 0, DeepSpeed()
    ds = conf.get("deepspeed_config") or {}
    if ds.get("deepspeed_config_file"):
        return (kind, *zero_settings(deepspeed_file(ds["deepspeed_config_file"])))
    zero = int(ds.get("zero_stage", 2))
    if zero not in (0, 1, 2, 3):
        raise ConfigError(f"--accelerate-config {path}: deepspeed_config.zero_stage must be 0..3")
    return kind, zero, DeepSpeed(offload=offloaded(ds.get("offload_optimizer_device"), ds.get("offload_param_device")))


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
    line = argv if argv is not None else sys.argv[1:]

    def body() -> int:
        lock = None
        try:
            cfg = load_config(args.config, args.overrides)
            stages = args.stages.split(",") if args.stages else list(cfg.run.stages)
            for s in stages:
                if s not in STAGES:
                    raise ConfigError(f"--stages: unknown stage '{s}' (stages: {', '.join(STAGES)})")
            child = "LOCAL_RANK" in os.environ  # started by accelerate launch (below)
            backend, zero, deepspeed = (accelerate_backend(args.accelerate_config) if args.accelerate_config
                                        else (None, 0, DeepSpeed()))
            if "distill" in stages and backend == "DEEPSPEED":  # before the processes start: one line, exit 2
                check_zero_stage(cfg.distill, zero)
            if not child or (os.environ["LOCAL_RANK"] == "0" and "CVD_PLAN_PRINTED" not in os.environ):
                print(plan(cfg, stages, args.num_processes, backend, zero, deepspeed))
            if args.dry_run:
                return 0
            if int(os.environ.get("RANK", "0")) == 0:  # one command at a time per run directory (pipeline/io/guard.py);
                # the processes `accelerate launch` starts below find it held by this one (CVD_LOCKS) and go on
                lock = lock_run_dir(cfg, stages, f"./launch.sh {shlex.join(line)}")
            if (args.num_processes > 1 or args.accelerate_config) and not child:
                cmd, env = accelerate_command(args.num_processes, args.accelerate_config, backend)
                env = lock.env(env) if lock is not None else env
                return subprocess.call([*cmd, "-m", "stages.launch", *line], env=env)
            import importlib

            for s in stages:
                if s == "evaluate" and int(os.environ.get("RANK", "0")) != 0:
                    continue  # sampling and scoring run on the main process; the others would write the same files
                importlib.import_module(AVAILABLE[s]).run(cfg, force=args.force)
            if child:
                if lock is not None:
                    lock.release()
                exit_worker()
            return 0
        finally:
            if lock is not None:
                lock.release()

    return run_command(body)


if __name__ == "__main__":
    sys.exit(main())
