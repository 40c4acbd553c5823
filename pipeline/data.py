"""Training data sources behind one interface, so every trainer works on sprites or real latents.

A source yields batches `{"x0": [B, C, F, H, W] latents, "context": [B, L, D] prompt embeddings,
"labels": [B] int64 (or -1 when there are none)}` and gives the null prompt `null_context(B)` for
label dropout and guidance. Its `state_dict()` makes the stream resumable.

- `SpritesSource`: the procedural `sprites` videos (pixels are the latents, C = 3), class ids as
  prompts through the fixed class-embedding table.
- `LatentSource`: pre-encoded latents and prompt embeddings in safetensors shards (the real-scale
  path: a VAE and a text encoder run once, offline), each shard holding `latents [N, C, F, H, W]`,
  `prompt_embeds [N, L, D]`; `null_embeds.safetensors` holds `prompt_embeds [1, L, D]` of the empty
  prompt.
"""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import read_safetensors
from .conditioning import embed_labels, make_class_table
from .sprites import NULL_CLASS, SpritesStream


class SpritesSource:
    """Sprites videos as latents `[B, 3, F, S, S]` with class-embedding prompts."""

    def __init__(self, size: int, frames: int, seed: int, table: torch.Tensor):
        self.stream = SpritesStream(size=size, frames=frames, seed=seed)
        self.table = table

    def next_batch(self, n: int, device="cpu") -> dict[str, torch.Tensor]:
        b = self.stream.next_batch(n)
        x0 = b["videos"].permute(0, 2, 1, 3, 4).contiguous()  # [N, F, 3, S, S] -> [N, 3, F, S, S]
        return {"x0": x0.to(device), "context": self.cond(b["labels"]).to(device), "labels": b["labels"]}

    def cond(self, labels: torch.Tensor) -> torch.Tensor:
        return embed_labels(self.table, labels)

    def null_context(self, n: int) -> torch.Tensor:
        return embed_labels(self.table, torch.full((n,), NULL_CLASS, dtype=torch.long))

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)


class LatentSource:
    """Pre-encoded latents and prompt embeddings from `*.safetensors` shards in a folder, in a seeded
    random order (one shuffled pass after another)."""

    def __init__(self, path: str | Path, seed: int):
        path = Path(path)
        shards = sorted(p for p in path.glob("*.safetensors") if p.name != "null_embeds.safetensors")
        if not shards:
            raise FileNotFoundError(f"no latent shards (*.safetensors) in {path}")
        parts = [read_safetensors(p) for p in shards]
        for p, part in zip(shards, parts):
            if "latents" not in part or "prompt_embeds" not in part:
                raise ValueError(f"{p}: a latent shard needs 'latents' and 'prompt_embeds' tensors")
        self.latents = torch.cat([p["latents"] for p in parts])
        self.embeds = torch.cat([p["prompt_embeds"] for p in parts])
        if self.latents.ndim != 5 or len(self.latents) != len(self.embeds):
            raise ValueError(f"{path}: latents must be [N, C, F, H, W] with one prompt_embeds row each")
        self.null = read_safetensors(path / "null_embeds.safetensors")["prompt_embeds"]
        self.seed, self.drawn = seed, 0

    def _order(self, epoch: int) -> torch.Tensor:
        return torch.randperm(len(self.latents), generator=torch.Generator().manual_seed(self.seed + epoch))

    def next_batch(self, n: int, device="cpu") -> dict[str, torch.Tensor]:
        size = len(self.latents)
        idx = torch.stack([self._order(i // size)[i % size] for i in range(self.drawn, self.drawn + n)])
        self.drawn += n
        return {"x0": self.latents[idx].float().to(device), "context": self.embeds[idx].float().to(device),
                "labels": torch.full((n,), -1, dtype=torch.long)}

    def null_context(self, n: int) -> torch.Tensor:
        return self.null.float().expand(n, *self.null.shape[1:])

    def state_dict(self) -> dict:
        return {"drawn": self.drawn, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.drawn, self.seed = state["drawn"], state["seed"]


def class_table(cfg) -> torch.Tensor:
    """The fixed class-embedding table `[num_classes + 1, cond_tokens, model.text_dim]` of a config."""
    return make_class_table(cfg.data.num_classes, cfg.data.cond_tokens, cfg.model.text_dim, cfg.data.cond_seed)


def build_source(cfg, seed: int):
    """The configured data source (`data.kind`: sprites or latents)."""
    if cfg.data.kind == "sprites":
        return SpritesSource(cfg.data.size, cfg.data.frames, seed, class_table(cfg))
    if cfg.data.path is None:
        raise ValueError("data.path must name a folder of latent shards when data.kind=latents")
    return LatentSource(cfg.data.path, seed)
