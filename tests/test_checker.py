"""Tests of the sprites checker: real videos pass, corruptions are caught."""

import json
import time

import pytest
import torch

from pipeline.evaluation.checker import (
    check_frames,
    check_transitions,
    mode_coverage,
    mode_histogram,
    score,
    video_modes,
)
from pipeline.data.sprites import SpritesStream, render, shape_mask, trajectory


def batch(size, n, frames=48, seed=0):
    return SpritesStream(size=size, frames=frames, seed=seed).next_batch(n)


def reference_frame_valid(frame, label):
    """Brute force over all placements, written straight from the rules."""
    size = frame.shape[-1]
    s = size // 4
    on = frame > 0
    mask = shape_mask(label % 2, s)
    for y in range(size - s + 1):
        for x in range(size - s + 1):
            want = torch.zeros(size, size, dtype=torch.bool)
            want[y : y + s, x : x + s] = mask
            expected = torch.zeros(3, size, size, dtype=torch.bool)
            expected[label // 2] = want
            if torch.equal(on, expected):
                return True, (x, y)
    return False, (-1, -1)


def reference_lawful(valid, positions, size):
    """A run of lawful transitions from a fresh start is a stretch of some generator trajectory."""
    k = size // 16
    n, f = valid.shape
    out = torch.zeros(n, f - 1, dtype=torch.bool)
    for a in range(n):
        start = 0
        for t in range(f - 1):
            ok = bool(valid[a, t]) and bool(valid[a, t + 1])
            if ok:
                seg = positions[a, start : t + 2]
                x0, y0 = (int(v) for v in seg[0])
                ok = any(
                    torch.equal(trajectory(x0, y0, vx, vy, t + 2 - start, size), seg)
                    for vx in (k, -k)
                    for vy in (k, -k)
                )
            out[a, t] = ok
            if not ok:
                start = t + 1
    return out


# --- real videos -----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [16, 32])
def test_real_videos_are_perfect(size):
    b = batch(size, 240, frames=48, seed=1)
    r = score(b["videos"], b["labels"])
    assert r["valid_frames"] == 1.0
    assert r["lawful_transitions"] == 1.0
    assert r["valid_videos"] == 1.0
    assert r["mode_coverage"] == 1.0
    assert r["mode_undetermined"] == 0.0
    assert len(r["per_frame_valid"]) == 48 and len(r["per_frame_lawful"]) == 47
    assert all(v == 1.0 for v in r["per_frame_valid"] + r["per_frame_lawful"])
    assert sum(map(sum, r["mode_histogram"])) == 240
    json.dumps(r)  # plain Python types only
    valid, pos = check_frames(b["videos"], b["labels"])
    assert valid.all()
    assert torch.equal(pos, b["positions"])


def test_modes_are_resulting_velocities():
    size, k, lim = 32, 2, 24
    b = batch(size, 300, frames=3, seed=3)
    valid, pos = check_frames(b["videos"], b["labels"])
    lawful, vel = check_transitions(valid, pos, size)
    modes = video_modes(lawful, vel)
    start = b["positions"][:, 0]
    free = ((start >= k) & (start <= lim - k)).all(1)
    assert free.sum() > 150 and (~free).sum() > 10
    # Away from walls the resulting velocity is the initial one.
    assert torch.equal(modes[free], b["modes"][free])
    # Initial mode 2 (-k, -k) starting on the low x wall: x bounces, so the video shows mode 1 (+k, -k).
    path = trajectory(0, 10, -k, -k, 3, size)
    assert path[:, 0].tolist() == [0, 2, 4]
    v = render(path[None], torch.tensor([0]), size)
    lawful, vel = check_transitions(*check_frames(v, torch.tensor([0])), size)
    assert vel[0, 0].tolist() == [k, -k]
    assert video_modes(lawful, vel).tolist() == [1]
    # An unlawful first transition leaves the mode undetermined.
    v = render(torch.tensor([[[5, 5], [5, 5], [7, 7]]]), torch.tensor([0]), size)
    lawful, vel = check_transitions(*check_frames(v, torch.tensor([0])), size)
    assert lawful.tolist() == [[False, True]]
    assert video_modes(lawful, vel).tolist() == [-1]


def test_mode_coverage_and_histogram():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 5])
    modes = torch.tensor([0, 1, 2, 3, 0, 0, -1, 2])
    hist = mode_histogram(labels, modes)
    assert hist.shape == (6, 4)
    assert hist[0].tolist() == [1, 1, 1, 1]
    assert hist[1].tolist() == [2, 0, 0, 0]
    assert hist[2].tolist() == [0, 0, 0, 0]  # mode -1 is not counted
    assert hist[5].tolist() == [0, 0, 1, 0]
    assert mode_coverage(labels, modes) == pytest.approx((4 + 1 + 0 + 0 + 0 + 1) / 24)


