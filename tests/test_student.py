"""The causal student: ODE pairs (recorded path, resumable shards), CausVid's regression, the
init_student stage (outputs, resume, errors) and sampling a student from the command line."""

import json

import pytest
import torch
from safetensors.torch import load_file

from pipeline.config import SamplerConfig
from pipeline.diffusion.losses import ode_regression_loss, pick_ode_states
from pipeline.data.ode_pairs import OdePairs, shard_path, write_ode_pairs
from pipeline.diffusion.sampling import (Denoiser, _euler, few_step_sigmas, sample_autoregressive, sampling_sigmas,
                               schedule_through)
from stages import init_student, sample
from tests.conftest import Interrupt, assert_same_weights, crash_then_resume, make_tiny_model, weights

SHAPE = (3, 6, 4, 4)  # C, F, H, W of the tiny pair tests


def test_schedule_through_lands_on_every_stop():
    sigmas, idx = schedule_through(sampling_sigmas(4), torch.tensor([1.0, 0.9, 0.5, 0.0]))
    assert torch.allclose(sigmas, torch.tensor([1.0, 0.9, 0.75, 0.5, 0.25, 0.0]))
    assert idx == (0, 1, 3, 5)


@torch.no_grad()
@pytest.mark.parametrize("lag", [0, 2])
def test_recorded_states_lie_on_the_sampled_path(lag):
    """States at σ=1 are the starting noise, at σ=0 the samples, and resuming the ODE from a recorded
    state of the first chunk reaches the same end point."""
    model = make_tiny_model()
    den = Denoiser(model, "block_causal", 3)
    g = torch.Generator().manual_seed(0)
    noise, cond = torch.randn(2, *SHAPE, generator=g), torch.randn(2, 5, 16, generator=g)
    keep = torch.tensor([1.0, 0.6, 0.0])
    out, states = sample_autoregressive(den, noise, cond, None, steps=5, lag=lag, keep_sigmas=keep)
    assert states.shape == (3, *noise.shape)
    assert torch.equal(states[0], noise) and torch.equal(states[-1], out)
    # Recording leaves the path alone; with lag 0, the ODE continued from a recorded state of the first
    # chunk (its σ=0.6 entry) over the rest of the schedule reaches the same end point.
    sigmas, idx = schedule_through(sampling_sigmas(5), keep)
    chunk = noise[:, :, :3]
    x, kept = _euler(den, chunk, cond, None, 1.0, sigmas, lag=lag, keep=idx)
    assert torch.equal(x, _euler(den, chunk, cond, None, 1.0, sigmas, lag=lag))
    assert torch.equal(x, out[:, :, :3]) and torch.equal(kept, states[:, :, :, :3])
    if lag == 0:
        tail = _euler(den, kept[1], cond, None, 1.0, sigmas[idx[1]:])
        assert torch.allclose(tail, x, atol=1e-5)


def _write(folder, model, n=6, shard=4, crash_at=None, sigmas=None, batch_size=None):
    calls = []

    def conditions(start, count):
        if crash_at is not None and start >= crash_at:
            raise Interrupt("crash while sampling a shard")
        calls.append(start)
        labels = torch.arange(start, start + count) % 3
        return torch.randn(count, 5, 16, generator=torch.Generator().manual_seed(start)), labels

    sampler = SamplerConfig(steps=3, guidance=1.0, lag=1)
    write_ode_pairs(folder, Denoiser(model, "block_causal", 3), conditions, None, n, shard, SHAPE,
                    sigmas if sigmas is not None else few_step_sigmas(shift=1.0), sampler, seed=0,
                    batch_size=batch_size)
    return calls


