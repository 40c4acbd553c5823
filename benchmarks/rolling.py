"""Rolling-window joint denoising against the chunk-by-chunk few-step sampler, same student.

    python benchmarks/rolling.py runs/tiny/distill [--videos 96] [--long 48] [--batch 48] [--seed 0]

Per sampler: frames/s and first-chunk latency (one batch of `--batch` videos of `--long` frames), network calls
per generated frame (per video stream) and the frames each call processes, and valid / lawful frames at the
training length and at `--long` frames (the SPRITES.md checker). `sample_rolling` needs `n + K - 1` calls for n
chunks of K levels, each over up to K chunks; chunk by chunk needs `n·K` calls of one chunk (its cache writes
ride in the next call).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pipeline.data.sprites import balanced_labels  # noqa: E402
from pipeline.diffusion.videos import sample_videos  # noqa: E402
from pipeline.evaluation.checker import score  # noqa: E402
from pipeline.evaluation.speed import ChunkClock, FrameCounter  # noqa: E402
from pipeline.evaluation.report import markdown_table  # noqa: E402
from pipeline.models.loading import load_source  # noqa: E402


def measure(model, table, cfg, *, rolling: bool, videos: int, long: int, batch: int, seed: int) -> dict:
    kw = dict(size=cfg.data.size, frames_per_chunk=cfg.data.frames_per_chunk, prediction=cfg.model.prediction,
              student=cfg.student, seed=seed, few_step=True, rolling=rolling, batch_size=batch)
    row = {"sampler": "rolling window" if rolling else "chunk by chunk"}
    labels = balanced_labels(batch)
    counter = FrameCounter(model)
    clock = ChunkClock()
    sample_videos(model, table, labels, frames=long, on_chunk=clock, **kw)
    elapsed = time.perf_counter() - clock.start
    counter.handle.remove()
    row.update(frames_per_s=batch * long / elapsed, first_chunk_s=clock.times[0],
               calls_per_frame=counter.calls / long, frames_per_call=counter.frames / counter.calls / batch)
    for frames in (cfg.data.frames, long):
        s = score(sample_videos(model, table, balanced_labels(videos), frames=frames, **kw), balanced_labels(videos))
        row[f"valid_{frames}"], row[f"lawful_{frames}"] = s["valid_frames"], s["lawful_transitions"]
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", help="a sprites student (stage folder)")
    ap.add_argument("--videos", type=int, default=96)
    ap.add_argument("--long", type=int, default=48)
    ap.add_argument("--batch", type=int, default=48)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.set_grad_enabled(False)
    model, table, cfg = load_source(args.source)
    model.eval()
    rows = [measure(model, table, cfg, rolling=r, videos=args.videos, long=args.long, batch=args.batch, seed=args.seed)
            for r in (False, True)]
    keys = [k for k in rows[0] if k != "sampler"]
    print(f"{args.source}: {len(cfg.student.denoising_steps)} levels, chunk {cfg.data.frames_per_chunk} frames, "
          f"{args.videos} videos scored, speed on a batch of {args.batch} x {args.long} frames, {torch.get_num_threads()} threads")
    print(markdown_table(["sampler", *keys], [[r["sampler"], *(float(r[k]) for k in keys)] for r in rows]))
    return 0


if __name__ == "__main__":
    from pipeline.cli import run_command  # bad input: one line, exit 2

    sys.exit(run_command(main))
