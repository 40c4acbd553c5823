"""`stages/matrix.py`: seed 002's method × loss matrix, end to end at tiny scale (the measured one is in the
README)."""

from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

from stages import matrix
from conftest import TINY_OVERRIDES


def test_matrix_trains_scores_and_resumes(student_stage, tmp_path, capsys):
    cfg, _ = student_stage
    base, out = Path(cfg.run.dir), tmp_path / "m"
    args = ["--base", str(base), "--out", str(out), "--cells", "df_l2,df_l2_4step,tf_l2,sf_gan,sf_dmd_gan",
            "--steps", "2", "--tf-steps", "2", "--videos", "6", "--seeds", "0,1", *TINY_OVERRIDES]
    assert matrix.main(args) == 0
    result = json.loads((out / "matrix.json").read_text())
    assert set(result["cells"]) == {"df_l2", "df_l2_4step", "tf_l2", "sf_gan", "sf_dmd_gan"}
    for cell, r in result["cells"].items():
        assert 0 <= r["valid_0_11"] <= 1 and 0 <= r["mode_cells"] <= 1 and 0 <= r["mode_tv_to_data"] <= 1, cell
        assert "lawful_0_11_spread" in r and math.isfinite(r["frames_per_s"])
    assert (out / "matrix.png").stat().st_size > 0 and "| sf_gan | expected JSD" in (out / "matrix.md").read_text()
    manifest = json.loads((out / "sf_gan" / "distill" / "manifest.json").read_text())
    assert manifest["metrics"]["method"] == "sf_gan" and manifest["metrics"]["steps"] == 2
    before = (out / "sf_gan" / "distill" / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert matrix.main(args) == 0  # everything done: nothing trained again
    after = (out / "sf_gan" / "distill" / "transformer" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert before == after


def test_matrix_refuses_a_base_without_its_stages(tmp_path, capsys):
    assert matrix.main(["--base", str(tmp_path), "--out", str(tmp_path / "m"), *TINY_OVERRIDES]) == 2
    assert "stage pretrain_teacher has not finished" in capsys.readouterr().err


def test_matrix_bad_options_are_one_line(student_stage, tmp_path, capsys):
    cfg, _ = student_stage
    common = ["--base", cfg.run.dir, "--out", str(tmp_path / "m"), *TINY_OVERRIDES]
    for extra, needle in ((["--seeds", "0,x"], "--seeds '0,x': need integers"), (["--jobs", "0"], "--jobs 0: must be")):
        assert matrix.main([*common, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"error: {needle}") and len(err.splitlines()) == 1
    assert not (tmp_path / "m").exists()


def test_matrix_evaluates_again_when_a_cell_is_added(student_stage, tmp_path):
    cfg, _ = student_stage
    base, out = Path(cfg.run.dir), tmp_path / "m"
    common = ["--base", str(base), "--out", str(out), "--steps", "2", "--videos", "6", "--seeds", "0", *TINY_OVERRIDES]
    assert matrix.main([*common, "--cells", "df_l2"]) == 0
    samples = out / "eval_seed0" / "evaluate" / "samples"
    teacher = (samples / "teacher_long.safetensors").stat().st_mtime_ns
    first = json.loads((out / "matrix.json").read_text())["cells"]["df_l2"]
    assert matrix.main([*common, "--cells", "df_l2,sf_gan"]) == 0
    result = json.loads((out / "matrix.json").read_text())["cells"]
    assert set(result) == {"df_l2", "sf_gan"}
    # the added cell is sampled alone: the teacher's samples and numbers are the first run's
    assert (samples / "teacher_long.safetensors").stat().st_mtime_ns == teacher
    assert {k: v for k, v in result["df_l2"].items() if k != "frames_per_s"} == \
        {k: v for k, v in first.items() if k != "frames_per_s"}
    assert matrix.main([*common, "--cells", "df_l2,sf_dmd"]) == 0  # sf_gan stays in the seed's report
    models = json.loads((samples.parent / "report.json").read_text())["models"]
    assert {"sf_gan", "sf_dmd"} <= set(models)


def test_matrix_jobs_run_cells_and_seeds_in_processes(student_stage, tmp_path):
    cfg, _ = student_stage
    base, out = Path(cfg.run.dir), tmp_path / "m"
    common = ["--base", str(base), "--out", str(out), "--cells", "df_l2,sf_gan,df_dmd", "--steps", "2",
              "--videos", "4", "--seeds", "0,1", *TINY_OVERRIDES]
    assert matrix.main([*common, "--jobs", "2"]) == 0
    assert {p.name for p in (out / "logs").iterdir()} == {"sf_gan.log", "df_dmd.log", "eval_seed0.log",
                                                          "eval_seed1.log"}
    parallel = json.loads((out / "matrix.json").read_text())
    assert set(parallel["by_seed"]) == {"0", "1"} and set(parallel["cells"]) == {"df_l2", "sf_gan", "df_dmd"}
    weights = out / "df_dmd" / "distill" / "transformer" / "diffusion_pytorch_model.safetensors"
    before = weights.stat().st_mtime_ns
    assert matrix.main(common) == 0  # one process finds every part done: same numbers, nothing retrained
    assert json.loads((out / "matrix.json").read_text()) == parallel and weights.stat().st_mtime_ns == before


def test_matrix_names_a_failed_part(student_stage, tmp_path, capsys, monkeypatch):
    cfg, _ = student_stage

    def child(cmd, stdout, **kw):  # a child that stops on bad input: its one line reaches the parent's error
        stdout.write("progress...\nerror: distill.steps: boom\n")
        return subprocess.CompletedProcess(cmd, 2 if "sf_gan" in cmd else 0)

    monkeypatch.setattr(matrix.subprocess, "run", child)
    args = ["--base", cfg.run.dir, "--out", str(tmp_path / "m"), "--cells", "df_dmd,sf_gan", "--jobs", "2",
            *TINY_OVERRIDES]
    assert matrix.main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: matrix part sf_gan failed (exit 2;") and err.endswith("error: distill.steps: boom")
    assert not (tmp_path / "m" / "matrix.json").exists()
