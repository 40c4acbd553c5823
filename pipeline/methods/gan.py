"""The GAN row of seed 002: a discriminator at random noise levels (SF+GAN), and DMD2's DMD + GAN.

Real videos x (the data) and the generator's samples G(c) (sf: its own rollouts, gradients only through
the exit steps) are re-noised to random per-frame levels, `x_σ = (1-σ)·x + σ·ε` (Diffusion-GAN's trick:
the loss becomes an expected JSD over noise levels, seed 002), and scored by the discriminator
`D(x_σ, σ, c) -> [B, F]` logits: the fake-score network read after block `layer` (conditioned on σ and
the prompt by its own modulation; `CausalWanTransformer.forward(features_at=...)`) plus a small head
(`pipeline/models/discriminator.py`), as DMD2 puts its classifier on the fake score's features.

Non-saturating losses (Goodfellow et al.; DMD2's), means over videos and frames:

    L_D = E[softplus(-D(x_σ))] + E[softplus(D(G(c)_σ))]  (+ γ/2 · E‖∇_{x_σ} D(x_σ)‖²,  R1 on real inputs)
    L_G = E[softplus(-D(G(c)_σ))]

R1 exactly differentiates a gradient (a double backward: SDPA's math kernel, every block's attention
scores kept), or, with `r1_sigma` s, by a finite difference (APT's approximated R1), one more pass:
since E_ε[(∇D·sε)²] = s²‖∇D‖², the penalty γ/2 · E[(ΣD(x_σ + sε) − ΣD(x_σ))²] / s² → R1 as s → 0.

At the optimum of D, `L_G` is `2·JSD(p_data ‖ p_G) - log 4` up to the generator-independent terms
(per noise level). `sf_gan` trains the generator by `L_G` alone; `distill.gan_weight` adds
`gan_weight·L_G` to DMD's generator loss and `gan_weight·L_D` to the critic's denoising loss (DMD2).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from pipeline.data import shard
from pipeline.diffusion.flow import add_noise, timestep_from_sigma
from pipeline.training.optim import no_parameter_grads


def discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """`mean(softplus(-D(real))) + mean(softplus(D(fake)))`: logits `[B, F]` each."""
    return F.softplus(-real_logits.float()).mean() + F.softplus(fake_logits.float()).mean()


def generator_gan_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """The non-saturating generator loss `mean(softplus(-D(fake)))`."""
    return F.softplus(-fake_logits.float()).mean()


def r1_finite_difference(logits: torch.Tensor, perturbed: torch.Tensor, sigma: float) -> torch.Tensor:
    """`mean over videos of (Σ D(x + σε) − Σ D(x))² / σ²`, logits `[B, F]` of x and of x + σε: R1 in
    expectation over ε as σ → 0 (no double backward)."""
    return (perturbed.float().sum(1) - logits.float().sum(1)).pow(2).mean() / sigma ** 2


def r1_penalty(logits: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """`mean over videos of ‖∇_x Σ D(x)‖²` (R1; `inputs` must require grad; the graph is kept so the penalty
    itself is differentiated)."""
    grad, = torch.autograd.grad(logits.float().sum(), inputs, create_graph=True)
    return grad.float().pow(2).flatten(1).sum(1).mean()


@dataclass
class Discriminator:
    """`D(x_σ, σ, c)`: a Wan transformer's features after block `layer`, and a head.

    Args:
        backbone: the fake-score network (a `CausalWanTransformer`, possibly wrapped for DDP).
        head: a `FrameDiscriminatorHead`.
        attention, frames_per_chunk: how the backbone attends (the fake score's own).
        layer: the block whose output the head reads.
    """

    backbone: torch.nn.Module
    head: torch.nn.Module
    attention: str
    frames_per_chunk: int
    layer: int

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """x `[B, C, F, H, W]`, σ `[B, F]`, context `[B, L, D]` → logits `[B, F]`."""
        feats = self.backbone(x, timestep_from_sigma(sigma), context, attention=self.attention,
                              frames_per_chunk=self.frames_per_chunk, features_at=self.layer)
        return self.head(feats, x.shape[2])


@dataclass
class GAN:
    """The GAN terms over a `Discriminator` (`draw_sigma(x, gen)`: the DMD levels' distribution).

    Args:
        disc: the discriminator as trained (wrapped modules).
        frozen_disc: the same modules unwrapped, for the generator's loss (no DDP hooks; parameters
            collect no gradients there).
        r1_weight: γ of the R1 penalty (0: none).
        r1_sigma: R1 by a finite difference at this perturbation (None: exact, a double backward).
        r1_unwrapped: R1's pass runs through `frozen_disc`'s modules (its parameters do collect gradients there):
            a DeepSpeed engine ends its backward (reduces its gradients) after every backward pass through it,
            R1's inner gradient too; its parameters' gradients still reach the engine's own backward.
    """

    disc: Discriminator
    frozen_disc: Discriminator
    draw_sigma: object
    r1_weight: float = 0.0
    r1_unwrapped: bool = False
    r1_sigma: float | None = None

    def frozen(self):
        """The discriminator's parameters collect no gradient while this holds. A generator update holds it
        through its backward too: gradient checkpointing recomputes the discriminator's blocks there, and the
        recomputation must see the parameters as the forward did (else it saves other tensors and fails)."""
        return no_parameter_grads(self.frozen_disc.backbone, self.frozen_disc.head)

    def generator_term(self, x: torch.Tensor, context: torch.Tensor, gen) -> tuple[torch.Tensor, dict]:
        """`L_G` of samples x `[B, C, F, H, W]` (with their gradients) under prompts `context` (hold `frozen()`
        through the backward when the discriminator checkpoints its blocks)."""
        sigma = self.draw_sigma(x, gen)
        x_t = add_noise(x, shard.randn(x.shape, gen).to(x.device), sigma)
        with self.frozen():
            logits = self.frozen_disc(x_t, sigma, context)
        return generator_gan_loss(logits), {"gan_g_logit": logits.detach().float().mean().item()}

    def discriminator_term(self, real: torch.Tensor, real_context: torch.Tensor, fake: torch.Tensor,
                           fake_context: torch.Tensor, gen) -> tuple[torch.Tensor, dict]:
        """`L_D` (+ R1) on real videos and detached generator samples, each at fresh levels and noise."""
        fake = fake.detach()
        s_real, s_fake = self.draw_sigma(real, gen), self.draw_sigma(fake, gen)
        x_real = add_noise(real, shard.randn(real.shape, gen).to(real.device), s_real)
        x_fake = add_noise(fake, shard.randn(fake.shape, gen).to(fake.device), s_fake)
        exact_r1 = self.r1_weight and self.r1_sigma is None
        if exact_r1:  # R1 differentiates a gradient: SDPA's math kernel has a double backward, flash does not
            x_real = x_real.detach().requires_grad_(True)
            with sdpa_kernel(SDPBackend.MATH):
                real_logits = (self.frozen_disc if self.r1_unwrapped else self.disc)(x_real, s_real, real_context)
        else:
            real_logits = self.disc(x_real, s_real, real_context)
        fake_logits = self.disc(x_fake, s_fake, fake_context)
        loss = discriminator_loss(real_logits, fake_logits)
        stats = {"gan_d_loss": loss.item(), "d_real_logit": real_logits.detach().float().mean().item(),
                 "d_fake_logit": fake_logits.detach().float().mean().item()}
        if exact_r1:
            r1 = r1_penalty(real_logits, x_real)
        elif self.r1_weight:  # the same real inputs, perturbed: one more pass
            eps = shard.randn(x_real.shape, gen).to(x_real.device)
            r1 = r1_finite_difference(real_logits, self.disc(x_real + self.r1_sigma * eps, s_real, real_context),
                                      self.r1_sigma)
        if self.r1_weight:
            loss = loss + 0.5 * self.r1_weight * r1
            stats["r1"] = r1.item()
        return loss, stats
