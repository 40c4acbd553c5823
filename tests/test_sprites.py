"""Tests of the `sprites` generator against SPRITES.md."""

import json

import pytest
import torch

from pipeline.data import sprites as sp
from pipeline.data.sprites import (
    NULL_CLASS,
    NUM_CLASSES,
    NUM_MODES,
    SpriteParams,
    SpritesStream,
    balanced_labels,
    class_colour,
    class_shape,
    make_videos,
    render,
    sample_params,
    shape_mask,
    sprite_mask,
    trajectory,
)


def reference_render(positions, labels, size):
    """Pixel-by-pixel renderer written straight from the spec."""
    s = size // 4
    n, f = positions.shape[:2]
    out = -torch.ones(n, f, 3, size, size)
    for a in range(n):
        c = int(labels[a])
        for t in range(f):
            x, y = (int(v) for v in positions[a, t])
            for i in range(s):
                for j in range(s):
                    d = (i + 0.5 - s / 2) ** 2 + (j + 0.5 - s / 2) ** 2
                    if c % 2 == 0 or d <= (s / 2) ** 2:
                        out[a, t, c // 2, y + i, x + j] = 1.0
    return out


def reference_step(p, v, lim):
    p = p + v
    if p < 0:
        p, v = -p, -v
    if p > lim:
        p, v = 2 * lim - p, -v
    return p, v


# --- shapes, colours, constants ---------------------------------------------------------------


def test_constants_and_class_helpers():
    assert (NUM_CLASSES, NULL_CLASS, NUM_MODES) == (6, 6, 4)
    assert [class_colour(c) for c in range(6)] == [0, 0, 1, 1, 2, 2]
    assert [class_shape(c) for c in range(6)] == [0, 1, 0, 1, 0, 1]


@pytest.mark.parametrize("s,square,disk", [(4, 16, 12), (8, 64, 52)])
def test_mask_pixel_counts(s, square, disk):
    assert shape_mask(0, s).dtype == torch.bool
    assert shape_mask(0, s).shape == (s, s)
    assert int(shape_mask(0, s).sum()) == square
    assert int(shape_mask(1, s).sum()) == disk
    assert int(sprite_mask(1, 4 * s).sum()) == disk


def test_disk_s4_pattern():
    expected = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1], [1, 1, 1, 1], [0, 1, 1, 0]], dtype=torch.bool)
    assert torch.equal(shape_mask(1, 4), expected)


def test_disk_matches_formula_s8():
    s = 8
    m = shape_mask(1, s)
    for i in range(s):
        for j in range(s):
            assert bool(m[i, j]) == ((i + 0.5 - s / 2) ** 2 + (j + 0.5 - s / 2) ** 2 <= (s / 2) ** 2)


@pytest.mark.parametrize("bad", [8, 24, 64, 0, -16, 16.0, "16"])
def test_bad_sizes_raise(bad):
    with pytest.raises(ValueError, match=repr(bad).replace(".", r"\.")):
        SpritesStream(size=bad)
    with pytest.raises(ValueError):
        sprite_mask(0, bad)
    with pytest.raises(ValueError):
        trajectory(0, 0, 1, 1, 4, bad)
    with pytest.raises(ValueError):
        render(torch.zeros(1, 2, 2, dtype=torch.long), torch.zeros(1, dtype=torch.long), bad)