@torch.no_grad()
def test_ode_pairs_sampled_in_smaller_batches_are_the_same(tmp_path):
    """`init_student.ode_batch_size`: a shard's videos sampled a few at a time (a smaller KV cache) give
    the pairs of the whole shard at once."""
    model = make_tiny_model()
    _write(tmp_path / "whole", model, n=6, shard=4)
    _write(tmp_path / "batched", model, n=6, shard=4, batch_size=3)
    a, b = OdePairs(tmp_path / "whole"), OdePairs(tmp_path / "batched")
    # equal up to the batch size's matmul kernels (1.03e-6 seen on one CPU, so not 1e-6)
    torch.testing.assert_close(b.states, a.states, atol=1e-5, rtol=0)
    assert torch.equal(a.labels, b.labels) and a.states.shape[0] == 6


@torch.no_grad()
def test_ode_shards_resume_after_crash(tmp_path):
    """A crash in shard 2 keeps shards 0-1; the rerun writes only shard 2, and the result equals an
    uninterrupted run byte for byte."""
    model = make_tiny_model()
    _write(tmp_path / "full", model, n=10)
    with pytest.raises(Interrupt):
        _write(tmp_path / "crashed", model, n=10, crash_at=8)
    crashed = tmp_path / "crashed"
    assert sorted(p.name for p in crashed.iterdir()) == ["shard_00000.safetensors", "shard_00001.safetensors"]
    before = shard_path(crashed, 0).stat().st_mtime_ns
    assert _write(crashed, model, n=10) == [8]  # only the missing shard is sampled
    assert shard_path(crashed, 0).stat().st_mtime_ns == before
    for i in range(3):
        a, b = load_file(str(shard_path(tmp_path / "full", i))), load_file(str(shard_path(crashed, i)))
        assert a.keys() == b.keys() == {"states", "sigmas", "context", "labels"}
        for k in a:
            assert torch.equal(a[k], b[k]), k
    pairs = OdePairs(crashed)
    assert len(pairs) == 10 and pairs.states.shape == (10, 5, *SHAPE)
    assert torch.equal(pairs.sigmas, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    # A torn shard (written outside the atomic rename) is made again; shards of other levels are an error.
    f = shard_path(crashed, 2)
    f.write_bytes(f.read_bytes()[:100])
    assert _write(crashed, model, n=10) == [8]
    with pytest.raises(ValueError, match="levels.*--force"):
        _write(crashed, model, n=10, sigmas=few_step_sigmas(shift=5.0))


def test_pick_ode_states_per_chunk():
    k1, f, fpc = 5, 6, 3
    states = torch.arange(k1, dtype=torch.float)[None, :, None, None, None, None].expand(8, k1, 2, f, 2, 2)
    sigmas = torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0])
    x, sigma = pick_ode_states(states, sigmas, fpc, torch.Generator().manual_seed(0))
    assert x.shape == (8, 2, f, 2, 2) and sigma.shape == (8, f)
    k = x[:, 0, :, 0, 0].long()  # the state index each frame was taken from
    assert torch.equal(sigma, sigmas[k])
    assert (k[:, :3] == k[:, :1]).all() and (k[:, 3:] == k[:, 3:4]).all()  # one index per chunk
    assert (k == k1 - 1).any() and (k < k1 - 1).any()  # clean entries are drawn too (as context)


def test_regression_loss_skips_clean_chunks():
    class Echo(torch.nn.Module):  # predicts x0 = its input
        def forward(self, x, t, ctx, **kw):
            return x

    den = Denoiser(Echo(), "block_causal", 3, prediction="x0")
    x0 = torch.zeros(2, 3, 6, 2, 2)
    x = torch.ones_like(x0)
    x[:, :, :3] = 5.0  # the first chunk is "clean": its error must not count
    sigma = torch.tensor([[0.0] * 3 + [0.5] * 3] * 2)
    assert ode_regression_loss(den, x, sigma, None, x0).item() == pytest.approx(1.0)
    assert ode_regression_loss(den, x, torch.zeros(2, 6), None, x0).item() == 0.0  # all clean: nothing to fit


