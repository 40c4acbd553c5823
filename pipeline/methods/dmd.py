"""Distribution Matching Distillation (DMD) of a few-step causal student, two ways (seed 002).

The generator G_θ (the student) produces clean videos x; both score models see them re-noised,
`x_σ = (1-σ)·x + σ·ε`, and predict clean videos:

- real score: the frozen teacher with classifier-free guidance,
  `x̂0_real = x̂0(x_σ, ∅) + w·(x̂0(x_σ, c) - x̂0(x_σ, ∅))` (`real_guidance` w; Self-Forcing's "3.0" writes
  `cond + 3·(cond - uncond)`, which is w = 4 here). Guidance in x0 or in flow space is the same thing:
  at fixed `x_σ, σ` the two are affine in each other.
- fake score: the critic, trained on the generator's own samples (conditional only by default).

DMD's gradient of the reverse KL `KL(p_G ‖ p_data)`, averaged over noise levels, is the score
difference `s_fake - s_real`; in x0 terms, normalised per sample (DMD eq. 8):

    g = (x̂0_fake - x̂0_real) / mean|x - x̂0_real|,        loss = 0.5·‖x - stopgrad(x - g)‖²  (mean)

so that `∂loss/∂x = g / numel(x)`. The critic learns by the ordinary denoising (flow-matching) loss on
detached generator samples.

Where x comes from is the method:
- `SelfForcingDMD` (`sf_dmd`): the student rolls out chunk by chunk on its own outputs with its KV
  cache, each chunk stopping at a random exit step whose x̂0 (the only call with gradients) is the
  chunk (`sampling.few_step_rollout`). DMD on self-generated videos: reverse KL.
- `DFDMD` (`df_dmd`, CausVid's approximation): clean videos are noised per chunk to random steps of the
  student's list and denoised in one block-causal forward; neither forward nor reverse KL (seed 002).

With `gan` set, the GAN terms of `pipeline/methods/gan.py` are added to both losses (DMD2's DMD + GAN); with
`dmd_weight` 0 they are the whole loss (`sf_gan`: no score calls).

Noise levels for DMD and the critic (`sample_dmd_sigma`): `per_frame` draws one σ per frame
(seed 002's correction: the paper's algorithm draws one per video, its code per frame), `uniform`
one per video.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.data import shard
from pipeline.diffusion.flow import add_noise, shift_sigma
from pipeline.diffusion.losses import flow_matching_loss
from pipeline.diffusion.sampling import Denoiser, few_step_rollout, rolling_rollout
from pipeline.methods.gan import GAN
from pipeline.training.optim import no_parameter_grads


def sample_dmd_sigma(batch: int, frames: int, generator: torch.Generator, per_frame: bool = True,
                     sigma_min: float = 0.02, sigma_max: float = 0.98, shift: float = 1.0) -> torch.Tensor:
    """Self-Forcing's DMD noise levels: `σ ~ U(min, max)`, shifted, clamped back to `[min, max]`.

    Returns:
        σ `[batch, frames]`: independent per frame (`per_frame`) or one per video repeated over frames.
    """
    u = shard.rand((batch, frames if per_frame else 1), generator, dtype=torch.float64)
    sigma = shift_sigma(sigma_min + (sigma_max - sigma_min) * u, shift).clamp(sigma_min, sigma_max)
    return sigma.float().expand(batch, frames).contiguous()


def dmd_gradient(x: torch.Tensor, x0_fake: torch.Tensor, x0_real: torch.Tensor) -> torch.Tensor:
    """`g = (x̂0_fake - x̂0_real) / mean|x - x̂0_real|`, the mean per sample over all but the batch axis.

    NaN-safe: the normaliser is floored at 1e-8 and any non-finite entry of g becomes 0.
    Shapes: all `[B, ...]` alike; returns `[B, ...]`.
    """
    dims = tuple(range(1, x.ndim))
    norm = (x.float() - x0_real.float()).abs().mean(dim=dims, keepdim=True).clamp_min(1e-8)
    return torch.nan_to_num((x0_fake.float() - x0_real.float()) / norm, nan=0.0, posinf=0.0, neginf=0.0)


def dmd_loss(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """`0.5·mean((x - stopgrad(x - g))²)`: a scalar whose gradient with respect to x is `g / numel(x)`."""
    return 0.5 * F.mse_loss(x.float(), (x.float() - grad).detach())


@dataclass
class DMD:
    """DMD with a real score (frozen teacher) and a fake score (trainable critic).

    Subclasses say where the generator's samples come from (`samples`).

    Args:
        generator: the student (block-causal `Denoiser`).
        real, fake: teacher and critic `Denoiser`s (x̂0 predictions; any attention they were trained with).
        sigmas: `[K]` the student's few-step levels.
        real_guidance, fake_guidance: guidance weights w of the two scores (1 = conditional only).
        per_frame, sigma_min, sigma_max, sigma_shift: the DMD/critic noise levels (`sample_dmd_sigma`).
        context_sigma, max_context_frames, sink_frames: the student's KV cache at rollout (sf_dmd).
        dmd_weight: 1 for DMD; 0 for `sf_gan` (no score calls: the GAN alone, `real` unused).
        gan, gan_weight: the GAN terms (`pipeline/methods/gan.py`) added to both losses with this weight.
    """

    generator: Denoiser
    real: Denoiser
    fake: Denoiser
    sigmas: torch.Tensor
    real_guidance: float = 4.0
    fake_guidance: float = 1.0
    per_frame: bool = True
    sigma_min: float = 0.02
    sigma_max: float = 0.98
    sigma_shift: float = 1.0
    context_sigma: float = 0.0
    max_context_frames: int | None = None
    sink_frames: int = 0
    dmd_weight: float = 1.0
    gan: GAN | None = None
    gan_weight: float = 0.0

    def samples(self, batch: dict, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
        """Generator samples `[B, C, F, H, W]` (with gradients when grad mode is on) and stats to log."""
        raise NotImplementedError

    def draw_sigma(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        return sample_dmd_sigma(x.shape[0], x.shape[2], gen, self.per_frame, self.sigma_min, self.sigma_max,
                                self.sigma_shift).to(x.device)

    @staticmethod
    def guided_x0(denoiser: Denoiser, x, sigma, cond, uncond, guidance: float) -> torch.Tensor:
        """`x̂0_u + w·(x̂0_c - x̂0_u)` in one batched call (w = 1: the conditional x̂0 alone)."""
        if guidance == 1.0:
            return denoiser.predict_x0(x, sigma, cond)
        both = denoiser.predict_x0(torch.cat([x, x]), torch.cat([sigma, sigma]), torch.cat([cond, uncond]))
        x0_cond, x0_uncond = both.chunk(2)
        return x0_uncond + guidance * (x0_cond - x0_uncond)

    def score_x0(self, denoiser: Denoiser, x, sigma, batch: dict, guidance: float) -> torch.Tensor:
        """`guided_x0` under the prompt in force at every frame: with a prompt switch in `batch` (`switch`:
        `(K, cond_K [B, L, D])`, set by a switched rollout) the frames from K on take the score under `cond_K`
        (a second pass; a block-causal score's frames before K are exactly the first pass's)."""
        x0 = self.guided_x0(denoiser, x, sigma, batch["context"], batch["null"], guidance)
        if batch.get("switch") is None:
            return x0
        k, cond = batch["switch"]
        after = self.guided_x0(denoiser, x, sigma, cond, batch["null"], guidance)
        return torch.cat([x0[:, :, :k], after[:, :, k:]], dim=2)

    def generator_loss(self, batch: dict, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
        """DMD loss of freshly generated samples.

        Args:
            batch: `context [B, L, D]`, `null [B, L, D]` (and `x0` for df_dmd).
        Returns:
            (loss, stats): stats hold `dmd_grad_norm` (mean per-sample ‖g‖), `dmd_sigma` (the levels drawn,
            `[B, F]`), `samples` (x detached, for the critic to reuse) and what `samples` reports.
        """
        x, stats = self.samples(batch, gen)
        loss = x.new_zeros((), dtype=torch.float32)
        if self.dmd_weight:
            sigma = self.draw_sigma(x, gen)
            noise = shard.randn(x.shape, gen).to(x.device)
            with torch.no_grad():
                x_t = add_noise(x.detach(), noise, sigma)
                with no_parameter_grads(self.fake.model):  # no bf16 copy of the critic's weights cached
                    x0_fake = self.score_x0(self.fake, x_t, sigma, batch, self.fake_guidance)
                x0_real = self.score_x0(self.real, x_t, sigma, batch, self.real_guidance)
                grad = dmd_gradient(x.detach(), x0_fake, x0_real)
            stats.update(dmd_grad_norm=grad.flatten(1).norm(dim=1).mean().item(), dmd_sigma=sigma.detach().cpu())
            loss = dmd_loss(x, grad) if self.dmd_weight == 1 else self.dmd_weight * dmd_loss(x, grad)
        if self.gan is not None:
            g, gan_stats = self.gan.generator_term(x, batch["context"], gen)
            loss = loss + self.gan_weight * g
            stats.update(gan_stats, gan_g_loss=g.item())
        stats["samples"] = x.detach()
        return loss, stats

    def critic_loss(self, batch: dict, gen: torch.Generator, samples: torch.Tensor | None = None
                    ) -> tuple[torch.Tensor, dict]:
        """The critic's denoising loss on detached generator samples at freshly drawn levels.

        Args:
            samples: `[B, C, F, H, W]` generator samples of `batch` to reuse (from `generator_loss`'s
                stats); None: generate new ones.
        """
        if samples is not None:
            x, stats = samples.detach(), {}
        else:
            with torch.no_grad(), no_parameter_grads(self.generator.model):  # nor of the generator's
                x, stats = self.samples(batch, gen)
        loss = x.new_zeros((), dtype=torch.float32)
        if self.dmd_weight:  # the fake score's denoising loss
            sigma = self.draw_sigma(x, gen)
            noise = shard.randn(x.shape, gen).to(x.device)
            weight = torch.ones_like(sigma)
            if batch.get("switch") is None:
                loss = flow_matching_loss(self.fake, x, batch["context"], sigma, weight, noise)
            else:  # each frame denoised under the prompt in force there: two passes, complementary weights
                k, cond = batch["switch"]
                after = torch.arange(x.shape[2], device=x.device) >= k
                total = weight.sum()
                loss = (flow_matching_loss(self.fake, x, batch["context"], sigma, weight * ~after, noise, norm=total)
                        + flow_matching_loss(self.fake, x, cond, sigma, weight * after, noise, norm=total))
        if self.gan is not None:  # the discriminator: real videos of the batch's prompts against x
            d, gan_stats = self.gan.discriminator_term(batch["x0"], batch["context"], x, batch["context"], gen)
            loss = loss + self.gan_weight * d
            stats = {**stats, **gan_stats}
        return loss, stats


@dataclass
class SelfForcingDMD(DMD):
    """`sf_dmd`: samples are the student's own chunk-by-chunk rollouts (Self-Forcing).

    Args:
        per_chunk_exit: draw an exit step per chunk (True) or one for the whole rollout (False, default).
            Drawn from the shared generator (`shard.base`), so every process uses the same ones.
    """

    per_chunk_exit: bool = False
    switch_prob: float = 0.0
    switch_recache: bool = True
    long_frames: int | None = None
    rolling: bool = False

    def window_start(self, clip_chunks: int, gen: torch.Generator) -> int:
        """Long self-rollout tuning: the first chunk of the judged clip-length window, uniform over the rollout of
        `long_frames` (shared generator; nothing drawn without `long_frames`, so other runs keep their streams).
        The rollout stops at the window's end: later frames would not be judged."""
        if not self.long_frames:
            return 0
        last = self.long_frames // self.generator.frames_per_chunk - clip_chunks
        return int(torch.randint(0, last + 1, (), generator=shard.base(gen))) if last > 0 else 0

    def draw_switch(self, batch: dict, num_chunks: int, gen: torch.Generator):
        """LongLive's switch DMD: with probability `switch_prob`, `(K, cond_K)`: the prompt switches at the
        start of a random chunk K (never the first) to another video's prompt of the batch (rolled by one);
        else None. Drawn from the shared generator (every process switches alike); nothing is drawn when
        `switch_prob` is 0, so runs without switches keep their random streams."""
        if not self.switch_prob or num_chunks < 2:
            return None
        g = shard.base(gen)
        on = float(torch.rand((), generator=g)) < self.switch_prob
        chunk = int(torch.randint(1, num_chunks, (), generator=g))
        return (chunk * self.generator.frames_per_chunk, batch["context"].roll(1, 0)) if on else None

    def exit_steps(self, num_chunks: int, gen: torch.Generator) -> torch.Tensor:
        """Exit step indices `[num_chunks]` into the student's levels, uniform over them."""
        k = len(self.sigmas)
        steps = torch.randint(0, k, (num_chunks if self.per_chunk_exit else 1,), generator=shard.base(gen))
        return steps.expand(num_chunks).contiguous()

    def samples(self, batch: dict, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
        cond = batch["context"]
        b, fpc = cond.shape[0], self.generator.frames_per_chunk
        c, frames, h, w = batch["shape"]  # the clip's (C, F, H, W)
        if self.rolling:  # Rolling Forcing: the window rollout, gradients through each chunk's call at its exit level
            exits = self.exit_steps(frames // fpc, gen)
            noise = shard.randn((b, c, frames, h, w), gen).to(cond.device)
            x = rolling_rollout(self.generator, noise, cond, self.sigmas, context_sigma=self.context_sigma,
                                generator=gen, max_context_frames=self.max_context_frames, sink_frames=self.sink_frames,
                                exits=exits.tolist())
            batch["switch"] = None
            return x, {"exit_step": exits.float().mean().item()}
        start = self.window_start(frames // fpc, gen)  # long tuning: the window judged; 0 otherwise
        exits = self.exit_steps(start + frames // fpc, gen)
        noise = shard.randn((b, c, start * fpc + frames, h, w), gen).to(cond.device)
        batch["switch"] = switch = self.draw_switch(batch, frames // fpc, gen)  # the scores read it
        x = few_step_rollout(self.generator, noise, cond, self.sigmas, exits.tolist(), context_sigma=self.context_sigma,
                             generator=gen, max_context_frames=self.max_context_frames, sink_frames=self.sink_frames,
                             switches=[switch] if switch else (), recache=self.switch_recache, grad_from=start)
        stats = {"exit_step": exits[start:].float().mean().item()}
        if self.switch_prob:
            stats["switched"] = float(switch is not None)
        if self.long_frames:
            stats["window_start"] = float(start * fpc)
        return x[:, :, start * fpc:], stats


@dataclass
class DFDMD(DMD):
    """`df_dmd` (CausVid's approximation): clean videos `batch["x0"]` noised per chunk to a random level
    of the student's list, denoised by the student in one block-causal forward (noisy chunks are each
    other's context, unlike at inference where the context is clean)."""

    def samples(self, batch: dict, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
        x0 = batch["x0"]
        b, f, fpc = x0.shape[0], x0.shape[2], self.generator.frames_per_chunk
        k = shard.randint(0, len(self.sigmas), (b, f // fpc), gen).repeat_interleave(fpc, dim=1)
        sigma = self.sigmas[k].to(x0.device)  # [B, F], constant within a chunk
        x_t = add_noise(x0, shard.randn(x0.shape, gen).to(x0.device), sigma)
        return self.generator.predict_x0(x_t, sigma, batch["context"]), {"exit_step": k.float().mean().item()}