def test_single_mode_data_set_has_low_coverage():
    size = 16
    n = 60
    labels = torch.arange(n) % 6
    x = torch.randint(2, 10, (n,), generator=torch.Generator().manual_seed(0))
    pos = trajectory(x, x.flip(0), 1, 1, 8, size)  # everybody moves (+k, +k)
    r = score(render(pos, labels, size), labels)
    assert r["valid_frames"] == 1.0 and r["lawful_transitions"] == 1.0
    assert r["mode_coverage"] == 0.25


def test_scoring_is_fast():
    b = batch(16, 96, frames=48, seed=2)
    score(b["videos"], b["labels"])
    t0 = time.perf_counter()
    score(b["videos"], b["labels"])
    assert time.perf_counter() - t0 < 1.0


# --- frame corruptions -----------------------------------------------------------------------


@pytest.fixture
def real16():
    b = batch(16, 12, frames=10, seed=4)
    return b["videos"].clone(), b["labels"].clone(), b["positions"].clone()


def _expect_frame_broken(videos, labels, n, t):
    valid, pos = check_frames(videos, labels)
    assert not valid[n, t] and pos[n, t].tolist() == [-1, -1]
    others = torch.ones_like(valid)
    others[n, t] = False
    assert valid[others].all()
    lawful, _ = check_transitions(valid, pos, videos.shape[-1])
    assert not lawful[n, t - 1] and not lawful[n, t]
    r = score(videos, labels)
    assert r["valid_frames"] == pytest.approx(1 - 1 / valid.numel())
    assert r["per_frame_valid"][t] < 1.0
    assert r["valid_videos"] == pytest.approx(1 - 1 / videos.shape[0])


def test_wrong_colour(real16):
    v, lab, _ = real16
    c = int(lab[0]) // 2
    frame = v[0, 3]
    frame[(c + 1) % 3] = frame[c]
    frame[c] = -1.0
    _expect_frame_broken(v, lab, 0, 3)


def test_extra_colour_channel_on_sprite(real16):
    v, lab, _ = real16
    c = int(lab[1]) // 2
    v[1, 5, (c + 1) % 3] = v[1, 5, c]  # sprite pixels now mix two channels
    _expect_frame_broken(v, lab, 1, 5)


def test_wrong_label_for_whole_video(real16):
    v, lab, _ = real16
    wrong = lab.clone()
    wrong[2] = (lab[2] + 2) % 6  # same shape, other colour
    valid, _ = check_frames(v, wrong)
    assert not valid[2].any() and valid[[i for i in range(12) if i != 2]].all()


@pytest.mark.parametrize("size", [16, 32])
def test_wrong_shape(size):
    b = batch(size, 12, frames=6, seed=5)
    flipped = b["labels"] ^ 1  # disk <-> square, same colour
    v = render(b["positions"], flipped, size)
    valid, _ = check_frames(v, b["labels"])
    assert not valid.any()
    assert check_frames(v, flipped)[0].all()


