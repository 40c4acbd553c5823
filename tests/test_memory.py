"""The `--dry-run` memory estimate: model states per backend are exact byte counts; activations follow the
documented rules (checked against measured peaks in tests/test_checkpointing.py)."""

from pathlib import Path

import pytest

from pipeline.training import memory

REPO = Path(__file__).resolve().parents[1]
P = 1_000_000
GIB = memory.GIB


def test_model_states_per_backend():
    ddp = memory.model_states(P, trained=2, ema=1, frozen=1, backend="DDP", zero_stage=0, processes=4)
    assert ddp == dict(weights=8 * P, gradients=8 * P, optimizer=16 * P, ema=4 * P, frozen=4 * P)
    # DeepSpeed (measured on the CPU, benchmarks/memory_estimate.py): an fp32 master copy of each engine's
    # partition, and its whole fp32 gradient bucket beside the gradient partition; the frozen engine holds fp32
    bucket = 4 * memory.DEEPSPEED_REDUCE_BUCKET
    z2 = memory.model_states(P, 2, 1, 1, "DEEPSPEED", 2, 4)
    assert z2 == dict(weights=2 * (4 * P + P), gradients=2 * (bucket + P), optimizer=4 * P, ema=4 * P, frozen=1 * P)
    z3 = memory.model_states(P, 2, 1, 1, "DEEPSPEED", 3, 4)  # + each pass's gathered layers (here the whole model)
    assert z3["weights"] == 2 * (P + P + 4 * P) and z3["gradients"] == 2 * (bucket + P)
    big = 10 * memory.DEEPSPEED_PREFETCH_BUCKET  # gathered ahead: the prefetch bucket, not the model
    assert memory.model_states(big, 1, 0, 0, "DEEPSPEED", 3, 10)["weights"] == 0.8 * big + 0.4 * big
    z1 = memory.model_states(P, 1, 0, 0, "DEEPSPEED", 1, 2, frozen_bytes=2)
    assert (z1["gradients"], z1["optimizer"]) == (bucket + 4 * P, 4 * P)


def test_deepspeed_cpu_offload_leaves_the_device():
    """`offload_optimizer_device: cpu`: the fp32 master partition, the AdamW moments and the gradient partition
    live in CPU memory (the reduce bucket stays); `offload_param_device: cpu` (ZeRO-3): the weight partitions too
    (the gathered layers stay). DeepSpeed's documented placement."""
    bucket = 4 * memory.DEEPSPEED_REDUCE_BUCKET
    full = memory.model_states(P, 1, 1, 0, "DEEPSPEED", 3, 4)
    opt = memory.model_states(P, 1, 1, 0, "DEEPSPEED", 3, 4, deepspeed=memory.DeepSpeed(offload=("optimizer",)))
    both = memory.model_states(P, 1, 1, 0, "DEEPSPEED", 3, 4,
                               deepspeed=memory.DeepSpeed(offload=("optimizer", "params")))
    assert full == dict(weights=P + P + 4 * P, gradients=bucket + P, optimizer=2 * P, ema=4 * P, frozen=0)
    assert opt == dict(weights=P + 4 * P, gradients=bucket, optimizer=0, ema=4 * P, frozen=0)
    assert both == dict(weights=4 * P, gradients=bucket, optimizer=0, ema=4 * P, frozen=0)
    # parameters are offloaded under ZeRO-3 only
    assert memory.model_states(P, 1, 0, 0, "DEEPSPEED", 2, 4, deepspeed=memory.DeepSpeed(offload=("params",))) == \
        memory.model_states(P, 1, 0, 0, "DEEPSPEED", 2, 4)


