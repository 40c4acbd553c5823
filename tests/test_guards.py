"""Outputs are guarded, one command at a time per run directory / DEST, paths resolve where the user stands
(`pipeline/io/guard.py`; README "Reliability").

Every refusal is exit code 2 with one `error:` line naming the cause, and leaves every file that existed
before byte-identical (`snapshot`). Locks are held by a live helper process (`holder`) where a second full
run would only slow the suite down.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

from pipeline.io.convert import convert as convert_api
from pipeline.io.guard import Lock, LockedError
from stages import convert as convert_cli
from stages import launch, prepare_data
from stages import sample as sample_cli
from tests.conftest import TINY_OVERRIDES, assert_same_weights, call, one_error, weights

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def snapshot(root: Path) -> dict:
    """Every file under `root` with its bytes (symlinks as their target)."""
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def leftovers(folder: Path) -> list[str]:
    """Temporaries or lock files a command left behind."""
    return sorted(p.name for p in folder.rglob(".*") if p.name.startswith((".tmp-", ".old-")) or
                  p.name.endswith(".lock"))


@contextmanager
def holder(path: Path, command: str = "holder for a test"):
    """A live process holding the lock of `path` until the block ends; yields its pid."""
    code = ("import sys\nfrom pipeline.io.guard import Lock\nlock = Lock(sys.argv[1], sys.argv[2]).acquire()\n"
            "print('held', flush=True)\nsys.stdin.read()\nlock.release()\n")
    p = subprocess.Popen([sys.executable, "-c", code, str(path), command], cwd=REPO, env=ENV, text=True,
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    try:
        assert p.stdout.readline().strip() == "held"
        yield p.pid
    finally:
        p.stdin.close()
        p.wait(timeout=30)


@pytest.fixture
def stage(trained_stage, tmp_path) -> Path:
    """A copy of a finished tiny teacher stage (its folder is the SOURCE of the sample / convert rows)."""
    _, path = trained_stage
    shutil.copytree(path, tmp_path / "run" / "pretrain_teacher")
    return tmp_path / "run" / "pretrain_teacher"


SAMPLE = ["--n", "6", "--frames", "6", "--steps", "1"]


# ---- rule 1: outputs are guarded ---------------------------------------------------------------------------

def test_sample_existing_output_needs_force(stage, tmp_path, capsys):
    out = tmp_path / "s.safetensors"
    out.write_bytes(b"precious")
    before = snapshot(tmp_path)
    one_error(*call(capsys, sample_cli.main, stage, "--out", out, *SAMPLE), f"--out {out} exists", "--force")
    out.unlink()
    out.with_suffix(".gif").write_bytes(b"gif")  # the preview alone exists: it would be replaced too
    before = snapshot(tmp_path)
    one_error(*call(capsys, sample_cli.main, stage, "--out", out, *SAMPLE), "--out's preview", "exists")
    assert snapshot(tmp_path) == before
    rc, err = call(capsys, sample_cli.main, stage, "--out", out, *SAMPLE, "--force")
    assert rc == 0, err
    assert load_file(str(out))["videos"].shape[:2] == (6, 6) and out.with_suffix(".gif").read_bytes() != b"gif"
    assert leftovers(tmp_path) == []


def test_sample_never_writes_over_its_source(stage, tmp_path, capsys):
    single = tmp_path / "m.safetensors"
    convert_api(stage, single, "safetensors")
    inner = tmp_path / "p.safetensors" / "model"  # a diffusers folder under a folder named like an output
    shutil.copytree(stage / "transformer_ema", inner)
    before = snapshot(tmp_path)
    rows = [(stage, stage / "transformer_ema" / "diffusion_pytorch_model.safetensors", "is inside the input SOURCE"),
            (stage, stage / "preview.safetensors", "is inside the input SOURCE"),  # and its .gif: the stage's preview
            (single, single, "is the input SOURCE"),
            (inner, tmp_path / "p.safetensors", "contains the input SOURCE")]
    for source, out, needle in rows:
        one_error(*call(capsys, sample_cli.main, source, "--out", out, *SAMPLE, "--force"), needle, "--force never")
        assert snapshot(tmp_path) == before, out
    assert leftovers(tmp_path) == []


def test_sample_vbench_dir_is_guarded(stage, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    args = [stage, "--prompts", prompts, "--per-prompt", "1", "--frames", "3"]
    before = snapshot(tmp_path)
    one_error(*call(capsys, sample_cli.main, *args, "--vbench-dir", tmp_path / "run", "--force"),
              "--vbench-dir", "contains the input SOURCE")
    one_error(*call(capsys, sample_cli.main, *args, "--vbench-dir", stage / "vb", "--force"), "is inside the input SOURCE")
    one_error(*call(capsys, sample_cli.main, *args, "--vbench-dir", tmp_path), "contains the input")
    videos = tmp_path / "vb"
    videos.mkdir()
    (videos / "a cat-0.mp4").write_bytes(b"an earlier video")
    before = snapshot(tmp_path)
    one_error(*call(capsys, sample_cli.main, *args, "--vbench-dir", videos), "a cat-0.mp4 exists", "--force")
    assert snapshot(tmp_path) == before and leftovers(tmp_path) == []


def test_convert_dest_never_is_inside_or_contains_source(stage, tmp_path, capsys):
    ema = stage / "transformer_ema"
    before = snapshot(tmp_path)
    rows = [(ema, stage, "diffusers", "contains the input SOURCE"),  # the case: the whole stage replaced
            (stage, ema, "diffusers", "is inside the input SOURCE"),
            (stage, stage, "diffusers", "is the input SOURCE"),
            (ema / "diffusion_pytorch_model.safetensors", ema / "diffusion_pytorch_model.safetensors", "safetensors",
             "is the input SOURCE"),
            (stage, tmp_path / "run", "diffusers", "contains the input SOURCE")]
    for source, dest, to, needle in rows:
        one_error(*call(capsys, convert_cli.main, source, dest, "--to", to, "--force"), f"DEST {dest}", needle)
        assert snapshot(tmp_path) == before, dest
    config = tmp_path / "cfg" / "config.json"
    shutil.copytree(ema, config.parent)
    one_error(*call(capsys, convert_cli.main, stage, config.parent, "--to", "diffusers", "--model-config", config,
                    "--force"), "contains the input --model-config")
    existing = tmp_path / "w.safetensors"
    existing.write_bytes(b"keep")
    one_error(*call(capsys, convert_cli.main, stage, existing, "--to", "wan"), "exists; pass --force")
    assert existing.read_bytes() == b"keep" and leftovers(tmp_path) == []


def stage_cmd(tmp_path: Path, run: Path, stage: str, *extra) -> list[str]:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("{}\n")
    return [str(cfg), "--stages", stage, *TINY_OVERRIDES, f"run.dir={run}", *extra]


def test_stage_folder_never_is_inside_or_contains_an_input(stage, tmp_path, capsys):
    run = stage.parent
    stage_cmd(tmp_path, run, "pretrain_teacher")  # writes the config file
    before = snapshot(tmp_path)
    rows = [(["model.pretrained=" + str(stage / "transformer_ema")], "contains the input model.pretrained"),
            (["model.pretrained=" + str(stage)], "is the input model.pretrained"),
            (["data.kind=latents", f"data.path={run}"], "is inside the input data.path")]
    for extra, needle in rows:
        one_error(*call(capsys, launch.main, *stage_cmd(tmp_path, run, "pretrain_teacher", *extra, "--force")),
                  f"the stage folder {stage}", needle)
        assert snapshot(tmp_path) == before, extra
    # a later stage: its folder must not hold its teacher
    (run / "init_student" / "teacher").mkdir(parents=True)
    one_error(*call(capsys, launch.main, *stage_cmd(tmp_path, run, "init_student",
                                                   f"init_student.teacher={run / 'init_student' / 'teacher'}")),
              "contains the input init_student.teacher")
    shutil.rmtree(run / "init_student")
    assert snapshot(tmp_path) == before and leftovers(tmp_path) == []


def test_foreign_stage_folder_needs_force(tmp_path, capsys):
    run = tmp_path / "home"
    (run / "evaluate").mkdir(parents=True)
    (run / "evaluate" / "notes.txt").write_text("mine")
    (tmp_path / "m").mkdir()
    stage_cmd(tmp_path, run, "evaluate")
    before = snapshot(tmp_path)
    one_error(*call(capsys, launch.main, *stage_cmd(tmp_path, run, "evaluate", "evaluate.extra={x: " + str(tmp_path)
                                                   + "/m}")), f"{run / 'evaluate'} exists and is not a stage folder",
              "notes.txt", "--force")
    assert snapshot(tmp_path) == before


def test_evaluate_folder_never_holds_a_model(tmp_path, capsys):
    run = tmp_path / "run"
    (run / "evaluate" / "m").mkdir(parents=True)
    one_error(*call(capsys, launch.main, *stage_cmd(tmp_path, run, "evaluate", "evaluate.extra={x: "
                                                   + str(run / "evaluate" / "m") + "}", "--force")),
              "contains the input model 'x'")
    assert sorted(p.name for p in (run / "evaluate").iterdir()) == ["m"]


def prompts_cfg(tmp_path: Path, out: Path, prompts: Path) -> list[str]:
    cfg = tmp_path / "p.yaml"
    cfg.write_text("{}\n")
    return ["--config", str(cfg), *TINY_OVERRIDES, "data.kind=prompts", f"data.path={out}", f"data.prompts={prompts}",
            "run.stages=[init_student,distill]"]


def test_prepare_data_output_is_guarded(tmp_path, capsys):
    folder = tmp_path / "data"
    folder.mkdir()
    prompts = folder / "prompts.txt"
    prompts.write_text("a cat\n")
    before = snapshot(tmp_path)
    one_error(*call(capsys, prepare_data.main, *prompts_cfg(tmp_path, folder, prompts), "--force"),
              f"data.path {folder} contains the input data.prompts")
    videos = tmp_path / "videos"
    videos.mkdir()
    (videos / "clip.mp4").write_bytes(b"not decoded before the guard")
    (videos / "clip.txt").write_text("a dog\n")
    before = snapshot(tmp_path)
    for out, needle in ((videos, "is the input data.videos"), (videos / "latents", "is inside the input data.videos")):
        args = [*prompts_cfg(tmp_path, out, prompts), "data.kind=latents", f"data.videos={videos}",
                "data.pixel_size=[32,32]", "data.pixel_frames=21", "--force"]
        one_error(*call(capsys, prepare_data.main, *args), needle)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    outside = tmp_path / "prompts.txt"
    outside.write_text("a cat\n")
    one_error(*call(capsys, prepare_data.main, *prompts_cfg(tmp_path, foreign, outside)),
              "was not written by prepare_data", "--force")
    assert snapshot(tmp_path) == {**before, outside: b"a cat\n", foreign / "notes.txt": b"mine"}
    assert leftovers(tmp_path) == []


# ---- rule 2: one command at a time per run directory and per DEST -----------------------------------------

def test_second_run_in_a_locked_run_dir_refuses_naming_the_holder(tmp_path, capsys):
    run = tmp_path / "run"
    with holder(run, "./launch.sh configs/tiny.yaml") as pid:
        err = one_error(*call(capsys, launch.main, *stage_cmd(tmp_path, run, "pretrain_teacher")),
                        f"{run} is in use by pid {pid} on {socket.gethostname()} (command ./launch.sh configs/tiny.yaml)"
                        " since ")
        assert not run.exists()  # nothing written
        # python -m stages.<stage> takes the same lock
        from stages import pretrain_teacher
        one_error(*call(capsys, pretrain_teacher.main, "--config", tmp_path / "c.yaml", *TINY_OVERRIDES,
                        f"run.dir={run}"), f"in use by pid {pid}")
    assert "since 20" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml"]  # lock released and removed with its holder


def test_concurrent_run_refused_and_the_first_finishes_as_a_lone_run(trained_stage, tmp_path, capsys):
    """A real run in a subprocess; the same command started meanwhile refuses; the first run's weights equal
    those of a lone run (the session's `trained_stage`: same config, in-process)."""
    cfg, lone = trained_stage
    run = tmp_path / "run"
    args = stage_cmd(tmp_path, run, "pretrain_teacher", "model.prediction=x0")
    first = subprocess.Popen([sys.executable, "-m", "stages.launch", *args], cwd=REPO, env=ENV, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    lock = tmp_path / ".run.lock"
    deadline = time.time() + 120
    while not lock.exists() and first.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert lock.exists(), first.communicate()
    one_error(*call(capsys, launch.main, *args), f"{run} is in use by pid {first.pid}")
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    for part in ("transformer", "transformer_ema"):
        assert_same_weights(weights(run / "pretrain_teacher", part), weights(lone, part))
    assert json.loads((run / "pretrain_teacher" / "manifest.json").read_text())["status"] == "done"
    assert not lock.exists()


def test_two_converts_to_one_dest(stage, tmp_path, capsys):
    dest = tmp_path / "out" / "w.safetensors"
    with holder(dest, "./launch.sh convert a out/w.safetensors --to wan") as pid:
        one_error(*call(capsys, convert_cli.main, stage, dest, "--to", "wan"),
                  f"{dest} is in use by pid {pid}", "(command ./launch.sh convert a out/w.safetensors --to wan)")
        assert not dest.exists()
    rc, err = call(capsys, convert_cli.main, stage, dest, "--to", "wan")  # the holder is gone: it goes through
    assert rc == 0, err
    lone = tmp_path / "lone.safetensors"
    assert convert_cli.main([str(stage), str(lone), "--to", "wan"]) == 0
    assert_same_weights(load_file(str(dest)), load_file(str(lone)))
    with safe_open(str(dest), "pt") as a, safe_open(str(lone), "pt") as b:
        assert a.metadata() == b.metadata()
    assert leftovers(tmp_path) == []


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_stale_lock_of_a_dead_process_is_taken_over(stage, tmp_path, capsys):
    dest = tmp_path / "w.safetensors"
    lock = tmp_path / ".w.safetensors.lock"
    pid = dead_pid()
    lock.write_text(json.dumps({"pid": pid, "host": socket.gethostname(), "command": "killed convert",
                                "started": "2020-01-01T00:00:00"}))
    capsys.readouterr()
    assert convert_cli.main([str(stage), str(dest), "--to", "wan"]) == 0
    out = capsys.readouterr().out
    assert f"took over the lock left by pid {pid} (command killed convert, no longer running)" in out
    assert dest.is_file() and not lock.exists()
    # the same for a run directory (a stage killed by SIGKILL leaves its lock file; the rerun takes it over)
    run = tmp_path / "run"
    (tmp_path / ".run.lock").write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname()}))
    rc, err = call(capsys, launch.main, *stage_cmd(tmp_path, run, "pretrain_teacher", "--dry-run"))
    assert rc == 0, err  # a dry run takes no lock
    with Lock(run, "test") as held:
        assert held.took_over is not None and held.took_over["host"] == socket.gethostname()


