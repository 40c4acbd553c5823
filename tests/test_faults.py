"""Crash safety: a stage killed with SIGKILL (`CVD_FAULT`, pipeline/training/faults.py) mid-run or in the middle of
writing a checkpoint, then re-run with the same command, ends with weights bit-identical to an
uninterrupted run."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline.training.checkpoint import latest_checkpoint
from tests.conftest import TINY_OVERRIDES

REPO = Path(__file__).resolve().parents[1]
LONGER = ["pretrain_teacher.steps=6", "init_student.steps=6", "distill.steps=6", "pretrain_teacher.warmup_steps=4",
          "init_student.warmup_steps=4"]  # checkpoints every 2 steps (TINY_OVERRIDES)


def run_stage(run_dir: Path, stage: str, fault: str | None = None) -> subprocess.CompletedProcess:
    cfg = run_dir.parent / "empty.yaml"
    cfg.write_text("{}\n")
    env = {k: v for k, v in os.environ.items() if k != "CVD_FAULT"}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", **({"CVD_FAULT": fault} if fault else {}))
    return subprocess.run([sys.executable, "-m", "stages.launch", str(cfg), "--stages", stage, *TINY_OVERRIDES,
                           *LONGER, f"run.dir={run_dir}"], cwd=REPO, capture_output=True, text=True, env=env,
                          timeout=300)


def final_weights(run_dir: Path, stage: str) -> dict:
    parts = ["transformer", "transformer_ema"] + (["critic"] if stage == "distill" else [])
    return {p: load_file(str(run_dir / stage / p / "diffusion_pytorch_model.safetensors")) for p in parts}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Every training stage run without interruption."""
    run = tmp_path_factory.mktemp("ref") / "run"
    for stage in ("pretrain_teacher", "init_student", "distill"):
        r = run_stage(run, stage)
        assert r.returncode == 0, r.stderr[-3000:]
    return run


PREVIOUS = {"pretrain_teacher": [], "init_student": ["pretrain_teacher"], "distill": ["pretrain_teacher", "init_student"]}


@pytest.mark.parametrize("stage,fault", [("pretrain_teacher", "checkpoint:4"), ("pretrain_teacher", "step:3"),
                                         ("init_student", "checkpoint:4"), ("init_student", "step:3"),
                                         ("distill", "checkpoint:4"), ("distill", "step:5")])
def test_killed_stage_resumes_bit_identical(reference, tmp_path, stage, fault):
    run = tmp_path / "run"
    for prev in PREVIOUS[stage]:
        shutil.copytree(reference / prev, run / prev)
    killed = run_stage(run, stage, fault)
    assert killed.returncode == -9, killed.stderr[-2000:]  # SIGKILL: no cleanup ran
    path = run / stage
    assert json.loads((path / "manifest.json").read_text())["status"] == "running"
    assert not (path / "transformer").exists()
    step = int(fault.split(":")[1])
    if fault.startswith("checkpoint"):
        assert (path / "checkpoints" / f".tmp_step_{step:07d}").is_dir()  # the torn write is left aside ...
        assert json.loads((latest_checkpoint(path / "checkpoints") / "meta.json").read_text())["step"] == step - 2
    rerun = run_stage(run, stage)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"(step {step - 2 if fault.startswith('checkpoint') else step - step % 2})" in rerun.stdout  # ... not resumed
    ref, got = final_weights(reference, stage), final_weights(run, stage)
    for part in ref:
        assert all(torch.equal(ref[part][k], got[part][k]) for k in ref[part]), part