def test_the_plan_reads_offload_from_the_accelerate_config(tmp_path):
    from pipeline.config import load_config
    from pipeline.plan import plan
    from stages.launch import accelerate_backend

    text = (REPO / "configs" / "accelerate" / "deepspeed_zero3.yaml").read_text()
    assert accelerate_backend(str(REPO / "configs" / "accelerate" / "deepspeed_zero3.yaml")) == \
        ("DEEPSPEED", 3, memory.DeepSpeed())
    off = tmp_path / "offload.yaml"
    off.write_text(text.replace("offload_optimizer_device: none", "offload_optimizer_device: cpu")
                   .replace("offload_param_device: none", "offload_param_device: cpu"))
    backend = accelerate_backend(str(off))
    assert backend == ("DEEPSPEED", 3, memory.DeepSpeed(offload=("optimizer", "params")))
    cfg = load_config(REPO / "configs" / "wan2.1-t2v-1.3b" / "student.yaml", [])
    on, plain = plan(cfg, ["distill"], 8, *backend), plan(cfg, ["distill"], 8, "DEEPSPEED", 3)
    assert "processes: 8 (DEEPSPEED, ZeRO-3, CPU offload of the optimizer and params)" in on

    def gib(text):
        return float(text.split("memory: ~")[1].split(" GiB")[0])
    assert gib(on) < gib(plain)

    # a DeepSpeed JSON file named by the accelerate config: its stage, offload and reduce bucket
    ds = tmp_path / "ds.json"
    ds.write_text('{"zero_optimization": {"stage": 2, "reduce_bucket_size": 1e6, '
                  '"offload_optimizer": {"device": "cpu"}}}')
    named = tmp_path / "named.yaml"
    named.write_text(f"distributed_type: DEEPSPEED\ndeepspeed_config:\n  deepspeed_config_file: {ds}\n")
    backend = accelerate_backend(str(named))
    assert backend == ("DEEPSPEED", 2, memory.DeepSpeed(offload=("optimizer",), reduce_bucket=1_000_000))
    text = plan(cfg, ["distill"], 8, *backend)
    assert "(DEEPSPEED, ZeRO-2, CPU offload of the optimizer, reduce bucket 1,000,000)" in text
    # the bucket is the whole difference in gradients (the gradient partition is offloaded with the optimizer)
    bucketed = plan(cfg, ["distill"], 8, "DEEPSPEED", 2, memory.DeepSpeed(offload=("optimizer",)))
    assert gib(bucketed) - gib(text) == pytest.approx(4 * (memory.DEEPSPEED_REDUCE_BUCKET - 1e6) / GIB, abs=0.06)


