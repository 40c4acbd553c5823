"""The models of a run by role (`pipeline/models/roles.py`): stock bidirectional teachers, a real score bigger
than the fake score and the student, ODE pairs by the teacher's kind, and a Self-Forcing `ode_init.pt`
starting `distill`."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import load_file

from conftest import capture_method, TINY_OVERRIDES, assert_same_weights, call, crash_then_resume, one_error, tiny_cfg, weights
from pipeline.config import ConfigError
from pipeline.diffusion.sampling import Denoiser, few_step_sigmas, sample_synchronous
from pipeline.io.keys import diffusers_to_wan
from pipeline.io.weights import WAN_HEADS
from pipeline.methods.ode_regression import pair_conditions
from pipeline.models.roles import load_role
from stages import distill, init_student
from stages.launch import main as launch

# Stock diffusers Wan transformers (no sampling record) of three shapes: a bigger real score, and a fake
# score whose shape the student shares (it is initialised from the fake score's source).
SHAPES = {"real": dict(num_layers=3, num_attention_heads=2, attention_head_dim=32, ffn_dim=64),
          "fake": dict(num_layers=2, num_attention_heads=2, attention_head_dim=16, ffn_dim=32)}
COMMON = dict(patch_size=(1, 4, 4), in_channels=3, out_channels=3, text_dim=16, freq_dim=32)


def stock_folder(root: Path, name: str, seed: int) -> Path:
    """A diffusers `WanTransformer3DModel` saved by diffusers itself: what a user downloads."""
    torch.manual_seed(seed)
    model = WanTransformer3DModel(**COMMON, **SHAPES[name])
    with torch.no_grad():  # no norm weight exactly 1 and no bias exactly 0
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(root / name)
    return root / name


@pytest.fixture(scope="module")
def stock(tmp_path_factory):
    root = tmp_path_factory.mktemp("stock")
    return {name: stock_folder(root, name, seed) for seed, name in enumerate(SHAPES)}


@pytest.fixture(scope="module")
def bid_student(stock, tmp_path_factory):
    """init_student on the stock (fake-shaped) bidirectional teacher: the student of the asymmetric runs."""
    root = tmp_path_factory.mktemp("bid")
    cfg = tiny_cfg(root, f"init_student.teacher={stock['fake']}", "init_student.teacher_attention=bidirectional")
    return cfg, init_student.run(cfg).path


def asymmetric(cfg, stock, student: Path, run_dir: Path, **distill_keys):
    """`cfg` distilling `student` with the big real score and the smaller fake score, into `run_dir`."""
    d = replace(cfg.distill, student=str(student), teacher=str(stock["real"]), teacher_attention="bidirectional",
                critic=str(stock["fake"]), critic_attention="bidirectional", **distill_keys)
    return replace(cfg, run=replace(cfg.run, dir=str(run_dir)), distill=d)


def test_stock_teacher_needs_its_attention_stated(stock, tmp_path, capsys):
    rc, err = call(capsys, launch, "configs/tiny.yaml", "--stages", "init_student", *TINY_OVERRIDES,
                   f"run.dir={tmp_path / 'r'}", f"init_student.teacher={stock['fake']}")
    one_error(rc, err, "init_student.teacher_attention", str(stock["fake"]))
    assert not (tmp_path / "r" / "init_student" / "checkpoints").exists()  # refused before anything was trained
    cfg = tiny_cfg(tmp_path)
    with pytest.raises(ConfigError, match="distill.critic_attention"):
        load_role("fake score", stock["fake"], configured=None, key="distill.critic_attention", run=cfg)


def test_stock_bidirectional_teacher_equals_diffusers_forward(stock, tmp_path):
    role = load_role("teacher", stock["real"], configured="bidirectional", key="init_student.teacher_attention",
                     run=tiny_cfg(tmp_path))
    theirs = WanTransformer3DModel.from_pretrained(stock["real"]).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 6, 16, 16, generator=g)
    ctx = torch.randn(2, 2, 16, generator=g)
    t = torch.tensor([130.0, 810.0])
    den = Denoiser(role.model, role.attention, 3, role.prediction)
    ours = den.raw(x, t[:, None].expand(2, 6) / 1000, ctx)  # per-frame levels, all equal
    with torch.no_grad():
        ref = theirs(x, t, ctx, return_dict=False)[0]
    assert role.attention == "bidirectional" and (ours - ref).abs().max() <= 1e-5


def test_bidirectional_teacher_pairs_are_synchronous_sampling(bid_student, stock):
    """The ODE pairs of a bidirectional teacher are its synchronous whole-clip ODE at the student's levels,
    although the config's teacher sampler says autoregressive (that is for causal teachers)."""
    cfg, path = bid_student
    assert cfg.pretrain_teacher.sampler.kind == "autoregressive"
    shard = load_file(str(path / "ode_pairs" / "shard_00000.safetensors"))
    role = load_role("teacher", stock["fake"], configured="bidirectional", key="k", run=cfg)
    n = shard["states"].shape[0]
    conditions, uncond = pair_conditions(cfg, role.table)
    context, _ = conditions(0, n)
    noise = torch.randn((n, 3, 6, 16, 16), generator=torch.Generator().manual_seed(cfg.run.seed * 1_000_003))
    keep = torch.cat([few_step_sigmas(cfg.student.denoising_steps, cfg.student.shift), torch.zeros(1)])
    sp = cfg.pretrain_teacher.sampler
    null = uncond.expand(n, -1, -1) if sp.guidance != 1.0 else None
    _, states = sample_synchronous(Denoiser(role.model, "bidirectional", 3, role.prediction, sp.clip_x0), noise,
                                   context, null, steps=sp.steps, guidance=sp.guidance, shift=sp.shift, keep_sigmas=keep)
    assert torch.allclose(shard["states"], states.transpose(0, 1), atol=1e-6)
    assert json.loads((path / "transformer_ema" / "sampling.json").read_text())["role"] == "student"