def test_regression_loss_decreases():
    """Regressing a tiny student onto a tiny teacher's ODE pairs lowers the loss on those pairs."""
    torch.manual_seed(0)
    teacher = make_tiny_model(seed=1)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        noise, cond = torch.randn(8, *SHAPE, generator=g), torch.randn(8, 5, 16, generator=g)
        keep = torch.cat([few_step_sigmas(shift=1.0), torch.zeros(1)])
        _, states = sample_autoregressive(Denoiser(teacher, "block_causal", 3), noise, cond, None, steps=4,
                                          keep_sigmas=keep)
    states = states.transpose(0, 1)
    student = make_tiny_model(seed=2).train()
    den = Denoiser(student, "block_causal", 3)
    opt = torch.optim.AdamW(student.parameters(), lr=3e-3)

    def full_loss():  # every chunk at every level, a fixed measure of fit
        with torch.no_grad():
            return sum(ode_regression_loss(den, states[:, k], keep[k].expand(8, SHAPE[1]), cond, states[:, -1])
                       for k in range(4)).item()

    before = full_loss()
    gen = torch.Generator().manual_seed(1)
    for _ in range(60):
        x, sigma = pick_ode_states(states, keep, 3, gen)
        loss = ode_regression_loss(den, x, sigma, cond, states[:, -1])
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert full_loss() < 0.5 * before


def test_init_student_outputs(student_stage, trained_stage):
    cfg, path = student_stage
    man = json.loads((path / "manifest.json").read_text())
    assert man["status"] == "done" and man["metrics"]["steps"] == cfg.init_student.steps
    assert man["metrics"]["ode_pairs"] == cfg.init_student.ode_pairs
    assert man["inputs"]["teacher"]["path"].endswith("pretrain_teacher/transformer_ema")
    assert len(list((path / "ode_pairs").glob("shard_*.safetensors"))) == 2  # 6 pairs in shards of 4
    conf = json.loads((path / "transformer_ema" / "sampling.json").read_text())["config"]["student"]
    assert conf["denoising_steps"] == [1000, 750, 500, 250] and conf["shift"] == cfg.student.shift
    assert (path / "preview.gif").is_file() and list((path / "logs").rglob("events.out.tfevents*"))
    # The student started from the teacher's EMA weights and moved away from them.
    teacher = weights(trained_stage[1], "transformer_ema")
    student = weights(path, "transformer")
    assert teacher.keys() == student.keys()
    assert any(not torch.equal(teacher[k], student[k]) for k in teacher)


def test_init_student_crash_resume_equals_uninterrupted(student_stage, tmp_path, monkeypatch, capsys):
    cfg, path = student_stage
    resumed = crash_then_resume(monkeypatch, capsys, init_student, cfg, tmp_path / "run", ["pretrain_teacher"])
    for sub in ("transformer", "transformer_ema"):
        assert_same_weights(weights(resumed, sub), weights(path, sub))


def test_init_student_without_teacher_is_one_line_error(make_cfg):
    cfg = make_cfg()
    with pytest.raises(FileNotFoundError, match="pretrain_teacher"):
        init_student.run(cfg)


def test_sample_student_reports_speed(student_stage, tmp_path, capsys):
    _, path = student_stage
    out = tmp_path / "s.safetensors"
    assert sample.main([str(path), "--out", str(out), "--n", "6", "--frames", "12"]) == 0
    printed = capsys.readouterr().out
    assert "4-step student" in printed and "frames/s" in printed and "first chunk after" in printed
    t = load_file(str(out))
    assert t["videos"].shape[:2] == (6, 12) and t["videos"].abs().max() <= 1
    assert sample.main([str(path), "--out", str(tmp_path / "k2.safetensors"), "--n", "6", "--steps", "2"]) == 0
    assert "2-step student" in capsys.readouterr().out
    assert sample.main([str(path), "--out", str(tmp_path / "g.safetensors"), "--n", "6", "--guidance", "2"]) == 2
    assert "apply to teachers" in capsys.readouterr().err
    assert sample.main([str(path), "--out", str(tmp_path / "g.safetensors"), "--n", "6", "--lag", "0"]) == 2
    assert "--lag apply to teachers" in capsys.readouterr().err
