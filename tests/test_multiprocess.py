"""Multi-process training on a CPU (gloo), as `./launch.sh CONFIG --num-processes 2 [--accelerate-config F]` runs it.

Each process trains on its rows of a global batch drawn from a generator shared by all processes
(`pipeline/data/shard.py`), so 2 processes × batch 2 must give the weights of 1 process × batch 4 (up to
float rounding in the gradient all-reduce), and every process must hold the same weights at the end
(`check_replicas`, recorded in the manifest).
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import TINY_OVERRIDES, copy_stages

REPO = Path(__file__).resolve().parents[1]
ACCEL = REPO / "configs" / "accelerate"
TOL = 1e-5
# Teacher-forcing states weigh only some frames: the loss denominator must be the global batch's.
TEACHER = ["pretrain_teacher.tf_prob=0.5"]


def launch(run_dir: Path, stage: str, *extra, processes: int = 1, accelerate_config: str | None = None,
           timeout: int = 300):
    """`python -m stages.launch` on the tiny test config (an empty YAML + the test overrides)."""
    cfg = run_dir.parent / "empty.yaml"
    cfg.write_text("{}\n")
    cmd = [sys.executable, "-m", "stages.launch", str(cfg), "--stages", stage, "--num-processes", str(processes)]
    if accelerate_config:
        cmd += ["--accelerate-config", str(ACCEL / accelerate_config)]
    cmd += [*TINY_OVERRIDES, f"run.dir={run_dir}", *extra]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "LOCAL_RANK", "RANK", "WORLD_SIZE"))}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", PYTHONFAULTHANDLER="1")  # tracebacks on aborts
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)
    if r.returncode != 0:  # pytest.fail does not cut its message, so the cause shows in CI's log
        pytest.fail(f"exit {r.returncode}\n--- stdout\n{r.stdout[-3000:]}\n--- stderr\n{r.stderr[-8000:]}")
    return r


def weights(run_dir: Path, stage: str, part: str) -> dict:
    return load_file(str(run_dir / stage / part / "diffusion_pytorch_model.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def manifest(run_dir: Path, stage: str) -> dict:
    return json.loads((run_dir / stage / "manifest.json").read_text())


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """Teacher, student and distilled student of one process with batch 4 (the reference)."""
    run = tmp_path_factory.mktemp("one") / "run"
    launch(run, "pretrain_teacher,init_student,distill", "pretrain_teacher.batch_size=4", "distill.batch_size=4",
           *TEACHER)
    return run


def test_ddp_teacher_equals_one_process_with_the_doubled_batch(one_process, tmp_path):
    run = tmp_path / "run"
    launch(run, "pretrain_teacher", "pretrain_teacher.batch_size=2", *TEACHER, processes=2)
    m = manifest(run, "pretrain_teacher")
    assert m["metrics"]["processes"] == 2 and m["metrics"]["replicas_identical"] == 2
    for part in ("transformer", "transformer_ema"):
        moved = max_diff(weights(run, "pretrain_teacher", part), weights(one_process, "pretrain_teacher", part))
        assert moved <= TOL, part
    ref = manifest(one_process, "pretrain_teacher")["metrics"]["final_loss"]
    assert m["metrics"]["final_loss"] == pytest.approx(ref, rel=1e-5)  # the loss is reduced over processes


def test_ddp_distill_equals_one_process_with_the_doubled_batch(one_process, tmp_path):
    run = tmp_path / "run"
    copy_stages(one_process, run)
    launch(run, "distill", "distill.batch_size=2", processes=2)
    assert manifest(run, "distill")["metrics"]["replicas_identical"] == 2
    for part in ("transformer", "transformer_ema", "critic"):
        assert max_diff(weights(run, "distill", part), weights(one_process, "distill", part)) <= TOL, part
    # ... and training moved them (the comparison is not between two untouched copies)
    assert max_diff(weights(run, "distill", "transformer"), weights(one_process, "init_student", "transformer_ema")) > 1e-4


def test_ddp_and_zero2_sf_gan_equal_one_process_with_the_doubled_batch(one_process, tmp_path):
    """The GAN under DDP: the discriminator reads the critic after its middle block (the later blocks get no
    gradient) and its head is a third wrapped model; 2 processes × batch 2 give one process × batch 4. With R1 on
    (one run covers both: without it only the penalty's term is missing), whose double backward runs through both
    wrapped models and each process's mean over its videos. The same under ZeRO-2: the critic an engine, the head
    a plain module whose gradients the step averages, R1's pass through the unwrapped modules (an engine's
    backward ends at R1's inner gradient otherwise); the checkpoint at step 2 comes before the generator's first
    step (no moments to gather yet). The ZeRO-2 run checkpoints its blocks' activations (which change no number):
    the discriminator's recomputations, R1's in SDPA's math kernel, under an engine."""
    gan = ["distill.method=sf_gan", "distill.critic_warmup=1", "distill.steps=3", "distill.r1_weight=1.0"]
    runs = {}
    for name, processes, batch, accelerate, more in (
            ("one", 1, 4, None, []), ("two", 2, 2, None, []),
            ("zero2", 2, 2, "deepspeed_zero2.yaml", ["distill.gradient_checkpointing=true"])):
        runs[name] = copy_stages(one_process, tmp_path / name)
        launch(runs[name], "distill", f"distill.batch_size={batch}", *gan, *more, processes=processes,
               accelerate_config=accelerate)
    metrics = {name: manifest(run, "distill")["metrics"] for name, run in runs.items()}
    for two in ("two", "zero2"):  # under DeepSpeed the critic's engine runs the backward for its plain head too
        assert metrics[two]["replicas_identical"] == 2
        assert metrics[two]["final_critic_loss"] == pytest.approx(metrics["one"]["final_critic_loss"], rel=1e-5)
    # the penalty was on (logged at each critic step, > 0)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(next((runs["two"] / "distill" / "logs").rglob("events.out.tfevents*")))).Reload()
    assert [e.value > 0 for e in events.Scalars("r1")] == [True] * 3
    # the critic learns from L_D alone, whose gradients are near zero in places (the text embedder's): Adam turns the
    # all-reduce's rounding there into steps of 1e-5 (measured: 1.3e-5 in one tensor, every other one under 6e-7)
    for two in ("two", "zero2"):
        for part, tol in (("transformer", TOL), ("transformer_ema", TOL), ("critic", 5e-5), ("discriminator", TOL)):
            assert max_diff(weights(runs[two], "distill", part), weights(runs["one"], "distill", part)) <= tol, part
    for part, start in (("transformer", ("init_student", "transformer_ema")), ("critic", ("pretrain_teacher", "transformer_ema"))):
        assert max_diff(weights(runs["two"], "distill", part), weights(one_process, *start)) > 1e-3, part  # trained


def test_deepspeed_zero2_distill_and_resume_with_another_process_count(one_process, tmp_path):
    """Generator and critic as ZeRO-2 engines, the teacher as a ZeRO-3 one; 2 of the 4 steps under
    DeepSpeed, then the checkpoint (optimizer moments gathered from the ZeRO partitions) resumed by one
    plain process with batch 4: the result is the uninterrupted one-process run. The ZeRO-2 settings come from a
    DeepSpeed JSON file the accelerate config names (`deepspeed_config_file`), as many recipes ship them."""
    run = tmp_path / "run"
    copy_stages(one_process, run)
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 2, "reduce_bucket_size": 1000000}, "gradient_clipping": 5.0}')
    named = tmp_path / "accelerate.yaml"
    named.write_text(f"distributed_type: DEEPSPEED\ndeepspeed_config:\n  deepspeed_config_file: {ds}\n")
    r = launch(run, "distill", "distill.batch_size=2", "distill.steps=2", processes=2, accelerate_config=str(named))
    assert "(DEEPSPEED, ZeRO-2, reduce bucket 1,000,000)" in r.stdout
    assert manifest(run, "distill")["metrics"]["replicas_identical"] == 2
    half = load_file(str(run / "distill" / "checkpoints" / "step_0000002" / "optimizer.safetensors"))
    assert any(k.endswith(".exp_avg") for k in half) and all(v.isfinite().all() for v in half.values())
    launch(run, "distill", "distill.batch_size=4")  # continues from step 2 to distill.steps=4
    assert manifest(run, "distill")["metrics"]["steps"] == 4
    for part in ("transformer", "transformer_ema", "critic"):
        assert max_diff(weights(run, "distill", part), weights(one_process, "distill", part)) <= TOL, part


