"""The evaluate stage: one report over every model of a run, numbers equal to the checker's."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

from pipeline.config import ConfigError, load_config
from pipeline.evaluation.checker import score
from pipeline.training.checkpoint import read_safetensors
from pipeline.evaluation.metrics import quality, video_features
from pipeline.data.sprites import SpritesStream, balanced_labels
from stages import evaluate

from tests.conftest import copy_stages, tiny_cfg

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
STAGES = ("pretrain_teacher", "init_student", "distill")


@pytest.fixture(scope="module")
def evaluated(distill_stage, tmp_path_factory):
    """teacher, init_student and distill copied into a fresh run, then evaluated."""
    cfg, distill_path = distill_stage
    run = copy_stages(distill_path.parent, tmp_path_factory.mktemp("eval") / "run", STAGES)
    # a bare diffusers folder as an extra model: sampled with the run's student sampler
    cfg = tiny_cfg(run.parent, "model.prediction=x0", f"evaluate.extra={{raw: {run / 'distill' / 'transformer'}}}")
    stage = evaluate.run(cfg)
    return cfg, stage.path, json.loads((stage.path / "report.json").read_text())


def test_report_covers_every_model_with_samples_plots_and_table(evaluated):
    cfg, path, report = evaluated
    models = ["teacher", "teacher_few_step", "student_init", "student", "raw"]
    assert list(report["models"]) == models
    assert report["models"]["raw"]["sampler"]["denoising_steps"] == list(cfg.student.denoising_steps)
    st = report["settings"]
    assert (st["frames"], st["long_frames"], st["num_videos"]) == (6, 12, 6)
    md = (path / "report.md").read_text()
    for name in models + ["real"]:
        assert f"| {name} |" in md
    for plot in ("drift", "modes", "speed_quality"):
        png = path / "plots" / f"{plot}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    labels = None
    for name in models:
        m = report["models"][name]
        short, long = read_safetensors(path / m["samples"]["frames"]), read_safetensors(path / m["samples"]["long"])
        assert short["videos"].shape == (6, 6, 3, 16, 16) and short["videos"].dtype == torch.float32
        assert long["videos"].shape == (6, 12, 3, 16, 16)
        assert short["videos"].abs().max() <= 1
        assert torch.equal(short["labels"], balanced_labels(6))  # the same balanced labels for every model
        assert torch.equal(short["videos"], long["videos"][:, :6])  # causal samplers: the prefix
        assert (path / m["samples"]["frames"]).with_suffix(".gif").is_file()
        s = m["speed"]
        assert s["frames_per_s"] > 0 and s["first_chunk_s"] <= s["seconds"]
        labels = short["labels"]
    assert report["models"]["teacher"]["sampler"]["kind"] == "autoregressive"
    assert report["models"]["teacher_few_step"]["sampler"]["kind"] == "few_step"
    # network evaluations per frame over 4 chunks: teacher `steps` Euler calls per chunk + 3 cache writes, each
    # on a guided (2x) batch; students 4 calls per chunk + 3 writes
    sp = cfg.pretrain_teacher.sampler
    calls = (sp.steps + 2 * sp.lag) * 4 + 3
    assert report["models"]["teacher"]["speed"]["nfe_per_frame"] == pytest.approx(calls / 4 * (sp.guidance != 1 and 2 or 1))
    assert report["models"]["student"]["speed"]["nfe_per_frame"] == pytest.approx((4 * 4 + 3) / 4)
    assert labels is not None
    man = json.loads((path / "manifest.json").read_text())
    assert man["status"] == "done" and set(man["metrics"]) == set(models)
    assert set(man["inputs"]) == set(models)


def test_report_numbers_are_the_checkers_on_the_samples_files(evaluated):
    cfg, path, report = evaluated
    ev = cfg.evaluate
    ref = SpritesStream(cfg.data.size, 12, ev.real_seed).next_batch(ev.real_videos)["videos"]
    for name, m in report["models"].items():
        for key, frames in (("frames", 6), ("long", 12)):
            data = read_safetensors(path / m["samples"][key])
            checker = score(data["videos"], data["labels"])
            for k, v in checker.items():
                assert m[key][k] == v, (name, key, k)
            ours = quality(data["videos"], data["labels"], video_features(ref[:, :frames]))
            assert m[key]["frechet"] == pytest.approx(ours["frechet"]) and m[key] == json.loads(json.dumps(ours))


def test_rerun_skips_and_resume_reuses_finished_models(evaluated, capsys):
    cfg, path, report = evaluated
    evaluate.run(cfg)
    assert "done already" in capsys.readouterr().out
    # an interrupted stage: manifest back to running, one model's record lost
    man = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**man, "status": "running"}))
    (path / "samples" / "student.json").unlink()
    before = (path / "samples" / "teacher.safetensors").stat().st_mtime_ns
    evaluate.run(cfg)
    out = capsys.readouterr().out
    assert "teacher: done already" in out and "student: 6 videos" in out
    assert (path / "samples" / "teacher.safetensors").stat().st_mtime_ns == before
    again = json.loads((path / "report.json").read_text())
    for name in report["models"]:  # same seed, same numbers (speed aside)
        assert again["models"][name]["frames"] == report["models"][name]["frames"]


def test_a_new_extra_model_extends_the_finished_report(evaluated, tmp_path, capsys):
    cfg, path, report = evaluated
    run = copy_stages(path.parent, tmp_path / "run", (*STAGES, "evaluate"))
    stamps = {p.name: p.stat().st_mtime_ns for p in (run / "evaluate" / "samples").glob("*.safetensors")}
    extra = {**cfg.evaluate.extra, "raw2": str(run / "init_student" / "transformer")}
    again = tiny_cfg(run.parent, "model.prediction=x0", f"evaluate.extra={json.dumps(extra)}")
    capsys.readouterr()
    evaluate.run(again)
    out = capsys.readouterr().out
    assert "extending the finished" in out and "raw2" in out.split("extending")[1].splitlines()[0]
    assert re.findall(r"\[evaluate\] (\w+): \d+ videos", out) == ["raw2"]  # only the new model is sampled
    assert {p.name: p.stat().st_mtime_ns for p in (run / "evaluate" / "samples").glob("*.safetensors")
            if p.name in stamps} == stamps
    extended = json.loads((run / "evaluate" / "report.json").read_text())
    assert list(extended["models"]) == [*report["models"], "raw2"]
    for name in report["models"]:
        assert extended["models"][name]["frames"] == report["models"][name]["frames"], name
    evaluate.run(again)  # every model asked for is scored: nothing to do
    assert "done already" in capsys.readouterr().out


def test_switch_at_scores_prompt_switching_as_the_benchmark_does(distill_stage, tmp_path):
    """`evaluate.switch_at`: every causal model's switched rollouts, kept and re-cached, scored in the report with
    the same numbers as `benchmarks/prompt_switch.py` (its own sampling call) gives for that model."""
    from benchmarks.prompt_switch import measure
    from pipeline.evaluation.switching import SWITCH_KEYS
    _, distill_path = distill_stage
    run = copy_stages(distill_path.parent, tmp_path / "run", STAGES)
    cfg = tiny_cfg(tmp_path, "model.prediction=x0", "evaluate.models=[teacher,student]", "evaluate.switch_at=7")
    path = evaluate.run(cfg).path
    report = json.loads((path / "report.json").read_text())
    assert report["settings"]["switch_at"] == 7
    with torch.no_grad():
        for policy, recache in (("kept", False), ("recache", True)):
            bench = measure(str(run / "distill"), frames=12, switch_at=7, videos=6, seed=0, recache=recache)
            assert report["models"]["student"]["switch"][policy] == {k: bench[k] for k in SWITCH_KEYS}
    assert set(report["models"]["teacher"]["switch"]) == {"kept", "recache"}
    md = (path / "report.md").read_text()
    assert "## Prompt switching: class c → (c + 1) mod 6 at frame 7" in md and "| student | recache |" in md
    with pytest.raises(ConfigError, match="evaluate.switch_at \\(12\\) must fall inside"):
        tiny_cfg(tmp_path, "evaluate.switch_at=12")


def test_missing_models_are_skipped_and_bad_extra_is_one_line_error(trained_stage, tmp_path, capsys, monkeypatch):
    cfg, teacher_path = trained_stage
    run = tmp_path / "run"
    shutil.copytree(teacher_path, run / "pretrain_teacher")
    cfg = tiny_cfg(tmp_path, "model.prediction=x0", "evaluate.models=[teacher,student_init]",
                   "evaluate.benchmarks=[dmd_step_cost]")
    ran = []

    def fake_run(bench_cfg, **kw):  # the benchmark itself is run by hand, not in the suite
        ran.append((os.getpid(), bench_cfg, kw))
        print("ratio 3.4 (limit 3)")
        return {"ratio": 3.4, "passed": False}

    def no_subprocess(*a, **kw):
        raise AssertionError("evaluate runs the benchmarks in its own process")

    from benchmarks import dmd_step_cost
    monkeypatch.setattr(dmd_step_cost, "run", fake_run)
    monkeypatch.setattr(subprocess, "Popen", no_subprocess)  # subprocess.run/call/check_output all go through it
    stage = evaluate.run(cfg)
    monkeypatch.undo()
    assert "skipping student_init" in capsys.readouterr().out
    report = json.loads((stage.path / "report.json").read_text())
    assert list(report["models"]) == ["teacher"]
    # called once, in this process, on the stage's resolved config; the report names the command that reruns it
    assert len(ran) == 1 and ran[0][0] == os.getpid() and ran[0][2] == {}
    assert ran[0][1] == load_config(stage.path / "config.yaml")
    command = report["benchmarks"]["dmd_step_cost"]["command"].split()
    assert command[0] == "python" and command[1].endswith("benchmarks/dmd_step_cost.py")
    assert command[2:] == ["--config", str(stage.path / "config.yaml")]
    assert report["benchmarks"]["dmd_step_cost"]["exit_status"] == 1
    text = (stage.path / "benchmarks" / "dmd_step_cost.txt").read_text()  # what it printed, then its time
    assert re.fullmatch(r"ratio 3\.4 \(limit 3\)\n\(\d+ s\)\n", text), text
    assert "## Benchmark `dmd_step_cost`: goal missed" in (stage.path / "report.md").read_text()
    proc = subprocess.run([sys.executable, "-m", "stages.evaluate", "--config", str(ROOT / "configs/tiny.yaml"),
                           f"run.dir={tmp_path / 'other'}", f"evaluate.extra={{dfdmd: {tmp_path / 'nope'}}}"],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: evaluate.extra.dfdmd: {tmp_path / 'nope'} not found"]


def test_evaluate_config_errors(make_cfg):
    from pipeline.config import ConfigError
    with pytest.raises(ConfigError, match="evaluate.models: unknown model 'studnet'"):
        make_cfg("evaluate.models=[teacher,studnet]")
    with pytest.raises(ConfigError, match="evaluate.extra: 'student'"):
        make_cfg("evaluate.extra={student: x}")
    with pytest.raises(ConfigError, match="evaluate.benchmarks: unknown benchmark 'flops'"):
        make_cfg("evaluate.benchmarks=[flops]")
    with pytest.raises(ConfigError, match="evaluate: num_videos"):
        make_cfg("evaluate.num_videos=1")


def test_benchmarks_run_in_process_with_the_scripts_exit_status():
    """`benchmarks/suite.py: run_captured` gives what the script would have: its printed text, exit status 0/1 by
    `passed`, 2 for options it cannot run with, 1 and the traceback for a crash; the caller's grad mode and global
    random state are as before."""
    from benchmarks.common import BenchmarkArgError
    from benchmarks.suite import run_captured

    def draws_and_disables_grad(passed):
        def fn():
            torch.manual_seed(123)
            torch.set_grad_enabled(False)
            print("figures")
            return {"passed": passed}
        return fn

    def bad_options():
        raise BenchmarkArgError("--window must hold whole chunks")

    def crash():
        raise RuntimeError("boom")

    torch.manual_seed(0)
    state = torch.get_rng_state()
    with torch.no_grad():
        for passed, status in ((True, 0), (False, 1)):
            got, text = run_captured(draws_and_disables_grad(passed))
            assert got == status and text.startswith("figures\n")
            assert not torch.is_grad_enabled()
    assert torch.is_grad_enabled() and torch.equal(torch.get_rng_state(), state)
    got, text = run_captured(bad_options)
    assert got == 2 and "error: --window must hold whole chunks" in text
    got, text = run_captured(crash)
    assert got == 1 and "RuntimeError: boom" in text and "Traceback" in text
