"""Long self-rollout tuning (distill.long_frames): the student rolls out past the clip with its KV window, the
scores judge one clip-length window of it, gradients reach only that window's exit steps."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from pipeline.config import ConfigError
from pipeline.diffusion.sampling import Denoiser, few_step_sigmas
from pipeline.methods.dmd import SelfForcingDMD
from stages import distill
from tests.conftest import assert_same_weights, crash_then_resume, make_tiny_model, weights

FPC = 3


def method(long_frames, window=3, **kw):
    den = Denoiser(make_tiny_model(), "block_causal", FPC, "x0", 1.0)
    return SelfForcingDMD(generator=den, real=den, fake=den, sigmas=few_step_sigmas([1000, 500], 1.0),
                          max_context_frames=window, long_frames=long_frames, per_chunk_exit=True, **kw)


def batch():
    cond = torch.randn(2, 2, 16, generator=torch.Generator().manual_seed(0))
    return {"context": cond, "null": torch.zeros_like(cond), "shape": (3, 6, 8, 8)}


def saved_bytes_and_grad_calls(m, start):
    """Bytes autograd keeps for the window's samples and the number of network calls that carry gradients."""
    m.window_start = lambda clip_chunks, gen: start
    kept, calls = [], []
    handle = m.generator.model.register_forward_hook(lambda mod, a, out: calls.append(out.requires_grad))

    def pack(t):
        kept.append(t.numel() * t.element_size())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        x, stats = m.samples(batch(), torch.Generator().manual_seed(1))
    handle.remove()
    assert x.shape[2] == 6 and x.requires_grad and stats["window_start"] == start * FPC
    return sum(kept), sum(calls)


def test_what_autograd_keeps_does_not_grow_with_the_rollout():
    """The window at the end of a 12- and a 30-frame rollout: the same bytes kept for backward (the context is
    the KV window either way) and exactly one call with gradients per window chunk (its exit step)."""
    short = saved_bytes_and_grad_calls(method(12), start=2)
    long = saved_bytes_and_grad_calls(method(30), start=8)
    assert short == long and short[1] == 2 and short[0] > 0


def test_gradients_reach_only_the_window():
    m = method(12)
    m.window_start = lambda clip_chunks, gen: 2
    x, _ = m.samples(batch(), torch.Generator().manual_seed(1))
    x.sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in m.generator.model.parameters())


def test_window_start_is_uniform_over_the_rollout_and_absent_without_long_frames():
    g = torch.Generator().manual_seed(0)
    starts = {method(15).window_start(2, g) for _ in range(60)}
    assert starts == {0, 1, 2, 3}
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert method(None).window_start(2, g1) == 0 and torch.equal(g1.get_state(), g2.get_state())


def test_long_frames_keys(make_cfg):
    assert make_cfg("distill.long_frames=12").distill.long_frames == 12
    for bad in (["distill.long_frames=7"], ["distill.long_frames=3"],
                ["distill.long_frames=12", "distill.method=df_dmd"],
                ["distill.long_frames=12", "distill.switch_prob=0.5"]):
        with pytest.raises(ConfigError, match="distill.long_frames"):
            make_cfg(*bad)


def test_long_tuning_resumes_bit_exactly(student_stage, tmp_path, monkeypatch, capsys):
    cfg, _ = student_stage

    def long_cfg(run_dir):
        d = replace(cfg.distill, student=str(Path(cfg.run.dir) / "init_student"),
                    teacher=str(Path(cfg.run.dir) / "pretrain_teacher"), long_frames=12)
        return replace(cfg, run=replace(cfg.run, dir=str(run_dir)), distill=d)
    full = distill.run(long_cfg(tmp_path / "full")).path
    resumed = crash_then_resume(monkeypatch, capsys, distill, long_cfg(tmp_path / "x"), tmp_path / "resumed")
    for sub in ("transformer", "transformer_ema", "critic"):
        assert_same_weights(weights(resumed, sub), weights(full, sub))
