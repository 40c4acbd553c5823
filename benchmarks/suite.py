"""The benchmarks the evaluate stage runs on request (`evaluate.benchmarks`, names in `pipeline.config.BENCHMARKS`),
called in this process through each script's `run(...)`.

Model-specific ones (stream_cost, forward_flops) measure `student` (the distilled student, else student_init),
or random weights of the stage's config; the others take the stage's resolved config (`<stage>/config.yaml`).
Each one's printed output is kept in `<stage>/benchmarks/<name>.txt`; the report records the command line that
reruns it by hand, its exit status (0 goal met, 1 goal missed or failed, 2 options it cannot run with) and the
last lines of its output.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import os
import sys
import time
import traceback
from pathlib import Path

import torch

from benchmarks.common import BenchmarkArgError, model_to_measure
from pipeline.config import load_config
from pipeline.io.run_dir import write_atomic

ROOT = Path(__file__).resolve().parents[1]
MODEL_BENCHMARKS = ("stream_cost", "forward_flops")  # these measure a model (a source, else the config's shape)


def _call(name: str, config: Path, student: Path | None) -> dict:
    """`benchmarks.<name>.run(...)` on what `run_benchmarks` gives it; returns its figures."""
    module = importlib.import_module(f"benchmarks.{name}")
    source = str(student) if student else None
    if name == "stream_cost":
        model, table, cfg = model_to_measure(source, str(config))
        return module.run(model, table, cfg)
    if name == "forward_flops":
        model, cfg = module.model_to_measure(source, str(config))
        return module.run(model, cfg)
    return module.run(load_config(config))


def run_captured(fn) -> tuple[int, str]:
    """Run a benchmark's `fn()` in this process as its script would run: grad mode on, the global random state
    and grad mode restored afterwards, stdout then stderr captured. Returns the exit status its script would
    give (0 / 1 by its `passed`, 1 on an exception, 2 on options it cannot run with) and the text."""
    out, err = io.StringIO(), io.StringIO()
    t0 = time.time()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), torch.random.fork_rng(), \
            torch.enable_grad():
        try:
            status = 0 if fn()["passed"] else 1
        except BenchmarkArgError as e:
            print(f"error: {e}", file=sys.stderr)
            status = 2
        except Exception:  # a benchmark that fails is reported, as a script's traceback was; the stage goes on
            traceback.print_exc()
            status = 1
        print(f"({time.time() - t0:.0f} s)")
    return status, out.getvalue() + err.getvalue()


def run_benchmarks(names: list[str], *, stage_path: Path, student: Path | None) -> dict:
    """Run `names` (scripts of `benchmarks/`) in this process for the stage at `stage_path` (its `config.yaml`)
    and `student`; keep each one's output in `<stage_path>/benchmarks/<name>.txt`. Returns the report's
    `benchmarks` section: `{name: {"command", "exit_status", "output": last 12 lines}}`."""
    config = Path(os.path.abspath(stage_path / "config.yaml"))
    folder = stage_path / "benchmarks"
    folder.mkdir(exist_ok=True)
    out = {}
    for name in names:
        model = [os.path.abspath(student)] if student and name in MODEL_BENCHMARKS else ["--config", str(config)]
        command = " ".join(["python", str(ROOT / "benchmarks" / f"{name}.py"), *model])
        print(f"[evaluate] benchmark: {command.removeprefix('python ')}")
        status, text = run_captured(lambda: _call(name, config, student))
        write_atomic(folder / f"{name}.txt", text)
        out[name] = {"command": command, "exit_status": status, "output": text.strip().splitlines()[-12:]}
    return out
