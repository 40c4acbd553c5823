"""Class-conditioning as prompt embeddings: the stand-in for a frozen text encoder.

Class id `c` (0..5, and the null class 6 for classifier-free guidance) maps to a fixed sequence of
`tokens` embeddings of width `text_dim`, fed to the transformer as `encoder_hidden_states` exactly like
UMT5 prompt embeddings in Wan. The table is drawn from a seed (like a frozen encoder, it is never
trained) and saved with every checkpoint, so a model never depends on re-deriving it.
"""

from __future__ import annotations

import torch

from pipeline.data import shard



def make_class_table(num_classes: int, tokens: int, text_dim: int, seed: int) -> torch.Tensor:
    """Fixed embedding table `[num_classes + 1, tokens, text_dim]` (last row: the null class).

    Unit-variance Gaussian rows: well separated in expectation, and of the scale UMT5 outputs have.
    """
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_classes + 1, tokens, text_dim, generator=g)


def embed_labels(table: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Look up prompt embeddings: labels `[B]` int64 → `[B, tokens, text_dim]`."""
    if labels.min() < 0 or labels.max() >= table.shape[0]:
        raise ValueError(f"labels must lie in 0..{table.shape[0] - 1}, got {labels.min()}..{labels.max()}")
    return table.to(labels.device)[labels]


def drop_prompts(context: torch.Tensor, null: torch.Tensor, p: float, generator: torch.Generator) -> torch.Tensor:
    """Replace each row of `context [B, L, D]` by the null prompt `[B, L, D]` with probability `p`
    (prompt dropout, so one model learns both terms of classifier-free guidance)."""
    drop = shard.rand((context.shape[0],), generator) < p
    return torch.where(drop.to(context.device)[:, None, None], null, context)