def test_live_or_remote_holders_are_never_taken_over(tmp_path):
    lock = tmp_path / ".d.lock"
    for holder_record, needle in (({"pid": os.getppid(), "host": socket.gethostname(), "command": "c"},
                                   f"in use by pid {os.getppid()}"),
                                  ({"pid": 1, "host": "elsewhere", "command": "c", "started": "x"},
                                   f"on elsewhere (command c) since x; if that run is over, delete {lock}")):
        lock.write_text(json.dumps(holder_record))
        with pytest.raises(LockedError, match=".*") as e:
            Lock(tmp_path / "d").acquire()
        assert needle in str(e.value)
        assert json.loads(lock.read_text()) == holder_record  # untouched


def test_processes_started_under_a_held_lock_do_not_refuse(tmp_path):
    """`./launch.sh CONFIG --num-processes N` holds the run directory's lock; the workers `accelerate launch`
    starts get it in CVD_LOCKS and go on, anything else still refuses."""
    run = tmp_path / "run"
    code = "import sys\nfrom pipeline.io.guard import Lock\nLock(sys.argv[1]).acquire().release()\nprint('ok')\n"
    with Lock(run, "parent") as lock:
        worker = subprocess.run([sys.executable, "-c", code, str(run)], cwd=REPO, env=lock.env(ENV), text=True,
                                capture_output=True, timeout=60)
        assert worker.returncode == 0 and worker.stdout.strip() == "ok", worker.stderr
        other = subprocess.run([sys.executable, "-c", code, str(run)], cwd=REPO, env=ENV, text=True,
                               capture_output=True, timeout=60)
        assert other.returncode != 0 and f"{run} is in use by pid {os.getpid()}" in other.stderr
        assert (tmp_path / ".run.lock").is_file()  # the worker did not release the parent's lock
    assert not (tmp_path / ".run.lock").exists()


