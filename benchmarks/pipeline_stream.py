"""A sprites student through `CausalWanPipeline` against `./launch.sh sample`: the same videos and the same scores?

    python benchmarks/pipeline_stream.py runs/tiny/distill [--n 60] [--frames 48] [--seed 0] [--out DIR]

Converts the stage (EMA weights, `convert --to pipeline --ema`) into DIR/pipeline, samples it as `sample` does
(the stage's EMA weights through `sample_videos`; DIR/sample.safetensors) and streams it with `CausalWanPipeline.stream` (the same seed, labels and length;
DIR/pipeline.safetensors, the stream's chunks joined), then prints whether the videos are bit-identical, the
checker's numbers of both files over frames 0:12 and the last 12 frames (`benchmarks/score.py`), and the stream's
time to its first chunk and per chunk. `--n` at most 64: `sample` samples in batches of 64, a pipeline call is one
batch (`pipeline/pipelines/causal_wan.py`).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.score import run as score  # noqa: E402
from pipeline.data.sprites import balanced_labels  # noqa: E402
from pipeline.io.media import save_samples  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("stage", help="a finished init_student or distill stage folder (sprites)")
    ap.add_argument("--n", type=int, default=60)
    ap.add_argument("--frames", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="folder for the pipeline and both samples files (default: a temporary one)")
    args = ap.parse_args(argv)
    if not 1 <= args.n <= 64:
        ap.error("--n must be 1..64 (sample's batch; a pipeline call is one batch)")
    from pipeline.diffusion.videos import sample_videos
    from pipeline.io.convert import convert
    from pipeline.models.loading import load_source
    from pipeline.pipelines import CausalWanPipeline

    out = Path(args.out or tempfile.mkdtemp(prefix="pipeline_stream_"))
    convert(args.stage, out / "pipeline", "pipeline", ema=True)  # `./launch.sh convert STAGE DEST --to pipeline --ema`
    labels = balanced_labels(args.n)
    # `./launch.sh sample STAGE --out F --n N --frames F --seed S`: the stage's EMA weights through `sample_videos`
    model, table, cfg = load_source(args.stage)
    with torch.no_grad():
        ref = sample_videos(model, table, labels, frames=args.frames, size=cfg.data.size,
                            frames_per_chunk=cfg.data.frames_per_chunk, prediction=cfg.model.prediction,
                            student=cfg.student, attention=cfg.pretrain_teacher.attention, seed=args.seed)
    save_samples(out / "sample.safetensors", ref, labels)
    pipe = CausalWanPipeline.from_pretrained(out / "pipeline")
    times, parts = [], []
    start = time.perf_counter()
    for part in pipe.stream(class_labels=labels, num_frames=args.frames, generator=torch.Generator().manual_seed(args.seed),
                            output_type="pt"):
        times.append(time.perf_counter() - start)
        parts.append(part)
    videos = torch.cat(parts, dim=1) * 2 - 1  # [0, 1] -> the samples file's [-1, 1]
    save_samples(out / "pipeline.safetensors", videos, labels)
    same = torch.equal(to_unit(ref), torch.cat(parts, dim=1))
    print(f"pipeline stream vs sample's sampler ({args.n} videos x {args.frames} frames, seed {args.seed}): "
          f"{'bit-identical' if same else 'DIFFERENT'} frames (max |diff| {float((ref - videos).abs().max()):.3g})")
    windows = ["0:12", f"{args.frames - 12}:{args.frames}"]
    for name in ("sample", "pipeline"):
        for row in score(out / f"{name}.safetensors", frames=windows):
            print(name, json.dumps(row))
    gaps = [b - a for a, b in zip(times, times[1:])]
    print(f"stream: {len(parts)} chunks, first after {times[0] * 1000:.0f} ms, then {1000 * sum(gaps) / max(len(gaps), 1):.0f} "
          f"ms per chunk (batch of {args.n}, CPU threads {torch.get_num_threads()})")
    print(f"files in {out}")
    return 0 if same else 1


def to_unit(videos: torch.Tensor) -> torch.Tensor:
    """Samples-file videos `[N, T, 3, H, W]` in [-1, 1] postprocessed as the pipeline's `output_type="pt"`."""
    from diffusers.video_processor import VideoProcessor

    return VideoProcessor(vae_scale_factor=1).postprocess_video(videos.permute(0, 2, 1, 3, 4), output_type="pt")


if __name__ == "__main__":
    sys.exit(main())