@pytest.mark.parametrize("method", ["sf_dmd", "df_dmd"])
def test_three_shapes_distill_and_the_real_score_is_never_trained(bid_student, stock, tmp_path, monkeypatch, method):
    cfg, student = bid_student
    seen = capture_method(monkeypatch)
    path = distill.run(asymmetric(cfg, stock, student, tmp_path / "r", method=method)).path
    real = seen["method"].frozen["teacher"]
    stock_real = WanTransformer3DModel.from_pretrained(stock["real"]).state_dict()
    assert all(not p.requires_grad and p.grad is None for p in real.parameters())
    assert_same_weights(real.state_dict(), stock_real)  # never updated
    layers = {sub: json.loads((path / sub / "config.json").read_text())["num_layers"] for sub in ("critic", "transformer")}
    assert layers == {"critic": 2, "transformer": 2} and real.config.num_layers == 3
    fake0 = WanTransformer3DModel.from_pretrained(stock["fake"]).state_dict()
    critic = weights(path, "critic")
    assert any(not torch.equal(critic[k], fake0[k]) for k in critic)  # the fake score trained
    inputs = json.loads((path / "manifest.json").read_text())["inputs"]
    assert set(inputs) == {"student", "teacher", "critic"}


def test_three_shapes_resume_bit_exactly(bid_student, stock, tmp_path, monkeypatch, capsys):
    cfg, student = bid_student
    full = distill.run(asymmetric(cfg, stock, student, tmp_path / "full")).path
    resumed = crash_then_resume(monkeypatch, capsys, distill, asymmetric(cfg, stock, student, tmp_path / "x"),
                                tmp_path / "resumed")
    for sub in ("transformer", "transformer_ema", "critic"):
        assert_same_weights(weights(resumed, sub), weights(full, sub))