def test_two_sprites(real16):
    v, lab, pos = real16
    x, y = pos[3, 4].tolist()
    other = [(x + 6) % 13, (y + 6) % 13]
    second = render(torch.tensor([[other]]), lab[3:4], 16)[0, 0]
    v[3, 4] = torch.maximum(v[3, 4], second)
    _expect_frame_broken(v, lab, 3, 4)


def test_missing_sprite(real16):
    v, lab, _ = real16
    v[4, 6] = -1.0
    _expect_frame_broken(v, lab, 4, 6)


def test_missing_pixel_and_extra_pixel(real16):
    v, lab, pos = real16
    x, y = pos[5, 2].tolist()
    c = int(lab[5]) // 2
    v[5, 2, c, y + 1, x + 1] = -1.0  # interior pixel of both shapes
    _expect_frame_broken(v, lab, 5, 2)
    v[5, 2, c, y + 1, x + 1] = 1.0
    x, y = pos[6, 7].tolist()
    far = (0, 15) if x > 6 else (15, 0)
    v[6, 7, 0, far[1], far[0]] = 0.2  # one stray background pixel just above 0
    _expect_frame_broken(v, lab, 6, 7)


def test_sprite_cut_off_at_border_with_right_pixel_count():
    # 16 red pixels hugging the right border: a 3-wide block, not a 4x4 square inside the frame.
    frame = -torch.ones(3, 16, 16)
    frame[0, 0:5, 13:16] = 1.0
    frame[0, 5, 13] = 1.0
    assert int((frame[0] > 0).sum()) == 16
    assert reference_frame_valid(frame, 0) == (False, (-1, -1))
    valid, pos = check_frames(frame[None, None], torch.tensor([0]))
    assert not valid.any() and pos.tolist() == [[[-1, -1]]]
    # The same count at the bottom border.
    frame = frame.transpose(1, 2).contiguous()
    assert not check_frames(frame[None, None], torch.tensor([0]))[0].any()
    # A sprite touching the bottom-right corner from inside is valid.
    frame = -torch.ones(3, 16, 16)
    frame[0, 12:16, 12:16] = 1.0
    valid, pos = check_frames(frame[None, None], torch.tensor([0]))
    assert valid.all() and pos.tolist() == [[[12, 12]]]


def test_noise_that_does_not_cross_zero_is_harmless(real16):
    v, lab, pos = real16
    g = torch.Generator().manual_seed(0)
    noisy = v + (torch.rand(v.shape, generator=g) * 2 - 1) * 0.3
    assert ((noisy > 0) == (v > 0)).all()
    r = score(noisy, lab)
    assert r["valid_frames"] == 1.0 and r["lawful_transitions"] == 1.0
    assert torch.equal(check_frames(noisy, lab)[1], pos)
    # Scaling towards zero keeps the signs, so the video stays valid ...
    assert score(v * 0.01, lab)["valid_frames"] == 1.0
    # ... but values at exactly 0 count as off.
    assert score(v.clamp(max=0.0), lab)["valid_frames"] == 0.0


def test_frame_check_matches_brute_force_on_random_corruptions():
    g = torch.Generator().manual_seed(1)
    for size in (16, 32):
        b = batch(size, 40, frames=3, seed=6)
        v = b["videos"].clone()
        n, f = v.shape[:2]
        # Flip a few random pixels in about half of the frames; some flips land on the sprite.
        for a in range(n):
            for t in range(f):
                if torch.rand(1, generator=g) < 0.5:
                    for _ in range(int(torch.randint(1, 3, (1,), generator=g))):
                        ch = int(torch.randint(0, 3, (1,), generator=g))
                        x0, y0 = b["positions"][a, t].tolist()
                        s1 = size // 4 + 1
                        i = int(torch.randint(max(0, y0 - 1), min(size, y0 + s1), (1,), generator=g))
                        j = int(torch.randint(max(0, x0 - 1), min(size, x0 + s1), (1,), generator=g))
                        v[a, t, ch, i, j] = -v[a, t, ch, i, j]
        valid, pos = check_frames(v, b["labels"])
        assert 0.2 < valid.float().mean() < 0.8
        for a in range(n):
            for t in range(f):
                ok, xy = reference_frame_valid(v[a, t], int(b["labels"][a]))
                assert bool(valid[a, t]) == ok
                assert tuple(pos[a, t].tolist()) == xy