def test_deepspeed_zero2_in_bf16_computes_as_one_process(one_process, tmp_path):
    """bf16 (the default on GPUs) under DeepSpeed: the weights stay fp32 and the steps run under autocast, as in
    DDP (DeepSpeed's own bf16 cast the weights, so the fp32 inputs failed in the first layer); the checkpoint
    holds fp32 weights."""
    runs = {}
    for name, accel in (("ddp", None), ("ds", "deepspeed_zero2.yaml")):
        runs[name] = copy_stages(one_process, tmp_path / name)
        launch(runs[name], "distill", "distill.batch_size=2", "distill.steps=2", "run.mixed_precision=bf16",
               processes=2, accelerate_config=accel)
    assert manifest(runs["ds"], "distill")["metrics"]["replicas_identical"] == 2
    for part in ("transformer", "critic"):
        ds, ddp = weights(runs["ds"], "distill", part), weights(runs["ddp"], "distill", part)
        assert all(v.dtype == torch.float32 for v in ds.values()), part
        assert max_diff(ds, ddp) <= TOL, part
        assert max_diff(ds, weights(one_process, "init_student" if part == "transformer" else "pretrain_teacher",
                                    "transformer_ema")) > 1e-3, part  # trained


def test_fsdp_config_validates_in_dry_run_and_is_refused_on_cpu(tmp_path):
    r = launch(tmp_path / "run", "distill", "--dry-run", processes=2, accelerate_config="fsdp.yaml")
    assert "processes: 2 (FSDP)" in r.stdout
    cfg = tmp_path / "empty.yaml"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    bad = subprocess.run([sys.executable, "-m", "stages.launch", str(cfg), "--stages", "distill", "--num-processes",
                          "2", "--accelerate-config", str(ACCEL / "fsdp.yaml"), *TINY_OVERRIDES,
                          f"run.dir={tmp_path / 'run'}"], cwd=REPO, capture_output=True, text=True, env=env)
    if not torch.cuda.is_available():
        assert bad.returncode == 2 and "FSDP runs on GPUs only" in bad.stderr
        assert not (tmp_path / "run" / "distill").exists()


