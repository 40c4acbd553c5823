"""Switched videos (SPRITES.md addendum): schedules, the generator, the checker and score_switched."""

import json

import pytest
import torch

import pipeline.evaluation.checker as checker_mod
import pipeline.evaluation.switching as switching_mod
from pipeline.data.sprites import (
    SpriteParams,
    make_switched_videos,
    make_videos,
    mode_velocity,
    render,
    sample_params,
    switch_schedule,
    trajectory,
)
from pipeline.evaluation.checker import check_frames, score
from pipeline.evaluation.switching import score_switched

METRICS = ("post_switch_valid", "first_chunk_valid", "lawful_across_switch", "pre_switch_valid",
           "valid_frames", "lawful_transitions")


def params(n, size, seed=0):
    return sample_params(torch.Generator().manual_seed(seed), n, size)


def positions_of(p, frames, size):
    vx, vy = mode_velocity(p.mode, size)
    return trajectory(p.x, p.y, vx, vy, frames, size)


def reference_render_frame(x, y, c, size):
    """One frame ``[3, S, S]`` pixel by pixel, straight from the spec."""
    s = size // 4
    out = -torch.ones(3, size, size)
    for i in range(s):
        for j in range(s):
            if c % 2 == 0 or (i + 0.5 - s / 2) ** 2 + (j + 0.5 - s / 2) ** 2 <= (s / 2) ** 2:
                out[c // 2, y + i, x + j] = 1.0
    return out


# --- switch_schedule -------------------------------------------------------------------------


def test_switch_schedule_shift_wraps_and_never_gives_null_class():
    labels = torch.arange(6)
    sch = switch_schedule(labels, 10, [3, 7])
    assert sch.dtype == torch.long and sch.shape == (6, 10)
    for n in range(6):
        c = n
        assert sch[n, :3].tolist() == [c] * 3
        assert sch[n, 3:7].tolist() == [(c + 1) % 6] * 4
        assert sch[n, 7:].tolist() == [(c + 2) % 6] * 3
    assert sch.max() == 5 and sch.min() == 0
    assert sch[5, 3] == 0 and sch[4, 7] == 0  # 5 -> 0, 4 -> 5 -> 0: never 6
    assert torch.equal(switch_schedule(labels, 10, 4), switch_schedule(labels, 10, [4]))


def test_switch_schedule_int_and_sequence_targets():
    labels = torch.tensor([0, 3, 5])
    sch = switch_schedule(labels, 8, (2, 5), to=4)
    assert sch.tolist() == [[0, 0, 4, 4, 4, 4, 4, 4], [3, 3, 4, 4, 4, 4, 4, 4], [5, 5, 4, 4, 4, 4, 4, 4]]
    sch = switch_schedule(labels, 8, [2, 5], to=[1, 0])
    assert sch.tolist() == [[0, 0, 1, 1, 1, 0, 0, 0], [3, 3, 1, 1, 1, 0, 0, 0], [5, 5, 1, 1, 1, 0, 0, 0]]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(at=0), "at must satisfy"),
        (dict(at=8), "at must satisfy"),
        (dict(at=[3, 3]), "at must satisfy"),
        (dict(at=[5, 3]), "at must satisfy"),
        (dict(at=[]), "at must be"),
        (dict(at=True), "at must be"),
        (dict(at=[2.5]), "at must be an int"),
        (dict(at=3, to=6), "to must hold classes"),
        (dict(at=3, to=-1), "to must hold classes"),
        (dict(at=[2, 4], to=[1]), "one class per switch"),
        (dict(at=3, to="cycle"), "to must be"),
        (dict(at=3, to=2.0), "to must be"),
    ],
)
def test_switch_schedule_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        switch_schedule(torch.tensor([0, 1]), 8, **kwargs)


def test_switch_schedule_rejects_bad_labels():
    with pytest.raises(ValueError, match="labels must be in 0..5"):
        switch_schedule(torch.tensor([0, 6]), 8, 3)
    with pytest.raises(ValueError, match=r"labels must be \[N\]"):
        switch_schedule(torch.zeros(2, 8, dtype=torch.long), 8, 3)
    with pytest.raises(ValueError, match="integers"):
        switch_schedule(torch.tensor([0.0, 1.0]), 8, 3)


