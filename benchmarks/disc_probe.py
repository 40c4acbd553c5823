"""Can the GAN's discriminator tell real videos from a model's samples? Train it alone and watch `L_D`.

    python benchmarks/disc_probe.py --backbone runs/tiny/pretrain_teacher --samples s.safetensors [--steps 200]

The discriminator is `distill`'s (`pipeline/methods/gan.py`): the backbone (here a teacher, as `sf_gan` starts
its critic) read after its middle block, plus `FrameDiscriminatorHead`; real videos from the sprites stream,
fake ones from a samples file (`./launch.sh sample ... --out s.safetensors`), both re-noised at the DMD levels'
distribution (uniform, shift 0.3, the tiny default's). Prints `L_D` (2 ln 2 = 1.386 at chance) and the mean real
/ fake logits every 10 steps.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from pipeline.data.sprites import SpritesStream  # noqa: E402
from pipeline.diffusion.flow import add_noise  # noqa: E402
from pipeline.methods.dmd import sample_dmd_sigma  # noqa: E402
from pipeline.methods.gan import Discriminator, discriminator_loss  # noqa: E402
from pipeline.models.discriminator import FrameDiscriminatorHead  # noqa: E402
from pipeline.models.loading import load_source  # noqa: E402
from pipeline.training.checkpoint import read_safetensors  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", required=True)
    ap.add_argument("--samples", required=True)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    torch.manual_seed(args.seed)
    model, table, cfg = load_source(args.backbone)
    model.train()
    fake = read_safetensors(args.samples)
    fv, fl = fake["videos"].permute(0, 2, 1, 3, 4), fake["labels"]
    real = SpritesStream(cfg.data.size, fv.shape[2], args.seed + 5).next_batch(len(fv))
    rv, rl = real["videos"].permute(0, 2, 1, 3, 4), real["labels"]
    dim = model.config.num_attention_heads * model.config.attention_head_dim
    head = FrameDiscriminatorHead(dim)
    disc = Discriminator(model, head, "block_causal", cfg.data.frames_per_chunk, model.config.num_layers // 2)
    opt = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=args.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed)
    b, f, start = args.batch, fv.shape[2], time.perf_counter()
    for step in range(args.steps):
        i, j = torch.randint(0, len(rv), (b,), generator=g), torch.randint(0, len(fv), (b,), generator=g)
        sr, sf = (sample_dmd_sigma(b, f, g, False, 0.02, 0.98, 0.3) for _ in range(2))
        xr = add_noise(rv[i], torch.randn(rv[i].shape, generator=g), sr)
        xf = add_noise(fv[j], torch.randn(fv[j].shape, generator=g), sf)
        lr_, lf = disc(xr, sr, table[rl[i]]), disc(xf, sf, table[fl[j]])
        loss = discriminator_loss(lr_, lf)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == args.steps - 1:
            print(f"step {step}: L_D {loss.item():.4f}, real logit {lr_.mean().item():+.3f}, "
                  f"fake logit {lf.mean().item():+.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    from pipeline.cli import run_command  # bad input: one line, exit 2

    sys.exit(run_command(main))