@pytest.mark.parametrize("content, says", [
    (None, "deepspeed_config_file: file not found"),
    ("{not json", "not valid JSON"),
    ('{"train_micro_batch_size_per_gpu": 1}', "needs a zero_optimization section"),
    ('{"zero_optimization": {"stage": 4}}', "zero_optimization.stage must be 0..3"),
    ('{"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW"}}', "remove its optimizer section"),
])
def test_a_bad_deepspeed_file_is_one_line(tmp_path, content, says):
    import subprocess
    import sys

    ds = tmp_path / "ds.json"
    if content is not None:
        ds.write_text(content)
    named = tmp_path / "named.yaml"
    named.write_text(f"distributed_type: DEEPSPEED\ndeepspeed_config:\n  deepspeed_config_file: {ds}\n")
    empty = tmp_path / "empty.yaml"
    empty.write_text("{}\n")
    r = subprocess.run([sys.executable, "-m", "stages.launch", str(empty), "--dry-run", "--stages", "distill",
                        "--num-processes", "2", "--accelerate-config", str(named), f"run.dir={tmp_path / 'run'}"],
                       cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 2 and says in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_activation_rules():
    shape = memory.Shape(P, dim=64, ffn=256, layers=10, tokens_per_frame=100, frames=6, frames_per_chunk=3)
    assert memory.block_bytes(1000, shape, 4) == 1000 * (89 * 64 + 8 * 256)
    assert memory.block_bytes(1000, shape, 2) == 1000 * (69 * 64 + 4 * 256)
    assert memory.mask_bytes(600, 600, 2, "dense") == (600 * 600 * 2, 600 * 600)
    assert memory.mask_bytes(600, 600, 2, "flex") == (0, 0) == memory.mask_bytes(600, 600, 2, None)
    full, _ = memory.trained_pass(shape, 2, 4, False, None)
    ckpt, recompute = memory.trained_pass(shape, 2, 4, True, None)
    head = 15 * 64 * 1200
    assert full == 10 * memory.block_bytes(1200, shape, 4) + head
    assert ckpt == 10 * 1200 * 64 * 4 + head  # one fp32 layer input per layer
    assert recompute == pytest.approx(1.05 * memory.block_bytes(1200, shape, 4))
    masked, _ = memory.trained_pass(shape, 2, 4, False, "dense")
    assert masked - full == 10 * 600 * 600 * 4 + 600 * 600  # a bias per block, the boolean mask once
    assert memory.kv_cache_bytes(100, 8, 3) == 2 * 3 * 100 * 8 * 2


def test_rollout_holds_exit_calls_and_their_cache_entries():
    shape = memory.Shape(P, dim=64, ffn=256, layers=2, tokens_per_frame=10, frames=9, frames_per_chunk=3)
    held, kv, _ = memory.rollout_held(shape, 1, 2, True, None)
    # chunks of 30 tokens: inputs 3 x 30 per layer, head per chunk; the recomputations' cache segments
    # (K and V of chunks 0 and 1, shared by the snapshots: 60 tokens once, not 0 + 30 + 60)
    assert held == 2 * 90 * 64 * 2 + 2 * 2 * 60 * 64 * 2 + 15 * 64 * 90
    assert kv == 0  # the live cache's segments are among those
    windowed, _, _ = memory.rollout_held(shape, 1, 2, True, 3)  # evicted segments stay alive until the backward
    assert windowed == held
    nockpt, kv, _ = memory.rollout_held(shape, 1, 2, False, 3)  # without: each exit call saved its K/V (≤ window)
    assert kv == memory.kv_cache_bytes(30, 64, 2, 2) and nockpt > held


def test_estimate_distill_wan_shape():
    # Wan2.1-1.3B: 1536 wide, 8960 ffn, 30 layers, 21 latent frames of 30x52 tokens in chunks of 3, batch 1, bf16
    kw = dict(params=1_418_996_800, dim=1536, ffn=8960, layers=30, tokens_per_frame=1560, frames=21,
              frames_per_chunk=3, batch=1, window_frames=None, bf16=True)
    ddp = memory.estimate("distill", **kw, checkpointing=True)
    z2 = memory.estimate("distill", **kw, backend="DEEPSPEED", zero_stage=2, processes=8, checkpointing=True)
    nockpt = memory.estimate("distill", **kw, checkpointing=False)
    assert z2.total < ddp.total < nockpt.total
    # the H200 (139 GiB) ran out of memory while the critic's pass kept every activation; recomputing fits
    assert nockpt.phase == "critic update" and nockpt.total > 139 * GIB > ddp.total
    assert ddp.frozen == pytest.approx(2 * kw["params"])  # the real score held in bf16
    cpu_ema = memory.estimate("distill", **kw, checkpointing=True, ema_cpu=True)
    assert cpu_ema.ema == 0 and ddp.total - cpu_ema.total == pytest.approx(4 * kw["params"])
    flex = memory.estimate("distill", **kw, checkpointing=True, masked="flex")
    assert flex.total < ddp.total
    assert "GiB per device" in ddp.line() and f"peak: {ddp.phase}" in ddp.line()
    # one micro-batch per step: the generator update's forward holds no gradients of the generator, so the critic's
    # update (its pass over the whole clip, recomputed block by block) is the peak; accumulating, the generator's
    assert ddp.phase == "critic update"
    assert memory.estimate("distill", **kw, checkpointing=True, grad_accum=64).phase == "generator update"


def test_estimate_init_student_counts_the_ode_pairs():
    """Sampling ODE pairs (a shard at once, guided, in fp32) can exceed training: its KV cache."""
    kw = dict(params=1_418_996_800, dim=1536, ffn=8960, layers=30, tokens_per_frame=1560, frames=21,
              frames_per_chunk=3, batch=1, window_frames=None, bf16=True, checkpointing=True, ode_guidance=5.0)
    big = memory.estimate("init_student", **kw, ode_videos=16)
    small = memory.estimate("init_student", **kw, ode_videos=1)
    assert big.phase == "ODE pairs" and big.kv_cache == pytest.approx(2 * 30 * 32 * 18 * 1560 * 1536 * 4)
    assert small.phase == "training" and small.total < 64 * GIB < big.total