def test_deepspeed_zero3_distill_and_resume_equal_one_process(one_process, tmp_path):
    """Every model a ZeRO-3 engine (each process holds a partition of every weight): the checkpoints, the EMA and
    the saved folders hold whole fp32 weights (gathered, `FullWeights`), and a resume puts the optimizer moments
    back into the partitions (ZeRO-3 makes them only at the first step). 2 steps, then 2 more after a resume with
    the optimizer and the weights offloaded to the CPU (DeepSpeed's CPU Adam), 2 processes × batch 2: the
    uninterrupted one-process run with batch 4."""
    run = tmp_path / "run"
    r = launch(run, "distill", "--dry-run", processes=2, accelerate_config="deepspeed_zero3.yaml")
    assert "processes: 2 (DEEPSPEED" in r.stdout
    copy_stages(one_process, run)
    launch(run, "distill", "distill.batch_size=2", "distill.steps=2", processes=2,
           accelerate_config="deepspeed_zero3.yaml")
    half = load_file(str(run / "distill" / "checkpoints" / "step_0000002" / "model.safetensors"))
    reference = weights(one_process, "distill", "transformer")
    assert {k: v.shape for k, v in half.items()} == {k: v.shape for k, v in reference.items()}  # whole, not partitions
    offload = tmp_path / "offload.yaml"
    offload.write_text((ACCEL / "deepspeed_zero3.yaml").read_text()
                       .replace("offload_optimizer_device: none", "offload_optimizer_device: cpu")
                       .replace("offload_param_device: none", "offload_param_device: cpu"))
    r = launch(run, "distill", "distill.batch_size=2", processes=2, accelerate_config=str(offload))
    assert "ZeRO-3, CPU offload of the optimizer and params" in r.stdout
    m = manifest(run, "distill")["metrics"]
    assert m["steps"] == 4 and m["replicas_identical"] == 2  # the EMA copies (each weight exists once)
    for part in ("transformer", "transformer_ema", "critic"):
        got = weights(run, "distill", part)
        assert all(v.dtype == torch.float32 for v in got.values()), part
        assert max_diff(got, weights(one_process, "distill", part)) <= TOL, part


