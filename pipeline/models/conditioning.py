"""Class-conditioning as prompt embeddings: the stand-in for a frozen text encoder.

Class id `c` (0..5, and the null class 6 for classifier-free guidance) maps to a fixed sequence of
`tokens` embeddings of width `text_dim`, fed to the transformer as `encoder_hidden_states` exactly like
UMT5 prompt embeddings in Wan. The table is drawn from a seed (like a frozen encoder, it is never
trained) and saved with every checkpoint, so a model never depends on re-deriving it.
"""

from __future__ import annotations

import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config

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


class ClassPrompts(ModelMixin, ConfigMixin):
    """A sprites model's class-embedding table as a diffusers model component (`CausalWanPipeline`'s
    `class_prompts`, the class-conditioned path that needs no text encoder): `table [num_classes + 1, tokens,
    text_dim]` (last row: the null class), saved and loaded as safetensors by `save_pretrained` /
    `from_pretrained`. `forward(labels [B])` → prompt embeddings `[B, tokens, text_dim]` (`embed_labels`)."""

    @register_to_config
    def __init__(self, num_classes: int = 6, tokens: int = 4, text_dim: int = 4096):
        super().__init__()
        self.table = torch.nn.Parameter(torch.zeros(num_classes + 1, tokens, text_dim), requires_grad=False)

    @classmethod
    def of(cls, table: torch.Tensor) -> "ClassPrompts":
        """The component holding `table [K + 1, L, D]` (a stage's `conditioning.safetensors`, `class_table(cfg)`)."""
        module = cls(num_classes=table.shape[0] - 1, tokens=table.shape[1], text_dim=table.shape[2])
        module.table.data.copy_(table)
        return module

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return embed_labels(self.table, labels)