def test_mismatched_text_width_is_one_line(bid_student, stock, tmp_path):
    cfg, student = bid_student
    torch.manual_seed(0)
    WanTransformer3DModel(**{**COMMON, "text_dim": 8}, **SHAPES["fake"]).save_pretrained(tmp_path / "narrow")
    d = replace(asymmetric(cfg, stock, student, tmp_path / "r").distill, critic=str(tmp_path / "narrow"))
    with pytest.raises(ConfigError, match=r"fake score .*narrow has text_dim=8"):
        distill.run(replace(cfg, run=replace(cfg.run, dir=str(tmp_path / "r")), distill=d))


def test_self_forcing_ode_init_starts_distill(bid_student, stock, tmp_path, monkeypatch):
    """A Self-Forcing `ode_init.pt` (`generator` entry, Wan key names) is the student of `distill`, which
    runs without an `init_student` stage."""
    cfg, student = bid_student
    monkeypatch.setitem(WAN_HEADS, 32, 2)  # the tiny width stands for a Wan width (whose head count is known)
    sd = load_file(str(student / "transformer_ema" / "diffusion_pytorch_model.safetensors"))
    torch.save({"generator": {"model." + k: v for k, v in diffusers_to_wan(sd).items()}}, tmp_path / "ode_init.pt")
    run = asymmetric(cfg, stock, tmp_path / "ode_init.pt", tmp_path / "r", steps=2)
    path = distill.run(replace(run, run=replace(run.run, stages=["distill"]))).path
    man = json.loads((path / "manifest.json").read_text())
    assert man["status"] == "done" and man["inputs"]["student"]["path"].endswith("ode_init.pt")
    assert not (tmp_path / "r" / "init_student").exists()


def test_offloaded_real_score_gives_the_same_run(bid_student, stock, tmp_path, monkeypatch):
    """distill.teacher_offload: the real score's weights wait in CPU memory (accelerate's cpu_offload: the
    module holds none between calls) and the run is the same, bit for bit."""
    cfg, student = bid_student
    seen = capture_method(monkeypatch)
    off = distill.run(asymmetric(cfg, stock, student, tmp_path / "off", teacher_offload=True)).path
    assert seen["offloaded_devices"] == {"meta"}
    on = distill.run(asymmetric(cfg, stock, student, tmp_path / "on")).path
    for sub in ("transformer", "critic"):
        assert_same_weights(weights(off, sub), weights(on, sub))


@pytest.mark.parametrize("recipe", ["self_forcing", "causal_forcing"])
def test_published_recipes_validate_and_plan(recipe):
    """The recipes load and validate; the plan gives each model its own shape, attention and memory."""
    from pipeline.config import load_config
    from pipeline.plan import plan

    cfg = load_config(Path(f"configs/wan2.1-t2v-1.3b/{recipe}.yaml"))
    text = plan(cfg, list(cfg.run.stages))
    assert "real score: 14.3B params (40 layers x 5120), attention bidirectional" in text
    assert "fake score: 1.42B params (30 layers x 1536), attention bidirectional" in text
    assert "real score: 14.3B params, 40 layers x 5120, offloaded to the CPU" in text
    assert "with distill.teacher_offload=false" in text and text.count("GiB per device") == len(cfg.run.stages)


def test_a_student_is_refused_where_a_score_model_is_needed(trained_stage, student_stage, tmp_path, capsys):
    """init_student's teacher and distill's real and fake scores are many-step models: a few-step student (its
    record's role) is a one-line error naming the key."""
    _, teacher = trained_stage
    _, stage = student_stage
    for key in ("init_student.teacher", "distill.teacher", "distill.critic"):
        stages = "init_student" if key.startswith("init") else "distill"
        rc, err = call(capsys, launch, "configs/tiny.yaml", "--stages", stages, *TINY_OVERRIDES,
                       f"run.dir={tmp_path / key}", f"distill.student={stage}", f"distill.teacher={teacher}",
                       f"{key}={stage}")
        one_error(rc, err, key, "is a student", "must be a many-step model")
