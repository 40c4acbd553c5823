"""The discriminator's head: per-frame real/fake logits from a Wan transformer's hidden features.

The discriminator of `sf_gan` and of DMD + GAN is the fake-score network (a `CausalWanTransformer`,
conditioned on the noise level and the prompt through its own modulation) read at one block's output, as
DMD2 puts its classifier on the fake score's features, plus this small head: LayerNorm and an MLP on every
token, one logit per token, averaged over each frame's tokens (a patch discriminator: a flaw in one patch
shows in its token's logit; pooling the features first, as an earlier version did, hid the small sprite in the
background and did not learn within 60 steps on sprites where this head did within 150), one logit per frame
(the noise levels are per frame too).
"""

from __future__ import annotations

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class FrameDiscriminatorHead(ModelMixin, ConfigMixin):
    """`[B, F·T, D]` block features of F frames → `[B, F]` logits.

    Args:
        dim: the backbone's hidden size D.
        hidden: the MLP's width.
    """

    @register_to_config
    def __init__(self, dim: int, hidden: int = 256):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, 1))

    def forward(self, features: torch.Tensor, frames: int) -> torch.Tensor:
        per_token = self.mlp(self.norm(features.float())).squeeze(-1)  # [B, F·T]
        return per_token.unflatten(1, (frames, -1)).mean(dim=2)  # [B, F]
