"""`./launch.sh sample SOURCE --out FILE.safetensors [--n N] [--frames F] [--steps K] [--seed S] [--guidance G]`

SOURCE is a stage folder (e.g. `runs/tiny/pretrain_teacher`: its EMA weights, class-embedding table and
config) or a diffusers model folder (then the sampler and conditioning come from the default config).
Writes `videos` float32 `[N, F, 3, S, S]` in [-1, 1] and `labels` int64 `[N]` (balanced over the
classes) to FILE, and a GIF preview grid next to it.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from pipeline.causal_wan import CausalWanTransformer
from pipeline.checkpoint import CheckpointError, read_safetensors
from pipeline.config import Config, load_config
from pipeline.data import class_table
from pipeline.media import save_video_grid
from pipeline.sprites import balanced_labels
from stages.common import USER_ERRORS, sample_videos


def load_source(source: str, raw: bool = False):
    """Model, class table and config of a stage folder or a diffusers model folder."""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"sample source not found: {path}")
    if (path / "manifest.json").is_file():  # a stage folder
        if not (path / "transformer_ema").is_dir():
            raise CheckpointError(f"{path}: stage has no finished weights (transformer_ema/); run the stage first")
        cfg = load_config(path / "config.yaml")
        model = CausalWanTransformer.from_pretrained(path / ("transformer" if raw else "transformer_ema"))
        table = read_safetensors(path / "conditioning.safetensors")["class_table"]
        return model, table, cfg
    if (path / "config.json").is_file():  # a diffusers model folder
        model = CausalWanTransformer.from_pretrained(path)
        prediction = json.loads((path / "config.json").read_text()).get("prediction", "flow")  # Wan's: flow
        cfg = load_config(None, [f"model.text_dim={model.config.text_dim}", f"model.prediction={prediction}"])
        return model, class_table(cfg), cfg
    raise CheckpointError(f"{path}: not a stage folder (manifest.json) or a diffusers model folder (config.json); "
                          "other checkpoint kinds load through ./launch.sh convert")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="./launch.sh sample")
    ap.add_argument("source")
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=96)
    ap.add_argument("--frames", type=int)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--guidance", type=float)
    ap.add_argument("--sampler", choices=["autoregressive", "synchronous"])
    ap.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")
    args = ap.parse_args(argv)
    out = Path(args.out)
    try:
        if out.suffix != ".safetensors":
            raise ValueError(f"--out must end in .safetensors, got {out}")
        model, table, cfg = load_source(args.source, args.raw)
        cfg: Config
        sampler = cfg.pretrain_teacher.sampler
        sampler = replace(sampler, **{k: v for k, v in dict(steps=args.steps, guidance=args.guidance,
                                                            kind=args.sampler).items() if v is not None})
        frames = args.frames or cfg.data.frames
        if frames % cfg.data.frames_per_chunk:
            raise ValueError(f"--frames ({frames}) must be a multiple of frames_per_chunk ({cfg.data.frames_per_chunk})")
        labels = balanced_labels(args.n)
        videos = sample_videos(model, table, labels, frames, cfg.data.size, cfg.pretrain_teacher.attention,
                               cfg.data.frames_per_chunk, sampler, args.seed, cfg.model.prediction)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({"videos": videos.float().contiguous(), "labels": labels}, str(out))
    preview = save_video_grid(videos[:36], out.with_suffix(".gif"))
    print(f"wrote {out} ({len(videos)} videos × {frames} frames) and {preview}")
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
