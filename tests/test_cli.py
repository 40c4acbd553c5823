"""Command lines: `python -m stages.launch` (plan, config errors, stage selection) and `stages.sample`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from pipeline.models.causal_wan import build_transformer
from pipeline.config import load_config
from pipeline.data.sprites import NUM_CLASSES
from stages import launch, sample
from pipeline.models.loading import load_source
from tests.conftest import TINY_OVERRIDES

REPO = Path(__file__).resolve().parents[1]
TINY_YAML = REPO / "configs" / "tiny.yaml"


def cli(*args, timeout=120):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def test_dry_run_prints_plan(tmp_path):
    run_dir = tmp_path / "r"
    r = cli("-m", "stages.launch", str(TINY_YAML), "--dry-run", f"run.dir={run_dir}")
    assert r.returncode == 0, r.stderr
    cfg = load_config(TINY_YAML, [f"run.dir={run_dir}"])
    with torch.device("meta"):
        params = sum(p.numel() for p in build_transformer(cfg.model).parameters())
    assert f"{params:,} parameters" in r.stdout
    assert f"run dir: {run_dir}" in r.stdout
    for s in cfg.run.stages:
        assert f"stage {s}: pending" in r.stdout
    assert f"steps={cfg.pretrain_teacher.steps}" in r.stdout
    assert f"student: {len(cfg.student.denoising_steps)} steps" in r.stdout
    assert not run_dir.exists(), "a dry run writes nothing"


def test_misspelt_key_one_line_error(tmp_path):
    r = cli("-m", "stages.launch", str(TINY_YAML), "--dry-run", f"run.dir={tmp_path}", "pretrain_teacher.stepz=3")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "'pretrain_teacher.stepz'" in lines[0] and "'pretrain_teacher.steps'" in lines[0]
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_unknown_stage_errors(tmp_path, capsys):
    rc = launch.main([str(TINY_YAML), "--dry-run", f"run.dir={tmp_path}", "--stages", "pretrain_teacher,distil"])
    err = capsys.readouterr().err
    assert rc != 0 and "unknown stage 'distil'" in err and len(err.strip().splitlines()) == 1
    rc = launch.main([str(TINY_YAML), "--dry-run", f"run.dir={tmp_path}", "--stages", "evaluate"])
    out = capsys.readouterr().out
    assert rc == 0 and "stage evaluate: pending models=teacher,teacher_few_step,student_init,student" in out
    rc = launch.main([str(TINY_YAML), "--dry-run", f"run.dir={tmp_path}", "run.stages=[bogus]"])
    assert rc != 0 and "bogus" in capsys.readouterr().err


def test_launch_runs_then_skips(tmp_path, capsys):
    argv = [str(TINY_YAML), *TINY_OVERRIDES, "pretrain_teacher.steps=2",
            "pretrain_teacher.preview_n=1", "pretrain_teacher.sampler.steps=1", f"run.dir={tmp_path / 'r'}"]
    assert launch.main(argv) == 0
    manifest = json.loads((tmp_path / "r" / "pretrain_teacher" / "manifest.json").read_text())
    assert manifest["status"] == "done" and manifest["metrics"]["steps"] == 2
    capsys.readouterr()
    assert launch.main(argv) == 0
    out = capsys.readouterr().out
    assert "stage pretrain_teacher: done" in out and "done already" in out


def test_sample_from_stage(trained_stage, tmp_path):
    cfg, stage_path = trained_stage
    out = tmp_path / "x.safetensors"
    r = cli("-m", "stages.sample", str(stage_path), "--out", str(out), "--n", "12", "--frames", "6", "--steps", "2")
    assert r.returncode == 0, r.stderr
    t = load_file(str(out))
    s = cfg.data.size
    assert t["videos"].dtype == torch.float32 and t["videos"].shape == (12, 6, 3, s, s)
    assert t["videos"].min() >= -1 and t["videos"].max() <= 1
    assert t["videos"].std() > 0
    assert t["labels"].dtype == torch.int64 and t["labels"].shape == (12,)
    assert torch.bincount(t["labels"], minlength=NUM_CLASSES).tolist() == [12 // NUM_CLASSES] * NUM_CLASSES
    assert out.with_suffix(".gif").stat().st_size > 0
    # Seeded: the same call in-process reproduces the file; another seed differs.
    again = tmp_path / "y.safetensors"
    assert sample.main([str(stage_path), "--out", str(again), "--n", "12", "--frames", "6", "--steps", "2"]) == 0
    torch.testing.assert_close(load_file(str(again))["videos"], t["videos"], atol=1e-5, rtol=0)
    other = tmp_path / "z.safetensors"
    assert sample.main([str(stage_path), "--out", str(other), "--n", "12", "--frames", "6", "--steps", "2",
                        "--seed", "1"]) == 0
    assert (load_file(str(other))["videos"] - t["videos"]).abs().max() > 1e-3
    # --lag: the stage's own lag reproduces the file, another lag (frames of a chunk staggered otherwise) does not
    lag = cfg.pretrain_teacher.sampler.lag
    for value, same in ((lag, True), (lag + 1, False)):
        path = tmp_path / f"lag{value}.safetensors"
        assert sample.main([str(stage_path), "--out", str(path), "--n", "12", "--frames", "6", "--steps", "2",
                            "--lag", str(value)]) == 0
        assert torch.allclose(load_file(str(path))["videos"], t["videos"], atol=1e-5, rtol=0) == same, value


def test_sample_precision(trained_stage, tmp_path):
    """`--precision bf16`: the transformer computes in bf16 (its matmul weights held in bf16, its calls under
    autocast; the sampler's arithmetic in fp32): the videos of fp32 up to bf16's rounding, not its bits. The
    default on a CPU (`run.mixed_precision: auto`) is fp32, as `--precision no`."""
    _, stage_path = trained_stage
    videos = {}
    for p in (None, "no", "bf16"):
        out = tmp_path / f"{p}.safetensors"
        assert sample.main([str(stage_path), "--out", str(out), "--n", "6", "--frames", "6", "--steps", "2",
                            *(["--precision", p] if p else [])]) == 0
        videos[p] = load_file(str(out))["videos"]
    assert torch.equal(videos[None], videos["no"])
    diff = (videos["bf16"] - videos["no"]).abs()
    assert diff.max() > 0 and diff.mean() < 0.05, (diff.max(), diff.mean())


def test_sample_static_cache_and_compile(trained_stage, tmp_path, capsys):
    """`--kv-cache static --compile`: the static cache, its repeated calls (the first chunk's after its first)
    through the compiled network (regional torch.compile; CUDA graphs only on CUDA), gives the reference cache's
    videos; `--kv-cache dynamic` is the CPU default's bits."""
    from torch._dynamo.utils import counters

    _, stage_path = trained_stage
    videos = {}
    for name, extra in (("default", []), ("dynamic", ["--kv-cache", "dynamic"]),
                        ("compiled", ["--kv-cache", "static", "--compile"])):
        out = tmp_path / f"{name}.safetensors"
        counters.clear()
        assert sample.main([str(stage_path), "--out", str(out), "--n", "6", "--frames", "6", "--steps", "2",
                            *extra]) == 0
        videos[name] = load_file(str(out))["videos"]
    assert counters["stats"]["unique_graphs"] >= 1  # the compiled step ran
    assert torch.equal(videos["default"], videos["dynamic"])
    torch.testing.assert_close(videos["compiled"], videos["dynamic"], atol=1e-4, rtol=0)
    # on a CPU the default cache is the reference one: --compile alone says it does nothing
    assert sample.main([str(stage_path), "--out", str(tmp_path / "c.safetensors"), "--n", "6", "--frames", "6",
                        "--steps", "2", "--compile"]) == 0
    assert "--compile does nothing here" in capsys.readouterr().err


def test_sample_missing_source_keeps_existing_output(tmp_path):
    out = tmp_path / "keep.safetensors"
    out.write_bytes(b"precious")
    r = cli("-m", "stages.sample", str(tmp_path / "nope"), "--out", str(out), "--n", "6")
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "nope" in lines[0], r.stderr
    assert out.read_bytes() == b"precious"


def test_sample_other_failures_keep_existing_output(trained_stage, tmp_path, capsys):
    _, stage_path = trained_stage
    out = tmp_path / "keep.safetensors"
    out.write_bytes(b"precious")
    gif = out.with_suffix(".gif")
    gif.write_bytes(b"gif")
    # frames not a multiple of frames_per_chunk
    assert sample.main([str(stage_path), "--out", str(out), "--n", "6", "--frames", "5", "--steps", "1"]) != 0
    assert "frames" in capsys.readouterr().err
    # a folder that is neither a stage nor a model
    (tmp_path / "empty").mkdir()
    assert sample.main([str(tmp_path / "empty"), "--out", str(out), "--n", "6"]) != 0
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "not a stage folder" in err
    # a stage folder without finished weights
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "manifest.json").write_text('{"status": "running"}')
    assert sample.main([str(unfinished), "--out", str(out), "--n", "6"]) != 0
    assert "has not finished" in capsys.readouterr().err
    # wrong output suffix
    assert sample.main([str(stage_path), "--out", str(tmp_path / "x.pt"), "--n", "6"]) != 0
    assert ".safetensors" in capsys.readouterr().err
    assert out.read_bytes() == b"precious" and gif.read_bytes() == b"gif"


def test_diffusers_folder_records_prediction(trained_stage):
    """A bare diffusers folder written by the stage says what the network outputs (x0 or flow)."""
    cfg, stage_path = trained_stage
    for name in ("transformer", "transformer_ema"):
        record = json.loads((stage_path / name / "sampling.json").read_text())
        assert record["config"]["model"]["prediction"] == cfg.model.prediction
        _, _, folder_cfg = load_source(str(stage_path / name))
        assert folder_cfg.model.prediction == cfg.model.prediction


def test_wan_recipe_dry_run_names_missing_paths_and_memory():
    """The Wan2.1-T2V-1.3B recipe validates and plans without any weights: it names every missing local
    path and prints a per-GPU memory estimate per stage and backend."""
    for name, stages in (("teacher.yaml", ["pretrain_teacher"]), ("student.yaml", ["init_student", "distill"])):
        path = REPO / "configs" / "wan2.1-t2v-1.3b" / name
        r = cli("-m", "stages.launch", str(path), "--dry-run", "--num-processes", "8", "--accelerate-config",
                str(REPO / "configs" / "accelerate" / "deepspeed_zero2.yaml"))
        assert r.returncode == 0, r.stderr
        assert "processes: 8 (DEEPSPEED, ZeRO-2)" in r.stdout and "1,418,996,800 parameters" in r.stdout  # Wan2.1-1.3B
        assert "missing local paths: model.pretrained=/path/to/" in r.stdout and "data.path=/path/to/" in r.stdout
        assert "latent [16, 21, 60, 104], 1560 tokens/frame" in r.stdout
        for s in stages:
            assert f"stage {s}: pending" in r.stdout
        assert r.stdout.count("GiB per device") == len(stages)