# --- generator -------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [16, 32])
def test_render_schedule_constant_equals_labels(size):
    p = params(12, size, seed=1)
    pos = positions_of(p, 7, size)
    a = render(pos, p.cls, size)
    b = render(pos, p.cls[:, None].expand(12, 7).contiguous(), size)
    assert torch.equal(a, b)


@pytest.mark.parametrize("size", [16, 32])
def test_render_schedule_per_frame_matches_reference(size):
    p = params(4, size, seed=2)
    pos = positions_of(p, 5, size)
    sch = torch.randint(0, 6, (4, 5), generator=torch.Generator().manual_seed(3))
    v = render(pos, sch, size)
    for n in range(4):
        for f in range(5):
            x, y = (int(t) for t in pos[n, f])
            assert torch.equal(v[n, f], reference_render_frame(x, y, int(sch[n, f]), size))


def test_render_rejects_bad_label_shapes():
    pos = torch.zeros(2, 3, 2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"labels must be \[2\] or a per-frame schedule \[2, 3\]"):
        render(pos, torch.zeros(2, 4, dtype=torch.long), 16)
    with pytest.raises(ValueError, match="labels must be"):
        render(pos, torch.zeros(3, dtype=torch.long), 16)
    with pytest.raises(ValueError, match="0..5"):
        render(pos, torch.full((2, 3), 6), 16)


@pytest.mark.parametrize("size", [16, 32])
def test_constant_schedule_equals_make_videos(size):
    p = params(20, size, seed=4)
    expected, _ = make_videos(p, 9, size)
    got = make_switched_videos(p, 9, size, p.cls[:, None].repeat(1, 9))
    assert torch.equal(got, expected)


@pytest.mark.parametrize("size", [16, 32])
def test_switched_videos_keep_motion_and_change_appearance(size):
    p = params(18, size, seed=5)
    k = 6
    sch = switch_schedule(p.cls, 12, k)
    v = make_switched_videos(p, 12, size, sch)
    before, _ = make_videos(p, 12, size)
    after, _ = make_videos(SpriteParams(sch[:, -1], p.mode, p.x, p.y), 12, size)
    assert torch.equal(v[:, :k], before[:, :k])
    assert torch.equal(v[:, k:], after[:, k:])
    # The checker reads the generator's positions back, through the switch.
    valid, pos = check_frames(v, sch)
    assert valid.all() and torch.equal(pos, positions_of(p, 12, size))


