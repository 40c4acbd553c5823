"""Prompt switching in the samplers (SPRITES.md "Switched videos"; LongLive's KV re-cache) and in training
(switch DMD): which chunks see which prompt, what the re-cached window holds, and what the scores judge."""

import pytest
import torch

from pipeline.diffusion.sampling import (ContextWindow, Denoiser, few_step_rollout, few_step_sigmas, prompt_at,
                                         sample_autoregressive)
from pipeline.diffusion.videos import sample_videos
from tests.conftest import make_tiny_model

FPC, B, D = 3, 2, 16


def denoiser(rope="relative", kv_cache="dynamic"):
    return Denoiser(make_tiny_model(), "block_causal", FPC, "x0", 1.0, rope=rope, kv_cache=kv_cache)


def prompts(seed=0, n=3):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(B, 2, D, generator=g) for _ in range(n)]


def noise(frames, seed=1):
    return torch.randn(B, 3, frames, 8, 8, generator=torch.Generator().manual_seed(seed))


def rollout(den, x, cond, **kw):
    sig = few_step_sigmas([1000, 500], 1.0)
    exits = [len(sig) - 1] * (x.shape[2] // FPC)
    with torch.no_grad():
        return few_step_rollout(den, x, cond, sig, exits, generator=torch.Generator().manual_seed(3), **kw)


def test_prompt_in_force_from_the_first_chunk_starting_at_the_switch():
    a, b, c = prompts()
    sw = [(4, b), (9, c)]
    assert [prompt_at(a, sw, s) is p for s, p in ((0, a), (3, a), (6, b), (9, c), (12, c))] == [True] * 5


@pytest.mark.parametrize("recache", [False, True])
def test_chunks_before_the_switch_are_unchanged_and_later_ones_follow_the_new_prompt(recache):
    den, (a, b, _) = denoiser(), prompts()
    x = noise(12)
    plain = rollout(den, x, a, max_context_frames=6)
    switched = rollout(den, x, a, max_context_frames=6, switches=[(6, b)], recache=recache)
    assert torch.equal(switched[:, :, :6], plain[:, :, :6])  # block-causal: the past never sees the future
    assert not torch.allclose(switched[:, :, 6:], plain[:, :, 6:], atol=1e-3)
    other = rollout(den, x, a, max_context_frames=6, switches=[(6, b)], recache=not recache)
    assert torch.equal(other[:, :, :6], plain[:, :, :6])
    assert not torch.allclose(other[:, :, 6:], switched[:, :, 6:], atol=1e-4)  # the two cache policies differ


@pytest.mark.parametrize("rope", ["relative", "absolute"])
@pytest.mark.parametrize("kv_cache", ["dynamic", "static"])
def test_recache_under_the_same_prompt_without_eviction_changes_nothing(rope, kv_cache):
    """Nothing evicted: the rebuilt cache holds the very keys the stream wrote (same chunks, same order,
    same positions), so the rollout is bit-identical to one without a switch."""
    den, (a, _, _) = denoiser(rope, kv_cache), prompts()
    x = noise(12)
    plain = rollout(den, x, a, fuse_cache_write=False)
    again = rollout(den, x, a, fuse_cache_write=False, switches=[(6, a.clone())], recache=True)
    assert torch.equal(plain, again)


@pytest.mark.parametrize("sinks", [0, 3])
def test_recached_window_equals_a_block_causal_forward_over_the_held_chunks(sinks):
    """After a re-cache at frame 12 with a 6-frame window (3 sinks or none), the next chunk is denoised as if
    the held chunks, clean, were its whole past under the new prompt: one block-causal forward over
    [held chunks, noisy chunk] (relative positions), here with a one-step sampler."""
    den, (a, b, _) = denoiser(), prompts()
    x = noise(15)
    sig = few_step_sigmas([1000], 1.0)
    with torch.no_grad():
        out = few_step_rollout(den, x, a, sig, [0] * 5, max_context_frames=6, sink_frames=sinks,
                               switches=[(12, b)], recache=True)
        held = [0, 9] if sinks else [6, 9]
        ctx = torch.cat([out[:, :, h:h + FPC] for h in held], dim=2)
        inp = torch.cat([ctx, x[:, :, 12:15]], dim=2)
        sigma = torch.cat([torch.zeros(B, 6), torch.ones(B, 3)], dim=1)
        ref = den.predict_x0(inp, sigma, b)[:, :, 6:]
    torch.testing.assert_close(out[:, :, 12:15], ref, atol=1e-5, rtol=0)


def test_kept_cache_writes_the_last_chunk_under_its_own_prompt():
    """Keeping the cache, the chunk before the switch enters it under the old prompt: fused or not, the
    same videos (up to the float rounding of a fused call)."""
    den, (a, b, _) = denoiser(), prompts()
    x = noise(12)
    fused = rollout(den, x, a, switches=[(6, b)])
    split = rollout(den, x, a, switches=[(6, b)], fuse_cache_write=False)
    torch.testing.assert_close(fused, split, atol=1e-5, rtol=0)


def test_context_window_keeps_sinks_and_the_last_window():
    w = ContextWindow(max_frames=9, sink_frames=3)
    for s in range(0, 24, 3):
        w.add(s, (torch.zeros(1, 1, 3, 1, 1), None))
    assert [a for a, _ in w.chunks] == [0, 18, 21]  # the sinks, then the last 6 frames


@pytest.mark.parametrize("recache", [False, True])
def test_teacher_sampler_switches_too(recache):
    den, (a, b, _) = denoiser(), prompts()
    x = noise(9)
    kw = dict(steps=2, max_context_frames=6)
    plain = sample_autoregressive(den, x, a, None, **kw)
    sw = sample_autoregressive(den, x, a, None, switches=[(3, b)], recache=recache, **kw)
    assert torch.equal(sw[:, :, :3], plain[:, :, :3]) and not torch.allclose(sw[:, :, 3:], plain[:, :, 3:], atol=1e-3)
    same = sample_autoregressive(den, x, a, None, switches=[(3, a.clone())], recache=True, **kw)
    torch.testing.assert_close(same, plain, atol=1e-6, rtol=0)  # nothing evicted yet: the same cache rebuilt


def test_bad_switch_frames_are_refused():
    den, (a, b, _) = denoiser(), prompts()
    for sw in ([(0, b)], [(12, b)], [(6, b), (3, a)]):
        with pytest.raises(ValueError, match="prompt switches"):
            rollout(den, noise(12), a, switches=sw)


def test_sample_videos_reads_a_class_schedule(make_cfg):
    cfg = make_cfg()
    model = make_tiny_model(patch_size=(1, 4, 4))
    table = torch.randn(7, 2, D, generator=torch.Generator().manual_seed(5))
    labels = torch.tensor([0, 4])
    kw = dict(frames=6, size=16, frames_per_chunk=FPC, prediction="x0", student=cfg.student, few_step=True)
    plain = sample_videos(model, table, labels, **kw)
    const = sample_videos(model, table, labels[:, None].expand(2, 6), **kw)
    assert torch.equal(plain, const)
    sched = labels[:, None].repeat(1, 6)
    sched[:, 2:] = torch.tensor([1, 5])[:, None]  # switch at frame 2: in force from the chunk at frame 3
    switched = sample_videos(model, table, sched, **kw)
    assert torch.equal(switched[:, :3], plain[:, :3]) and not torch.equal(switched[:, 3:], plain[:, 3:])
    target = sample_videos(model, table, torch.tensor([1, 5]), **kw)
    assert not torch.equal(switched[:, 3:], target[:, 3:])  # the context was made under the first class


def test_switch_dmd_judges_every_frame_under_the_prompt_in_force():
    """LongLive's switch DMD: a switched rollout's scores are the ones under the first prompt before the switch
    and under the new prompt from it on; the critic's denoising loss is the per-frame loss under the prompt in
    force, computed directly here."""
    from pipeline.diffusion.losses import flow_matching_loss
    from pipeline.diffusion.sampling import few_step_sigmas as fss
    from pipeline.methods.dmd import SelfForcingDMD

    gen_den, real = denoiser(), Denoiser(make_tiny_model(seed=1), "block_causal", FPC, "x0", 1.0)
    a, _, _ = prompts()
    method = SelfForcingDMD(generator=gen_den, real=real, fake=real, sigmas=fss([1000, 500], 1.0),
                            switch_prob=1.0, real_guidance=1.0)
    batch = {"context": a, "null": torch.zeros_like(a), "shape": (3, 9, 8, 8)}
    x, stats = method.samples(batch, torch.Generator().manual_seed(0))
    k, cond = batch["switch"]
    assert stats["switched"] == 1.0 and k in (3, 6) and torch.equal(cond, a.roll(1, 0))
    x = x.detach()
    sigma = torch.full((B, 9), 0.5)
    with torch.no_grad():
        got = method.score_x0(real, x, sigma, batch, 1.0)
        before, after = real.predict_x0(x, sigma, a), real.predict_x0(x, sigma, cond)
    assert torch.equal(got[:, :, :k], before[:, :, :k]) and torch.equal(got[:, :, k:], after[:, :, k:])

    g = torch.Generator().manual_seed(7)
    loss, _ = method.critic_loss(batch, g, samples=x)
    g = torch.Generator().manual_seed(7)
    sig = method.draw_sigma(x, g)
    eps = torch.randn(x.shape, generator=g)
    per_frame = []
    for f in range(9):
        one = torch.zeros(B, 9)
        one[:, f] = 1
        per_frame.append(flow_matching_loss(real, x, a if f < k else cond, sig, one, eps, norm=torch.tensor(B * 9.0)))
    torch.testing.assert_close(loss, torch.stack(per_frame).sum(), atol=1e-6, rtol=1e-5)


def test_no_switch_probability_draws_nothing():
    """`switch_prob = 0` (the default) leaves every random stream as it was: runs without switches keep
    their results."""
    from pipeline.diffusion.sampling import few_step_sigmas as fss
    from pipeline.methods.dmd import SelfForcingDMD

    den, (a, _, _) = denoiser(), prompts()
    method = SelfForcingDMD(generator=den, real=den, fake=den, sigmas=fss([1000, 500], 1.0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        x, stats = method.samples({"context": a, "shape": (3, 9, 8, 8)}, g)
    g2 = torch.Generator().manual_seed(0)
    exits = method.exit_steps(3, g2)
    n = torch.randn((B, 3, 9, 8, 8), generator=g2)
    with torch.no_grad():
        ref = few_step_rollout(den, n, a, method.sigmas, exits.tolist(), generator=g2)
    assert torch.equal(x, ref) and "switched" not in stats


def test_switch_training_keys(make_cfg):
    from pipeline.config import ConfigError

    assert make_cfg("distill.switch_prob=0.5").distill.switch_recache
    for bad in (["distill.method=df_dmd"], ["distill.gan_weight=0.1"], ["distill.method=sf_gan"]):
        with pytest.raises(ConfigError, match="distill.switch_prob"):
            make_cfg("distill.switch_prob=0.5", *bad)


def test_sample_switches_and_records_the_schedule(student_stage, tmp_path, capsys):
    """`sample --switch-at K`: the samples file holds the class of every frame; the switch metrics are printed;
    switch options without a switch, or a bad target, are one-line errors."""
    from safetensors.torch import load_file

    from stages import sample
    from tests.conftest import call, one_error

    _, stage = student_stage
    out = tmp_path / "s.safetensors"
    capsys.readouterr()
    assert sample.main([str(stage), "--out", str(out), "--n", "6", "--frames", "9", "--switch-at", "3", "--recache"]) == 0
    assert "switches at [3] (re-cached): new class after the switch" in capsys.readouterr().out
    data = load_file(str(out))
    labels = torch.arange(6)
    assert torch.equal(data["labels"], labels) and data["schedule"].shape == (6, 9)
    assert torch.equal(data["schedule"][:, :3], labels[:, None].expand(6, 3))
    assert torch.equal(data["schedule"][:, 3:], ((labels + 1) % 6)[:, None].expand(6, 6))
    rc, err = call(capsys, sample.main, str(stage), "--out", str(tmp_path / "b.safetensors"), "--recache")
    one_error(rc, err, "--recache and --switch-to need --switch-at")
    rc, err = call(capsys, sample.main, str(stage), "--out", str(tmp_path / "b.safetensors"), "--frames", "9",
                   "--switch-at", "3", "--switch-to", "red")
    one_error(rc, err, "--switch-to must be 'shift' or a class id")
    rc, err = call(capsys, sample.main, str(stage), "--out", str(tmp_path / "b.safetensors"), "--frames", "9",
                   "--switch-at", "9")
    one_error(rc, err, "--switch-at")


def test_distill_trains_with_switches(student_stage, tmp_path):
    """sf_dmd with `switch_prob = 1`: every rollout switches (logged), the run finishes and its student differs
    from one trained without switches."""
    from dataclasses import replace
    from pathlib import Path

    from stages import distill
    from tests.conftest import weights

    cfg, _ = student_stage

    def run(sub, **keys):
        d = replace(cfg.distill, student=str(Path(cfg.run.dir) / "init_student"),
                    teacher=str(Path(cfg.run.dir) / "pretrain_teacher"), steps=2, **keys)
        return distill.run(replace(cfg, run=replace(cfg.run, dir=str(tmp_path / sub)), distill=d)).path

    switched, plain = run("sw", switch_prob=1.0), run("plain")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(next((switched / "logs").rglob("events.out.tfevents*")))).Reload()
    assert {e.value for e in events.Scalars("switched")} == {1.0}
    a, b = weights(switched, "transformer"), weights(plain, "transformer")
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_prompt_schedule_lines():
    from pipeline.data.prompts import parse_schedule

    assert parse_schedule("a cat walks") == [(0, "a cat walks")]
    assert parse_schedule("a cat walks || 6: the cat sits ||12:it sleeps") == [(0, "a cat walks"), (6, "the cat sits"),
                                                                              (12, "it sleeps")]
    for bad in ("a || b", "a || 6:", "a || 6: b || 3: c", "a || 0: b", "|| 3: b", "a || x: b"):
        with pytest.raises(ValueError, match="prompt schedule"):
            parse_schedule(bad)