# --- transition corruptions ------------------------------------------------------------------


def _lawful_of_positions(positions, size, label=0):
    labels = torch.full((positions.shape[0],), label)
    v = render(positions, labels, size)
    valid, pos = check_frames(v, labels)
    assert valid.all()
    return check_transitions(valid, pos, size)[0]


def _path(xs, ys):
    return torch.tensor([list(zip(xs, ys))])


def test_bounces_are_lawful_reversal_without_wall_is_not():
    # S = 16: S - s = 12, k = 1.
    assert _lawful_of_positions(_path([10, 11, 12, 11, 10], [4, 3, 2, 1, 0]), 16).all()
    assert _lawful_of_positions(_path([2, 1, 0, 1, 2], [0, 1, 2, 3, 4]), 16).all()
    # x reverses at 6, far from any wall: only that transition is unlawful, the next starts afresh.
    lawful = _lawful_of_positions(_path([3, 4, 5, 6, 5, 4, 3], [5, 6, 7, 8, 9, 10, 11]), 16)
    assert lawful.tolist() == [[True, True, True, False, True, True]]
    # One pixel before the wall is not a wall.
    lawful = _lawful_of_positions(_path([9, 10, 11, 10, 9], [1, 2, 3, 4, 5]), 16)
    assert lawful.tolist() == [[True, True, False, True]]


def test_s32_reflection_onto_same_position_is_lawful():
    # S = 32: S - s = 24, k = 2: 23 -> 25 reflects to 23.
    assert _lawful_of_positions(_path([19, 21, 23, 23, 21], [3, 5, 7, 9, 11]), 32).all()
    assert _lawful_of_positions(_path([3, 1, 1, 3, 5], [3, 5, 7, 9, 11]), 32).all()
    # Standing still away from the walls is not.
    lawful = _lawful_of_positions(_path([9, 11, 11, 13], [3, 5, 7, 9]), 32)
    assert lawful.tolist() == [[True, False, True]]
    # Staying on the wall: 24 -> 24 needs p + v reflected onto itself, impossible with k = 2.
    lawful = _lawful_of_positions(_path([20, 22, 24, 24], [3, 5, 7, 9]), 32)
    assert lawful.tolist() == [[True, True, False]]


def test_wall_ambiguity_accepts_either_incoming_velocity():
    # 11 -> 12 -> 11: arriving at 12 with +1 then bouncing; 12 -> 11 is also reachable with -1.
    assert _lawful_of_positions(_path([11, 12, 11], [5, 6, 7]), 16).all()
    # Starting on the wall, either incoming velocity is fine.
    assert _lawful_of_positions(_path([12, 11, 10], [0, 1, 2]), 16).all()


@pytest.mark.parametrize("size", [16, 32])
def test_one_pixel_shift_breaks_two_transitions(size):
    b = batch(size, 8, frames=10, seed=7)
    pos = b["positions"].clone()
    lim = size - size // 4
    for a in range(8):
        x = int(pos[a, 5, 0])
        pos[a, 5, 0] = x + 1 if x < lim else x - 1
    v = render(pos, b["labels"], size)
    r = score(v, b["labels"])
    assert r["valid_frames"] == 1.0
    valid, p = check_frames(v, b["labels"])
    lawful, _ = check_transitions(valid, p, size)
    expected = torch.ones(8, 9, dtype=torch.bool)
    expected[:, 4] = expected[:, 5] = False
    assert torch.equal(lawful, expected)
    assert r["per_frame_lawful"][4] == 0.0 and r["per_frame_lawful"][5] == 0.0
    assert r["valid_videos"] == 0.0