def test_make_switched_videos_rejects_bad_schedule():
    p = params(3, 16)
    with pytest.raises(ValueError, match=r"schedule must be \[N, F\] = \[3, 5\]"):
        make_switched_videos(p, 5, 16, torch.zeros(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="schedule must be integers"):
        make_switched_videos(p, 5, 16, torch.zeros(3, 5))
    with pytest.raises(ValueError, match="0..5"):
        make_switched_videos(p, 5, 16, torch.full((3, 5), 6))


# --- checker with a schedule -----------------------------------------------------------------


@pytest.mark.parametrize("size", [16, 32])
def test_check_frames_schedule_agrees_with_per_class_checks(size):
    p = params(10, size, seed=6)
    gen = torch.Generator().manual_seed(7)
    shown = torch.randint(0, 6, (10, 8), generator=gen)
    v = make_switched_videos(p, 8, size, shown)
    # Judge against a schedule that agrees with what is shown on about half of the frames.
    asked = torch.where(torch.rand(10, 8, generator=gen) < 0.5, shown, torch.randint(0, 6, (10, 8), generator=gen))
    valid, pos = check_frames(v, asked)
    per_class = [check_frames(v, torch.full((10,), c)) for c in range(6)]
    for n in range(10):
        for f in range(8):
            c = int(asked[n, f])
            assert bool(valid[n, f]) == bool(per_class[c][0][n, f]) == (c == int(shown[n, f]))
            assert torch.equal(pos[n, f], per_class[c][1][n, f])
    assert 0 < valid.sum() < valid.numel()
    # Per-video labels and the constant schedule give the same result.
    lab = shown[:, 0]
    a, b = check_frames(v, lab), check_frames(v, lab[:, None].expand(10, 8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_checker_and_scorer_do_not_use_the_generator():
    for mod in (checker_mod, switching_mod):
        names = vars(mod)
        assert "render" not in names and "trajectory" not in names and "make_videos" not in names


def test_score_still_requires_per_video_labels():
    p = params(2, 16)
    v, lab = make_videos(p, 4, 16)
    with pytest.raises(ValueError, match=r"labels must be \[2\] to match"):
        score(v, lab[:, None].expand(2, 4))


# --- score_switched --------------------------------------------------------------------------


@pytest.mark.parametrize("size", [16, 32])
@pytest.mark.parametrize(
    "at, to",
    [(5, "shift"), (8, "shift"), ([3, 8, 13], "shift"), ([5, 6], "shift"), (9, 2), ([4, 10], [5, 0])],
)
def test_reference_switched_videos_score_one(size, at, to):
    frames, fpc = 16, 4
    p = params(24, size, seed=8)
    sch = switch_schedule(p.cls, frames, at, to=to)
    r = score_switched(make_switched_videos(p, frames, size, sch), sch, fpc)
    json.dumps(r)
    expected_switches = int((sch[:, 1:] != sch[:, :-1]).sum())
    assert r["switches"] == expected_switches > 0
    for key in METRICS:
        assert r[key] == 1.0, key
    assert r["per_frame_valid"] == [1.0] * frames
    assert r["num_videos"] == 24 and r["num_frames"] == frames and r["frames_per_chunk"] == fpc


@pytest.mark.parametrize("k", [5, 8])
def test_ignoring_the_switch_scores_zero_after_it(k):
    size, frames, fpc = 16, 16, 4
    p = params(12, size, seed=9)
    sch = switch_schedule(p.cls, frames, k)
    stale, _ = make_videos(p, frames, size)  # old class throughout
    r = score_switched(stale, sch, fpc)
    assert r["post_switch_valid"] == 0.0 and r["first_chunk_valid"] == 0.0
    assert r["pre_switch_valid"] == 1.0
    assert r["lawful_across_switch"] < 1.0
    # Mid-chunk (k=5) the frames 5..7 of the chunk in progress may keep the old class; aligned (k=8) not.
    assert r["valid_frames"] == 0.5  # frames 0..7 valid either way, 8..15 not
    assert r["per_frame_valid"][:8] == [1.0] * 8 and r["per_frame_valid"][8:] == [0.0] * 8


@pytest.mark.parametrize("size", [16, 32])
def test_motion_restart_at_switch_is_unlawful(size):
    frames, fpc, k = 16, 4, 6
    s, lim = size // 4, size - size // 4
    p = params(10, size, seed=10)
    sch = switch_schedule(p.cls, frames, k)
    pos = positions_of(p, frames, size)
    # Restart far away (more than one step of k = S/16 on x) with the same mode.
    x2 = (pos[:, k - 1, 0] + size // 2) % (lim + 1)
    assert ((x2 - pos[:, k - 1, 0]).abs() > size // 16).all()
    p2 = SpriteParams(p.cls, p.mode, x2, pos[:, k - 1, 1])
    pos2 = positions_of(p2, frames - k, size)
    restarted = torch.cat([pos[:, :k], pos2], dim=1)
    assert restarted.max() <= lim and s > 0
    r = score_switched(render(restarted, sch, size), sch, fpc)
    assert r["post_switch_valid"] == 1.0 and r["first_chunk_valid"] == 1.0 and r["valid_frames"] == 1.0
    # Exactly one unlawful transition (k-1 -> k) among the 2 fpc - 1 around K' = 8; the rest are lawful
    # because the checker judges the transition after an unlawful one afresh.
    assert r["lawful_across_switch"] == pytest.approx(1 - 1 / (2 * fpc - 1))
    assert r["lawful_transitions"] == pytest.approx(1 - 1 / (frames - 1))


def test_chunk_in_progress_may_show_either_class():
    size, frames, fpc, k = 16, 12, 4, 5  # switch mid-chunk: K = 5, K' = 8
    p = params(12, size, seed=11)
    sch = switch_schedule(p.cls, frames, k)
    late = switch_schedule(p.cls, frames, 8)  # switches only at the chunk start K'
    for shown in (sch, late):
        r = score_switched(make_switched_videos(p, frames, size, shown), sch, fpc)
        for key in METRICS:
            assert r[key] == 1.0, key
    # Mixed: frame 6 new, frames 5 and 7 old; still fine.
    mixed = sch.clone()
    mixed[:, 5], mixed[:, 7] = sch[:, 4], sch[:, 4]
    assert score_switched(make_switched_videos(p, frames, size, mixed), sch, fpc)["valid_frames"] == 1.0
    # A third class in the chunk in progress is not allowed.
    third = sch.clone()
    third[:, 6] = (sch[:, 6] + 1) % 6
    r = score_switched(make_switched_videos(p, frames, size, third), sch, fpc)
    assert r["per_frame_valid"][6] == 0.0 and r["valid_frames"] == pytest.approx(11 / 12)
    assert r["post_switch_valid"] == 1.0
    # Switching too early (before K) is wrong.
    early = switch_schedule(p.cls, frames, 3)
    r = score_switched(make_switched_videos(p, frames, size, early), sch, fpc)
    assert r["pre_switch_valid"] == pytest.approx(3 / 5) and r["post_switch_valid"] == 1.0
    # Switching late (after K') is wrong from K' on.
    r = score_switched(make_switched_videos(p, frames, size, switch_schedule(p.cls, frames, 9)), sch, fpc)
    assert r["first_chunk_valid"] == pytest.approx(3 / 4) and r["post_switch_valid"] == pytest.approx(3 / 4)


def test_aligned_switch_has_no_grace():
    size, frames, fpc = 16, 12, 4
    p = params(6, size, seed=12)
    sch = switch_schedule(p.cls, frames, 8)
    late = switch_schedule(p.cls, frames, 9)
    r = score_switched(make_switched_videos(p, frames, size, late), sch, fpc)
    assert r["per_frame_valid"][8] == 0.0 and r["first_chunk_valid"] == pytest.approx(3 / 4)


def test_several_switches_in_one_chunk():
    size, frames, fpc = 16, 12, 4
    p = params(6, size, seed=13)
    sch = switch_schedule(p.cls, frames, [5, 6])  # both in chunk [4, 8): K' = 8 for both
    c0, c1, c2 = sch[:, 4], sch[:, 5], sch[:, 6]
    for c in (c0, c1, c2):
        shown = sch.clone()
        shown[:, 6] = c
        r = score_switched(make_switched_videos(p, frames, size, shown), sch, fpc)
        assert r["valid_frames"] == 1.0 and r["switches"] == 12
    # Frame 5 may show c0 or c1 but not c2 (the second switch is at 6).
    shown = sch.clone()
    shown[:, 5] = c2
    assert score_switched(make_switched_videos(p, frames, size, shown), sch, fpc)["per_frame_valid"][5] == 0.0


def blank(videos, frame):
    out = videos.clone()
    out[:, frame] = -1.0
    return out


def test_metric_arithmetic():
    size, fpc = 16, 4
    p = params(1, size, seed=14)
    # One switch at K = 5 (K' = 8), F = 12, frame 9 blank.
    sch = switch_schedule(p.cls, 12, 5)
    r = score_switched(blank(make_switched_videos(p, 12, size, sch), 9), sch, fpc)
    assert r["post_switch_valid"] == pytest.approx(3 / 4) and r["first_chunk_valid"] == pytest.approx(3 / 4)
    assert r["lawful_across_switch"] == pytest.approx(5 / 7)  # transitions 4->5 ... 10->11; 8->9, 9->10 bad
    assert r["valid_frames"] == pytest.approx(11 / 12) and r["lawful_transitions"] == pytest.approx(9 / 11)
    assert r["pre_switch_valid"] == 1.0 and r["switches"] == 1
    # One switch at K = 3 (K' = 4), F = 16: the post window is 4..15, its first chunk 4..7.
    sch = switch_schedule(p.cls, 16, 3)
    r = score_switched(blank(make_switched_videos(p, 16, size, sch), 12), sch, fpc)
    assert r["post_switch_valid"] == pytest.approx(11 / 12) and r["first_chunk_valid"] == 1.0
    assert r["lawful_across_switch"] == 1.0  # transitions 0->1 ... 6->7 only
    # Two switches (K' = 8 and 12), F = 16: windows [8, 12) and [12, 16); frame 13 blank.
    sch = switch_schedule(p.cls, 16, [5, 10])
    r = score_switched(blank(make_switched_videos(p, 16, size, sch), 13), sch, fpc)
    assert r["post_switch_valid"] == pytest.approx(7 / 8) and r["first_chunk_valid"] == pytest.approx(7 / 8)
    # Around K' = 8: 7 lawful of 7; around K' = 12: 8..15, 12->13 and 13->14 unlawful: 5 of 7.
    assert r["lawful_across_switch"] == pytest.approx(12 / 14)
    # A switch in the last chunk: no frame after K' = F, but the transitions before it count.
    sch = switch_schedule(p.cls, 12, 10)
    r = score_switched(make_switched_videos(p, 12, size, sch), sch, fpc)
    assert r["post_switch_valid"] is None and r["first_chunk_valid"] is None
    assert r["lawful_across_switch"] == 1.0 and r["valid_frames"] == 1.0


def test_no_switch_gives_none():
    p = params(5, 16, seed=15)
    v, lab = make_videos(p, 8, 16)
    r = score_switched(v, lab[:, None].repeat(1, 8), 4)
    json.dumps(r)
    assert r["switches"] == 0
    assert r["post_switch_valid"] is None and r["first_chunk_valid"] is None and r["lawful_across_switch"] is None
    assert r["valid_frames"] == r["lawful_transitions"] == r["pre_switch_valid"] == 1.0
    # Agrees with the plain checker.
    plain = score(v, lab)
    assert plain["valid_frames"] == r["valid_frames"] and plain["per_frame_valid"] == r["per_frame_valid"]


def test_score_switched_chunking_does_not_change_results():
    p = params(9, 16, seed=16)
    sch = switch_schedule(p.cls, 8, 3)
    v = make_switched_videos(p, 8, 16, sch)
    v[::2, 5] = -1.0
    assert score_switched(v, sch, 4, chunk=2) == score_switched(v, sch, 4)


def test_score_switched_rejects_bad_inputs():
    p = params(2, 16)
    sch = switch_schedule(p.cls, 8, 3)
    v = make_switched_videos(p, 8, 16, sch)
    with pytest.raises(ValueError, match=r"schedule must be \[N, F\] = \[2, 8\]"):
        score_switched(v, sch[:, :7], 4)
    with pytest.raises(ValueError, match=r"schedule must be \[N, F\]"):
        score_switched(v, sch[:, 0], 4)
    with pytest.raises(ValueError, match="schedule classes must be in 0..5"):
        score_switched(v, torch.full((2, 8), 6), 4)
    with pytest.raises(ValueError, match="schedule classes"):
        score_switched(v, torch.full((2, 8), -1), 4)
    with pytest.raises(ValueError, match="schedule must be integers"):
        score_switched(v, sch.float(), 4)
    with pytest.raises(ValueError, match="frames_per_chunk=3 must divide"):
        score_switched(v, sch, 3)
    for bad in (0, -4, True, 4.0):
        with pytest.raises(ValueError, match="frames_per_chunk must be a positive int"):
            score_switched(v, sch, bad)
    with pytest.raises(ValueError, match=r"\[N, F, 3, S, S\]"):
        score_switched(v[0], sch, 4)
    with pytest.raises(ValueError, match="24"):
        score_switched(torch.zeros(2, 8, 3, 24, 24), sch, 4)
    with pytest.raises(ValueError, match="2 frames"):
        score_switched(v[:, :1], sch[:, :1], 1)
    with pytest.raises(ValueError, match="at least one video"):
        score_switched(v[:0], sch[:0], 4)
