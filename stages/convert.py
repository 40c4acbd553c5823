"""`./launch.sh convert SOURCE DEST --to {diffusers,safetensors,wan,pipeline} [--ema] [--dtype D] [--part P] [--force]`

SOURCE: a stage folder (`runs/tiny/distill`), one of its training checkpoints (`checkpoints/step_*`), a
diffusers folder, a `.safetensors` file (diffusers or original-Wan names), a Self-Forcing / CausVid `.pt`
(read with `torch.load(weights_only=True)`), an accelerate `save_state` folder or a DeepSpeed ZeRO
checkpoint folder; detected from what it holds (`pipeline/io/readers.py`).

DEST: `--to diffusers` a folder (`WanTransformer3DModel.from_pretrained` loads it; `sampling.json` beside
`config.json` keeps frames per chunk, the student's steps and shift, so `./launch.sh sample DEST` streams
from it); `--to safetensors` one file in diffusers names; `--to wan` one file in the original Wan names.
Written under a temporary name and renamed; an existing DEST needs `--force`; a DEST that is SOURCE, lies
inside it or contains it is refused even with `--force`; one command at a time per DEST (`pipeline/io/guard.py`).
Weights holding NaN or inf are refused (naming the first such key) unless `--allow-nonfinite`; a source
without a config whose head count cannot be read off it (any width but Wan's own) needs `--model-config`.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from pipeline.io.convert import TARGETS, convert
from pipeline.models.device import DTYPES
from pipeline.cli import run_command


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="./launch.sh convert", description=__doc__.split("\n\n")[1])
    ap.add_argument("source")
    ap.add_argument("dest")
    ap.add_argument("--to", required=True, choices=TARGETS)
    ap.add_argument("--ema", action="store_true", help="the EMA weights where the source holds both")
    ap.add_argument("--dtype", choices=list(DTYPES), help="cast floating tensors (default: keep)")
    ap.add_argument("--part", default="generator", choices=["generator", "critic"],
                    help="critic: distill's fake score (stage folders, checkpoints, .pt with a critic entry)")
    ap.add_argument("--model-config", help="a diffusers config.json for sources without one whose head count "
                                           "cannot be read off the shapes")
    ap.add_argument("--force", action="store_true", help="replace an existing DEST (never SOURCE, a folder inside "
                                                         "it or one containing it)")
    ap.add_argument("--components", help="--to pipeline, text models: a Wan pipeline folder with vae/, text_encoder/, "
                                          "tokenizer/ (default: the run's components.*)")
    ap.add_argument("--link", action="store_true", help="--to pipeline: link the VAE, text encoder and tokenizer "
                                                        "folders (symbolic links) instead of copying them")
    ap.add_argument("--allow-nonfinite", action="store_true", help="convert weights holding NaN or inf (refused "
                                                                   "by default, naming the first such key)")
    args = ap.parse_args(argv)
    command = f"{ap.prog} {shlex.join(sys.argv[1:] if argv is None else [str(a) for a in argv])}"
    def body() -> int:
        weights = convert(args.source, args.dest, args.to, ema=args.ema, dtype=args.dtype, part=args.part,
                          force=args.force, model_config=args.model_config, command=command,
                          allow_nonfinite=args.allow_nonfinite, components=args.components, link=args.link)
        n = sum(v.numel() for v in weights.state_dict.values())
        role = (weights.sampling or {}).get("role", "no sampling settings")
        print(f"read {weights.origin} ({len(weights.state_dict)} tensors, {n / 1e6:.2f}M parameters, {role})")
        print(f"wrote {args.dest} (--to {args.to}{', ' + args.dtype if args.dtype else ''})")
        if args.to == "pipeline":
            print(pipeline_summary(args.dest, args.link))
        return 0
    return run_command(body)


def pipeline_summary(dest, link: bool) -> str:
    """What a `--to pipeline` folder holds, and whether its VAE, text encoder and tokenizer were copied or linked."""
    from pathlib import Path

    dest = Path(dest)
    parts = sorted(p.name for p in dest.iterdir() if p.is_dir())
    linked = [f"{p.name} -> {p.resolve()}" for p in sorted(dest.iterdir()) if p.is_symlink()]
    if linked:
        how = "linked (symbolic links): " + ", ".join(linked)
    elif link or not any(p in parts for p in ("vae", "text_encoder", "tokenizer")):
        how = "class-conditioned (sprites): no VAE or text encoder"
    else:
        how = "vae/, text_encoder/, tokenizer/ copied"
    return f"pipeline folder: {', '.join(p + '/' for p in parts)}; {how}"


if __name__ == "__main__":
    sys.exit(main())