def test_deepspeed_zero3_dmd_gan_resumes_as_one_process_and_refuses_exact_r1(one_process, tmp_path):
    """DMD + GAN (`gan_weight`) with R1 by a finite difference (`r1_sigma`) and every trained model but the head a
    ZeRO-3 engine: 2 steps (the checkpoint comes before the generator's first step), resumed for 1 more,
    2 processes × batch 2, equal the uninterrupted one-process run with batch 4. Exact R1 (a double backward
    through partitioned weights) is refused before any process starts: one line naming the key, exit 2, nothing
    written."""
    gan = ["distill.gan_weight=0.5", "distill.critic_warmup=1", "distill.steps=3", "distill.r1_weight=1",
           "distill.r1_sigma=0.05"]
    one = copy_stages(one_process, tmp_path / "one")
    launch(one, "distill", "distill.batch_size=4", *gan)
    run = copy_stages(one_process, tmp_path / "zero3")
    for steps in (2, 3):
        launch(run, "distill", "distill.batch_size=2", *gan, f"distill.steps={steps}", processes=2,
               accelerate_config="deepspeed_zero3.yaml")
    m = manifest(run, "distill")["metrics"]
    assert m["steps"] == 3 and m["generator_updates"] == 1 and m["replicas_identical"] == 2
    for part, tol in (("transformer", TOL), ("transformer_ema", TOL), ("critic", 5e-5), ("discriminator", TOL)):
        assert max_diff(weights(run, "distill", part), weights(one, "distill", part)) <= tol, part
    assert max_diff(weights(run, "distill", "critic"), weights(one_process, "pretrain_teacher", "transformer_ema")) > 1e-4

    cfg = tmp_path / "empty.yaml"
    cfg.write_text("{}\n")
    r = subprocess.run([sys.executable, "-m", "stages.launch", str(cfg), "--stages", "distill", "--num-processes", "2",
                        "--accelerate-config", str(ACCEL / "deepspeed_zero3.yaml"), *TINY_OVERRIDES,
                        f"run.dir={tmp_path / 'r1'}", "distill.method=sf_gan", "distill.r1_weight=1"],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and "distill.r1_weight" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not (tmp_path / "r1").exists()


def test_check_replicas_names_what_differs_and_skips_zero3_partitions():
    """`check_replicas` on a stand-in accelerator whose `gather` returns this process's fingerprint and another
    process's (equal, or with one weight moved): DDP compares models and EMA; under ZeRO-3 a partitioned engine's
    weights (`ds_id`) exist once, so the EMA and the models kept whole (a GAN head) are compared."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType
    from diffusers.training_utils import EMAModel

    from pipeline.training.distributed import check_replicas

    model = torch.nn.Linear(3, 2)
    ema = EMAModel(model.parameters())

    def accelerator(kind, moved):  # `moved`: the other process's copy of that tensor differs
        def gather(fingerprint):
            other = fingerprint.clone()
            if moved:
                other[0, 0] += 1e-3
            return torch.cat([fingerprint, other])
        return SimpleNamespace(num_processes=2, distributed_type=kind, device=torch.device("cpu"), gather=gather,
                               unwrap_model=lambda m: m,
                               state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(zero_stage=3)))

    assert check_replicas(accelerator(DistributedType.MULTI_GPU, False), {"generator": model}, ema=ema) == 2
    with pytest.raises(RuntimeError, match="generator: weights differ"):
        check_replicas(accelerator(DistributedType.MULTI_GPU, True), {"generator": model}, ema=ema)
    partitioned = torch.nn.Linear(3, 2)
    for i, p in enumerate(partitioned.parameters()):
        p.ds_id = i  # what a ZeRO-3 engine marks its partitioned parameters with
    with pytest.raises(RuntimeError, match="EMA: weights differ"):  # under ZeRO-3 the EMA is the replicated state
        check_replicas(accelerator(DistributedType.DEEPSPEED, True), {"generator": partitioned}, ema=ema)
    with pytest.raises(RuntimeError, match="discriminator: weights differ"):
        check_replicas(accelerator(DistributedType.DEEPSPEED, True), {"generator": partitioned, "discriminator": model})
    assert check_replicas(accelerator(DistributedType.DEEPSPEED, False), {"generator": partitioned}) == 1

    # the fingerprint holds one tensor's float64 copies at a time, not the whole model's (34 GB for Wan2.1-1.3B)
    from pipeline.training.distributed import _fingerprint
    from pipeline.training.memory import TensorPeak

    peaks = []
    for n in (4, 16):
        params = [torch.nn.Linear(256, 256, bias=False).weight for _ in range(n)]
        with TensorPeak() as peak:
            _fingerprint(params)
        peaks.append(peak.peak - peak.now)  # still live at the end: views of the weights, which existed before
    assert peaks[0] == peaks[1] <= 3 * (8 * 256 * 256) + 64  # 3 float64 copies of one layer, whatever the depth


def test_launched_backend_reads_the_launch_environment(monkeypatch):
    """What the trainer, the accelerator and the memory benchmark read before any accelerator exists."""
    from pipeline.training.distributed import launched_backend

    for key in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP", "ACCELERATE_DEEPSPEED_ZERO_STAGE", "WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    assert launched_backend() == ("DDP", 0, 1)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    monkeypatch.setenv("ACCELERATE_DEEPSPEED_ZERO_STAGE", "3")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launched_backend() == ("DEEPSPEED", 3, 2)
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "false")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert launched_backend() == ("FSDP", 0, 2)


def test_bad_accelerate_config_is_one_line(tmp_path):
    cfg = tmp_path / "empty.yaml"
    cfg.write_text("{}\n")
    weird = tmp_path / "weird.yaml"
    weird.write_text("distributed_type: TPU_POD\n")
    for path, msg in ((tmp_path / "missing.yaml", "file not found"), (weird, "distributed_type must be one of")):
        r = subprocess.run([sys.executable, "-m", "stages.launch", str(cfg), "--num-processes", "2",
                            "--accelerate-config", str(path), *TINY_OVERRIDES, f"run.dir={tmp_path / 'run'}"],
                           cwd=REPO, capture_output=True, text=True)
        assert r.returncode == 2 and msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_ddp_init_student_shares_the_ode_pairs_and_equals_one_process(one_process, tmp_path):
    """The two processes make one ODE-pair shard each (the same shards one process makes), then regress
    with batch 2 each: the weights of one process with batch 4."""
    run = tmp_path / "run"
    shutil.copytree(one_process / "pretrain_teacher", run / "pretrain_teacher")
    launch(run, "init_student", "init_student.batch_size=2", processes=2)
    assert manifest(run, "init_student")["metrics"]["replicas_identical"] == 2
    shards = sorted((one_process / "init_student" / "ode_pairs").glob("shard_*.safetensors"))
    assert len(shards) == 2
    for ref in shards:
        got, want = load_file(str(run / "init_student" / "ode_pairs" / ref.name)), load_file(str(ref))
        assert all(torch.equal(got[k], want[k]) for k in want)
    for part in ("transformer", "transformer_ema"):
        assert max_diff(weights(run, "init_student", part), weights(one_process, "init_student", part)) <= TOL, part