# ---- rule 5: paths resolve where the user stands ----------------------------------------------------------

def launch_sh(cwd: Path, *args) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "launch.sh"), *map(str, args)], cwd=cwd, env=ENV, text=True,
                          capture_output=True, timeout=600)


def test_relative_paths_resolve_where_the_user_stands(trained_stage, tmp_path):
    _, path = trained_stage
    user = tmp_path / "user"
    shutil.copytree(path, user / "teacher")
    (user / "mine.yaml").write_text("{}\n")  # a config that exists only where the user stands
    r = launch_sh(user, "mine.yaml", "--stages", "pretrain_teacher", *TINY_OVERRIDES, "pretrain_teacher.steps=1",
                  "pretrain_teacher.sampler.steps=1", "pretrain_teacher.preview_n=1", "run.dir=runs/here")
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((user / "runs" / "here" / "pretrain_teacher" / "manifest.json").read_text())["status"] == "done"
    r = launch_sh(user, "sample", "teacher", "--out", "out/s.safetensors", *SAMPLE)
    assert r.returncode == 0, r.stderr[-3000:]
    assert load_file(str(user / "out" / "s.safetensors"))["videos"].shape[:2] == (6, 6)
    assert not (REPO / "runs" / "here").exists() and not (REPO / "out").exists() and not (REPO / "mine.yaml").exists()


