"""Quality metrics (pipeline/evaluation/metrics.py, checker.predict_classes), speed meters, the VBench layout."""

import math

import pytest
import torch

from pipeline.evaluation.checker import predict_classes, score
from pipeline.evaluation.metrics import drift_slope, frechet_distance, mode_balance_tv, quality, video_features
from pipeline.diffusion.sampling import Denoiser, generate_few_step, few_step_sigmas
from pipeline.evaluation.speed import FrameCounter, SpeedMeter
from pipeline.data.sprites import SpriteParams, SpritesStream, make_videos
from pipeline.evaluation.vbench import vbench_name, write_vbench_videos
from tests.conftest import make_tiny_model


def real(n=60, frames=6, seed=0, size=16):
    return SpritesStream(size, frames, seed).next_batch(n)


@pytest.mark.parametrize("size", [16, 32])
def test_predict_classes_reads_colour_and_shape(size):
    b = real(size=size)
    assert torch.equal(predict_classes(b["videos"]), b["labels"])
    # the same motion rendered as every other class is read as that class
    p = SpriteParams(torch.arange(6), torch.zeros(6), torch.full((6,), 2), torch.full((6,), 3))
    videos, labels = make_videos(p, 4, size)
    assert torch.equal(predict_classes(videos), labels)
    empty = -torch.ones(2, 4, 3, size, size)
    assert predict_classes(empty).tolist() == [-1, -1]


def test_predict_classes_majority_over_frames():
    p = SpriteParams([0, 5], [0, 1], [1, 2], [1, 2])
    videos, _ = make_videos(p, 5, 16)
    videos[0, :2] = videos[1, :2]  # two of five frames show class 5: the video is still class 0
    videos[1, :3] = -1  # empty frames do not vote
    assert predict_classes(videos).tolist() == [0, 5]


def test_mode_balance_tv():
    assert mode_balance_tv([[5, 5, 5, 5]] * 6) == pytest.approx(0.0)
    assert mode_balance_tv([[8, 0, 0, 0]] * 6) == pytest.approx(0.75)
    assert mode_balance_tv([[0, 0, 0, 0]] * 6) == pytest.approx(0.75)  # nothing readable: as bad as one mode
    assert mode_balance_tv([[2, 2, 0, 0]] + [[1, 1, 1, 1]] * 5) == pytest.approx(0.25 / 6 * 2)


def test_drift_slope():
    assert drift_slope([0.9] * 10) == pytest.approx(0.0)
    assert drift_slope([1 - 0.01 * i for i in range(20)]) == pytest.approx(-0.01)
    assert drift_slope([1.0]) == 0.0


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 3, generator=g, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5])
    b = torch.randn(4000, 3, generator=g, dtype=torch.float64) * torch.tensor([3.0, 1.0, 0.5]) + torch.tensor(
        [1.0, 0.0, -2.0])
    # for diagonal covariances: |Δμ|² + Σ (σa - σb)², with the sample moments
    sa, sb = a.std(0), b.std(0)
    want = float((a.mean(0) - b.mean(0)).pow(2).sum() + (sa - sb).pow(2).sum())
    assert frechet_distance(a, b) == pytest.approx(want, rel=0.02, abs=0.02)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="Fréchet"):
        frechet_distance(a[:1], b)


def test_features_separate_real_from_broken_videos():
    ref = video_features(real(400, 12, seed=1)["videos"])
    other = real(96, 12, seed=2)["videos"]
    shuffled = other[:, torch.randperm(12, generator=torch.Generator().manual_seed(0))]
    fd_real = frechet_distance(video_features(other), ref)
    assert frechet_distance(video_features(other), ref) == fd_real  # deterministic
    assert frechet_distance(video_features(shuffled), ref) > 20 * fd_real  # motion order matters
    noisy = (other + 0.5 * torch.randn(other.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    assert frechet_distance(video_features(noisy), ref) > 20 * fd_real
    assert video_features(other).shape == (96, 16)


def test_quality_extends_the_checker_score():
    b = real(36, 8)
    ref = video_features(real(100, 8, seed=3)["videos"])
    q = quality(b["videos"], b["labels"], ref)
    s = score(b["videos"], b["labels"])
    assert all(q[k] == s[k] for k in s)
    assert q["class_accuracy"] == 1.0 and q["drift_slope"] == 0.0 and q["valid_frames"] == 1.0
    wrong = (b["labels"] + 1) % 6
    assert quality(b["videos"], wrong, ref)["class_accuracy"] == 0.0


def test_frame_counter_and_speed_meter_count_network_evaluations():
    model = make_tiny_model()
    den = Denoiser(model, "block_causal", 3)
    cond = torch.randn(4, 2, 16)
    f, steps = 12, 4
    with SpeedMeter(model) as meter:
        generate_few_step(den, cond, (3, f, 8, 8), few_step_sigmas([1000, 750, 500, 250], 1.0), batch_size=3,
                          on_chunk=meter.clock)
    r = meter.result(4, f)
    chunks = f // 3
    # frames through the network: per chunk `steps` denoising passes, plus one cache write of every chunk
    # but the last ...
    assert r["nfe_per_frame"] == pytest.approx((steps * chunks + chunks - 1) / chunks)
    # ... which rides in the next chunk's first call: `steps` calls per chunk, two batches (3 + 1 videos)
    assert r["network_calls"] == 2 * steps * chunks
    assert len(meter.clock.times) == 2 * chunks and r["first_chunk_s"] == meter.clock.times[0]
    assert r["frames_per_s"] == pytest.approx(4 * f / r["seconds"])
    assert r["peak_memory_mb"] >= 0
    counter = FrameCounter(model)
    counter.remove()
    model(torch.randn(1, 3, 3, 8, 8), torch.zeros(1), cond[:1])
    assert counter.frames == 0  # removed hooks count nothing
    assert not math.isnan(r["seconds"])


def test_vbench_layout(tmp_path):
    videos = torch.rand(4, 5, 3, 8, 8) * 2 - 1
    prompts = ["a red square", "a red square", "a/b " + "x" * 300, "a red square"]
    paths = write_vbench_videos(tmp_path / "model", videos, prompts, [0, 1, 0, 2], fps=8)
    names = sorted(p.name for p in (tmp_path / "model").iterdir())
    assert names == sorted(["a red square-0.mp4", "a red square-1.mp4", "a red square-2.mp4",
                            vbench_name(prompts[2], 0)])
    assert len(vbench_name(prompts[2], 0)) == 180 + len("-0.mp4") and "/" not in vbench_name(prompts[2], 0)
    import imageio.v3 as iio
    frames = iio.imread(paths[0])
    assert frames.shape[0] == 5 and frames.shape[-1] == 3
    with pytest.raises(ValueError, match="same VBench file name"):
        write_vbench_videos(tmp_path / "m2", videos[:2], ["p", "p"], [0, 0])
    with pytest.raises(ValueError, match="one prompt and index per video"):
        write_vbench_videos(tmp_path / "m3", videos, prompts[:2], [0, 1])
