"""Random stand-ins for what a real recipe reads, so its stages run at full shape where no weights or data
can be fetched (a GPU machine cut off from the hub): a stock-Wan-like transformer folder with random weights
and a prompt-embedding folder with random rows, plus the `key=value` overrides that point a recipe at them.

    python benchmarks/random_recipe.py OUT [--shape configs/shapes/wan2.1-t2v-1.3b.json] [--prompts 16]
        [--seq-len 512] [--latents F H W] [--device cpu|cuda] [--seed 0] [--force]
    ./launch.sh configs/wan2.1-t2v-1.3b/student.yaml --stages distill $(cat OUT/overrides.txt) distill.steps=4

Writes (an existing OUT is refused; with `--force` what this script writes there is replaced, nothing else):
- `OUT/Wan-random/transformer/`: diffusers' `WanTransformer3DModel` of the `--shape` config (a diffusers
  `config.json`, as `configs/shapes/*.json`), its default random initialisation, saved in fp32 (as a
  stock Wan folder); used as `model.pretrained`, the teacher (`init_student.teacher`,
  `distill.teacher`), the fake score's start (`distill.critic`) and the student's (`distill.student`).
- `OUT/prompt-embeds/`: what `prepare_data` writes for `data.kind=prompts` (`shard_00000.safetensors` with
  `prompt_embeds [N, L, D]`, `null_embeds.safetensors [1, L, D]`): UMT5-like rows, a random number of leading
  tokens (8-64) of N(0, 0.2²) and zeros after, as Wan's pipeline zeroes the padding; the empty prompt is one
  token.
- with `--latents F H W`: `OUT/latents/` as `prepare_data` writes for `data.kind=latents` (`latents
  [N, C, F, H, W]` of N(0, 1), the same prompt rows), for stages that train on videos (`pretrain_teacher`,
  `distill.method=df_dmd`), and `OUT/overrides-latents.txt` pointing at it.
- `OUT/overrides.txt`: one line of overrides (run.dir, data.path, model.pretrained, the teacher and student
  sources and their attention, no previews). The text encoder and VAE are not needed to train on prompt embeddings.

Speed and memory only: a model with random weights learns nothing meaningful.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import BenchmarkArgError  # noqa: E402
from pipeline.cli import run_command  # noqa: E402
from pipeline.data.prepare import NULL_EMBEDS  # noqa: E402
from pipeline.data.shard_files import shard_path  # noqa: E402
from pipeline.io.guard import check_output, replacing  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def random_embeds(n: int, seq_len: int, dim: int, gen: torch.Generator, *, lengths=(8, 64)) -> torch.Tensor:
    """`[n, seq_len, dim]` rows: a random number of leading tokens of N(0, 0.2^2), zeros after (padding)."""
    lo, hi = min(lengths[0], seq_len), min(lengths[1], seq_len)
    out = torch.zeros(n, seq_len, dim)
    for i, used in enumerate(torch.randint(lo, hi + 1, (n,), generator=gen).tolist()):
        out[i, :used] = 0.2 * torch.randn(used, dim, generator=gen)
    return out


def _shards(folder: Path, tensors: dict, null: torch.Tensor, names: list[str]) -> None:
    """One shard of `tensors` and the null embeddings, as prepare_data lays them out."""
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"items": json.dumps(names), "prompts": json.dumps(names), "random": "benchmarks/random_recipe.py"}
    with replacing(shard_path(folder, 0)) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
    with replacing(folder / NULL_EMBEDS) as tmp:
        save_file({"prompt_embeds": null}, str(tmp), metadata={**meta, "items": '[""]', "prompts": '[""]'})


def write_random_recipe(out: Path, *, shape: Path, prompts: int = 16, seq_len: int = 512, device: str = "cpu",
                        seed: int = 0, latents: tuple[int, int, int] | None = None) -> list[str]:
    """Write the stand-ins into `out` (see the module docstring; what an earlier call wrote there is replaced);
    returns the overrides. `latents`: (frames, height, width) of latent videos to write as well."""
    import shutil

    from diffusers import WanTransformer3DModel

    for mine in (out / "Wan-random", out / "prompt-embeds", out / "latents"):
        if mine.is_dir():
            shutil.rmtree(mine)

    config = json.loads(shape.read_text())
    folder = out / "Wan-random" / "transformer"
    torch.manual_seed(seed)
    with torch.device(device):  # initialised where it is fast (1.3B parameters: seconds on a GPU)
        model = WanTransformer3DModel.from_config(config)
    model.to("cpu").save_pretrained(folder)
    del model

    gen = torch.Generator().manual_seed(seed)
    names = [f"random prompt {i}" for i in range(prompts)]
    rows = random_embeds(prompts, seq_len, int(config["text_dim"]), gen).to(torch.bfloat16)
    null = random_embeds(1, seq_len, int(config["text_dim"]), gen, lengths=(1, 1)).to(torch.bfloat16)
    _shards(out / "prompt-embeds", {"prompt_embeds": rows}, null, names)
    if latents is not None:
        videos = torch.randn(prompts, int(config["in_channels"]), *latents, generator=gen).to(torch.bfloat16)
        _shards(out / "latents", {"latents": videos, "prompt_embeds": rows}, null, names)

    common = [f"run.dir={out / 'run'}", f"model.pretrained={folder}", f"init_student.teacher={folder}",
              f"distill.teacher={folder}", f"distill.critic={folder}", f"distill.student={folder}",
              # a stock Wan model attends bidirectionally and records nothing of it
              "init_student.teacher_attention=bidirectional", "distill.teacher_attention=bidirectional",
              "distill.critic_attention=bidirectional", "distill.preview_n=0"]
    overrides = [f"data.path={out / 'prompt-embeds'}", *common]
    (out / "overrides.txt").write_text(" ".join(overrides) + "\n")
    if latents is not None:
        (out / "overrides-latents.txt").write_text(" ".join(["data.kind=latents", f"data.path={out / 'latents'}",
                                                             *common]) + "\n")
    return overrides


def main(argv=None) -> int:
    """The command; bad options or an existing OUT: one line and status 2."""
    return run_command(lambda: _main(argv))


def _main(argv) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--shape", type=Path, default=REPO / "configs" / "shapes" / "wan2.1-t2v-1.3b.json",
                    help="a diffusers WanTransformer3DModel config.json")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=512, help="tokens per prompt (Wan: 512)")
    ap.add_argument("--device", default="cpu", help="where the weights are initialised (cpu, cuda)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--latents", type=int, nargs=3, metavar=("F", "H", "W"),
                    help="also write latent videos of F frames of H x W (the recipe's data.frames, data.latent_size)")
    ap.add_argument("--force", action="store_true", help="replace what an earlier call wrote in OUT")
    args = ap.parse_args(argv)
    if args.prompts < 1 or args.seq_len < 1 or min(args.latents or [1]) < 1:
        raise BenchmarkArgError(f"--prompts, --seq-len and --latents must be >= 1, got {args.prompts}, {args.seq_len} "
                                f"and {args.latents}")
    if not args.shape.is_file():
        raise FileNotFoundError(f"--shape: file not found: {args.shape}")
    check_output(args.out, {"--shape": args.shape}, args.force, what="OUT")
    if args.force and args.out.exists() and not (args.out / "overrides.txt").is_file():
        raise FileExistsError(f"OUT {args.out} exists and was not written by this script (no overrides.txt); "
                              "choose another folder")
    overrides = write_random_recipe(args.out, shape=args.shape, prompts=args.prompts, seq_len=args.seq_len,
                                    device=args.device, seed=args.seed, latents=args.latents)
    print(f"random stand-ins in {args.out}; overrides ({args.out / 'overrides.txt'}):")
    print(" ".join(overrides))
    if args.latents:
        print(f"for stages that train on videos: {args.out / 'overrides-latents.txt'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