def test_missing_config_names_where_relative_paths_resolve(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    one_error(*call(capsys, launch.main, "nope.yaml"),
              f"config file not found: nope.yaml (relative paths resolve where the command runs: {tmp_path})")


def test_replacing_writes_under_a_temporary_name(tmp_path):
    """The one writer: nothing at DEST until the block ends; an error leaves the old DEST and no temporary."""
    from pipeline.io.guard import GuardError, replacing

    dest = tmp_path / "a" / "b" / "x.bin"
    with pytest.raises(RuntimeError):
        with replacing(dest) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("crash")
    assert not (tmp_path / "a").exists()  # the parents it made are gone with the temporary
    with replacing(dest) as tmp:
        tmp.write_bytes(b"one")
        assert not dest.exists() and tmp.parent == dest.parent and tmp.suffix == ".bin"
    with pytest.raises(GuardError, match="exists; pass --force"):
        with replacing(dest, force=False) as tmp:
            tmp.write_bytes(b"two")
    assert dest.read_bytes() == b"one"
    stale, live = dest.with_name(f".tmp-{dead_pid()}-x.bin"), dest.with_name(f".tmp-{os.getppid()}-x.bin")
    stale.write_bytes(b"left by a killed writer")
    live.write_bytes(b"being written")
    with replacing(dest) as tmp:
        tmp.write_bytes(b"three")
    assert dest.read_bytes() == b"three" and not stale.exists() and live.exists()
    live.unlink()
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "old").write_text("old")
    with replacing(folder) as tmp:
        tmp.mkdir()
        (tmp / "new").write_text("new")
    assert [p.name for p in folder.iterdir()] == ["new"] and leftovers(tmp_path) == []