def test_teleport_is_unlawful():
    b = batch(16, 6, frames=8, seed=8)
    pos = b["positions"].clone()
    pos[:, 4:] = 12 - pos[:, 4:]  # mirror the rest of the video: a jump at 3 -> 4
    jumped = (pos[:, 4] - pos[:, 3]).abs().max(1).values > 1
    lawful = check_transitions(*check_frames(render(pos, b["labels"], 16), b["labels"]), 16)[0]
    assert (~lawful[jumped, 3]).all()
    assert lawful[:, :3].all()
    assert jumped.sum() >= 4


def test_invalid_frame_resets_consistency():
    # 5, 6, [invalid], 6, 5: after the invalid frame the reversal is judged afresh.
    pos = _path([5, 6, 7, 6, 5], [5, 6, 7, 8, 9])
    labels = torch.tensor([2])
    v = render(pos, labels, 16)
    v[0, 2] = -1.0
    lawful = check_transitions(*check_frames(v, labels), 16)[0]
    assert lawful.tolist() == [[True, False, False, True]]


def test_transition_check_matches_trajectory_reference():
    g = torch.Generator().manual_seed(2)
    for size in (16, 32):
        k, lim = size // 16, size - size // 4
        n, f = 60, 14
        # Random walks with mostly lawful steps plus occasional reversals, stops and jumps.
        b = batch(size, n, frames=f, seed=9)
        pos = b["positions"].clone()
        for a in range(n):
            for t in range(1, f):
                r = float(torch.rand(1, generator=g))
                if r < 0.15:
                    delta = torch.randint(-2 * k, 2 * k + 1, (2,), generator=g)
                    pos[a, t:] = (pos[a, t:] + delta).clamp(0, lim)
        valid = torch.rand(n, f, generator=g) > 0.05
        lawful, _ = check_transitions(valid, torch.where(valid[..., None], pos, -1), size)
        ref = reference_lawful(valid, pos, size)
        assert torch.equal(lawful, ref)
        assert 0.3 < lawful.float().mean() < 0.95


# --- input validation ------------------------------------------------------------------------


def test_shape_errors():
    good = batch(16, 2, frames=3)
    v, lab = good["videos"], good["labels"]
    with pytest.raises(ValueError, match=r"\[N, F, 3, S, S\]"):
        score(v[0], lab)
    with pytest.raises(ValueError, match=r"\[N, F, 3, S, S\]"):
        check_frames(v[:, :, :2], lab)
    with pytest.raises(ValueError, match=r"\[N, F, 3, S, S\]"):
        check_frames(v[..., :15], lab)
    with pytest.raises(ValueError, match="24"):
        check_frames(torch.zeros(2, 3, 3, 24, 24), lab)
    with pytest.raises(ValueError, match=r"labels must be \[2\]"):
        check_frames(v, lab[:1])
    with pytest.raises(ValueError, match="6"):
        check_frames(v, torch.tensor([0, 6]))
    with pytest.raises(ValueError, match="-1"):
        score(v, torch.tensor([-1, 0]))
    with pytest.raises(ValueError, match="integer"):
        check_frames(v, lab.float())
    with pytest.raises(ValueError, match="2 frames"):
        score(v[:, :1], lab)
    with pytest.raises(ValueError):
        check_transitions(torch.ones(2, 3, dtype=torch.bool), torch.zeros(2, 3, 3, dtype=torch.long), 16)
    with pytest.raises(ValueError):
        mode_histogram(torch.tensor([0, 1]), torch.tensor([4, 0]))


def test_accepts_half_precision_and_single_frame_check():
    b = batch(32, 3, frames=4, seed=10)
    r = score(b["videos"].half(), b["labels"])
    assert r["valid_videos"] == 1.0
    valid, _ = check_frames(b["videos"][:, :1], b["labels"])
    assert valid.shape == (3, 1) and valid.all()
