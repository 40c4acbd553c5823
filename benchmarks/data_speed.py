"""How fast the sprites stream makes batches (the data must never be what a tiny training run waits on).

    python benchmarks/data_speed.py [--batch 32] [--frames 12] [--size 16] [--repeats 30]

Prints the median and the slowest time of `SpritesStream.next_batch` over `--repeats` calls, after one warm-up
call (its first parameter block). On this 2-core CPU, idle, the median was under 5 ms for 32 x 12 frames at 16x16
(the bound a timed test held it to before it became this benchmark: timings fail under load).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.data.sprites import SpritesStream  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--frames", type=int, default=12)
    ap.add_argument("--size", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args(argv)
    stream = SpritesStream(args.size, frames=args.frames, seed=0)
    stream.next_batch(args.batch)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        stream.next_batch(args.batch)
        times.append(time.perf_counter() - start)
    print(f"next_batch({args.batch}) of {args.frames} frames at {args.size}x{args.size}: median "
          f"{statistics.median(times) * 1e3:.2f} ms, slowest {max(times) * 1e3:.2f} ms ({args.repeats} calls)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