@pytest.mark.parametrize("size", [16, 32])
def test_render_colours_and_values(size):
    s = size // 4
    b = SpritesStream(size=size, frames=6, seed=5).next_batch(48)
    v = b["videos"]
    assert v.dtype == torch.float32 and v.shape == (48, 6, 3, size, size)
    assert set(v.unique().tolist()) == {-1.0, 1.0}
    on = v > 0
    any_on = on.any(2)  # [N, F, S, S]
    for n in range(48):
        c = int(b["labels"][n])
        area = int(shape_mask(c % 2, s).sum())
        assert (any_on[n].flatten(1).sum(1) == area).all()
        # Sprite pixels: colour channel on, the two others off; background: everything off.
        assert torch.equal(on[n, :, c // 2], any_on[n])
        for other in {0, 1, 2} - {c // 2}:
            assert not on[n, :, other].any()
    # Against an independent pixel-by-pixel renderer (positions included).
    assert torch.equal(v[:8], reference_render(b["positions"][:8], b["labels"][:8], size))


def test_render_places_box_at_x_column_y_row():
    pos = torch.tensor([[[3, 9]]])  # x = 3 (column), y = 9 (row)
    v = render(pos, torch.tensor([4]), 16)  # blue square
    on = (v[0, 0, 2] > 0).nonzero()
    assert on[:, 0].min() == 9 and on[:, 0].max() == 12  # rows
    assert on[:, 1].min() == 3 and on[:, 1].max() == 6  # columns
    assert not (v[0, 0, :2] > 0).any()


def test_render_rejects_out_of_bounds_positions():
    with pytest.raises(ValueError):
        render(torch.tensor([[[13, 0]]]), torch.tensor([0]), 16)
    with pytest.raises(ValueError):
        render(torch.tensor([[[0, 0]]]), torch.tensor([6]), 16)


# --- motion ---------------------------------------------------------------------------------


def test_trajectory_s16_bounces_both_walls():
    # S = 16: S - s = 12, k = 1.
    pos = trajectory(10, 1, 1, -1, 6, 16)
    assert pos.shape == (6, 2)
    assert pos[:, 0].tolist() == [10, 11, 12, 11, 10, 9]  # reaches 12 without flipping, then flips
    assert pos[:, 1].tolist() == [1, 0, 1, 2, 3, 4]
    pos = trajectory(0, 12, -1, 1, 3, 16)  # starting on the walls, moving into them
    assert pos[:, 0].tolist() == [0, 1, 2]
    assert pos[:, 1].tolist() == [12, 11, 10]


def test_trajectory_s32_bounces_both_walls():
    # S = 32: S - s = 24, k = 2.
    assert trajectory(20, 0, 2, 2, 5, 32)[:, 0].tolist() == [20, 22, 24, 22, 20]
    # 23 + 2 = 25 > 24 -> 2 * 24 - 25 = 23: reflected back onto the same position, velocity flipped.
    assert trajectory(23, 0, 2, 2, 4, 32)[:, 0].tolist() == [23, 23, 21, 19]
    assert trajectory(0, 1, 2, -2, 4, 32)[:, 1].tolist() == [1, 1, 3, 5]
    # p' = 0 is not < 0: no flip at 0, the flip happens on the next step.
    assert trajectory(0, 2, 2, -2, 4, 32)[:, 1].tolist() == [2, 0, 2, 4]
    assert trajectory(0, 0, 2, -2, 3, 32)[:, 1].tolist() == [0, 2, 4]


def test_trajectory_batched_matches_scalar_reference():
    g = torch.Generator().manual_seed(3)
    for size in (16, 32):
        k, lim = size // 16, size - size // 4
        p = sample_params(g, 50, size)
        vx, vy = sp.mode_velocity(p.mode, size)
        pos = trajectory(p.x, p.y, vx, vy, 30, size)
        assert pos.shape == (50, 30, 2)
        for n in range(50):
            x, y, a, b = int(p.x[n]), int(p.y[n]), int(vx[n]), int(vy[n])
            assert abs(a) == abs(b) == k
            for t in range(30):
                assert pos[n, t].tolist() == [x, y]
                x, a = reference_step(x, a, lim)
                y, b = reference_step(y, b, lim)


@pytest.mark.parametrize("size", [16, 32])
def test_long_videos_stay_in_bounds_and_are_periodic(size):
    k, lim = size // 16, size - size // 4
    b = SpritesStream(size=size, frames=200, seed=2).next_batch(64)
    pos = b["positions"]
    assert pos.shape == (64, 200, 2)
    assert pos.min() >= 0 and pos.max() <= lim
    period = 2 * lim // k
    assert torch.equal(pos[:, period:], pos[:, :-period])
    steps = (pos[:, 1:] - pos[:, :-1]).abs()
    assert steps.max() <= k
    # Last frame is still exactly one sprite of the right size.
    v = b["videos"][:, -1]
    area = torch.tensor([int(shape_mask(int(c) % 2, size // 4).sum()) for c in b["labels"]])
    assert torch.equal((v > 0).any(1).flatten(1).sum(1), area)


def test_first_move_follows_mode_away_from_walls():
    size = 32
    k, lim = 2, 24
    b = SpritesStream(size=size, frames=2, seed=9).next_batch(400)
    signs = torch.tensor(sp.MODE_SIGNS)[b["modes"]]
    start, step = b["positions"][:, 0], b["positions"][:, 1] - b["positions"][:, 0]
    free = ((start >= k) & (start <= lim - k)).all(1)
    assert free.sum() > 200
    assert torch.equal(step[free], k * signs[free])
    assert torch.equal(torch.tensor(sp.MODE_SIGNS), torch.tensor([[1, 1], [1, -1], [-1, -1], [-1, 1]]))


# --- stream: determinism, resume, distribution ----------------------------------------------


def test_same_seed_same_videos_different_seed_different():
    a = SpritesStream(16, 12, seed=0).next_batch(16)
    b = SpritesStream(16, 12, seed=0).next_batch(16)
    c = SpritesStream(16, 12, seed=1).next_batch(16)
    for key in ("videos", "labels", "modes", "positions"):
        assert torch.equal(a[key], b[key])
    assert not torch.equal(a["videos"], c["videos"])
    assert not torch.equal(a["positions"], c["positions"])


def test_golden_first_samples_of_seed_0():
    # Pins the counter-based scheme; changing it changes every data set drawn so far.
    p = SpritesStream(16, seed=0).next_params(8)
    assert p.cls.tolist() == [0, 0, 1, 1, 2, 3, 0, 0]
    assert p.mode.tolist() == [2, 1, 1, 1, 2, 2, 3, 1]
    assert p.x.tolist() == [6, 5, 0, 8, 12, 7, 8, 7]
    assert p.y.tolist() == [4, 11, 9, 3, 6, 3, 9, 4]


def test_block_seeds_distinct():
    seeds = {sp.block_seed(s, b) for s in range(20) for b in range(20)}
    assert len(seeds) == 400
    assert all(0 <= z < 2**63 for z in seeds)


def test_batch_boundaries_do_not_matter():
    one = SpritesStream(16, 12, seed=4).next_batch(16)
    st = SpritesStream(16, 12, seed=4)
    two = [st.next_batch(8), st.next_batch(8)]
    for key in ("videos", "labels", "modes", "positions"):
        assert torch.equal(one[key], torch.cat([two[0][key], two[1][key]]))
    # Across a parameter-block boundary (1024 samples per block), in uneven pieces.
    whole = SpritesStream(32, seed=4).next_params(2600)
    st = SpritesStream(32, seed=4)
    parts = [st.next_params(n) for n in (1000, 1, 30, 1500, 69)]
    joined = SpriteParams.cat(parts)
    for f in ("cls", "mode", "x", "y"):
        assert torch.equal(getattr(whole, f), getattr(joined, f))


def test_state_dict_resume():
    a = SpritesStream(16, 12, seed=7)
    a.next_batch(700)
    state = json.loads(json.dumps(a.state_dict()))  # must survive a JSON round trip
    expected = a.next_batch(500)
    b = SpritesStream(16, 12, seed=123)
    b.next_batch(3)
    b.load_state_dict(state)
    got = b.next_batch(500)
    for key in ("videos", "labels", "modes", "positions"):
        assert torch.equal(expected[key], got[key])
    assert b.state_dict() == a.state_dict()
    with pytest.raises(ValueError):
        SpritesStream(32).load_state_dict(state)


def test_make_videos_matches_stream():
    st = SpritesStream(32, frames=7, seed=11)
    params = st.params_at(0, 10)
    videos, labels = make_videos(params, 7, 32)
    batch = st.next_batch(10)
    assert videos.shape == (10, 7, 3, 32, 32) and labels.dtype == torch.int64
    assert torch.equal(videos, batch["videos"]) and torch.equal(labels, batch["labels"])
    assert batch["positions"].dtype == torch.int64 and batch["modes"].dtype == torch.int64


def test_next_batch_frames_override():
    st = SpritesStream(16, frames=12, seed=0)
    b = st.next_batch(3, frames=40)
    assert b["videos"].shape == (3, 40, 3, 16, 16)
    assert torch.equal(b["positions"][:, :12], SpritesStream(16, 12, seed=0).next_batch(3)["positions"])


def _chi2(counts):
    counts = counts.double()
    expected = counts.sum() / counts.numel()
    return float(((counts - expected) ** 2 / expected).sum())


def _chi2_bound(df):
    # Far above the chi-square 1e-4 tail (about df + 5.5 sqrt(2 df) here), far below what a missing
    # or doubled bin gives with ~1000+ expected counts per bin.
    return df + 8 * (2 * df) ** 0.5


@pytest.mark.parametrize("size", [16, 32])
def test_parameters_uniform(size):
    n = 24000
    lim = size - size // 4
    p = SpritesStream(size, seed=21).next_params(n)
    for values, bins in ((p.cls, NUM_CLASSES), (p.mode, NUM_MODES), (p.x, lim + 1), (p.y, lim + 1)):
        assert values.min() >= 0 and values.max() <= bins - 1
        counts = torch.bincount(values, minlength=bins)
        assert counts.numel() == bins
        assert (counts > 0).all()  # catches e.g. randint(0, S - s) missing the upper end
        assert _chi2(counts) < _chi2_bound(bins - 1)
    joint = torch.bincount(p.cls * NUM_MODES + p.mode, minlength=24)
    assert _chi2(joint) < _chi2_bound(23)


def test_chi2_bound_catches_missing_upper_end():
    # The bound used above rejects a generator whose x never reaches S - s.
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 12, (24000,), generator=g)
    assert _chi2(torch.bincount(x, minlength=13)) > _chi2_bound(12)


def test_balanced_labels():
    lab = balanced_labels(14)
    assert lab.dtype == torch.int64
    assert lab.tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5, 0, 1]
    counts = torch.bincount(balanced_labels(100), minlength=6)
    assert counts.max() - counts.min() <= 1
    assert balanced_labels(7, num_classes=3).tolist() == [0, 1, 2, 0, 1, 2, 0]


