"""Typed configuration: defaults < YAML file < dotlist overrides, validated against dataclasses.

Every key has a type and a default here. OmegaConf's structured configs reject unknown keys, wrong types
and, for the keys with a fixed set of choices (`Choice` enums), any other value; `load_config` turns those
into one-line errors that name the key (for a misspelt key, the closest valid one; for a bad choice, the
valid ones). Every numeric key declares its range beside it (`positive`, `at_least`, `in_range`, `random_seed`:
floats must also be finite; lists their length); each section's `check` applies those and the rules
among its own keys, and `validate` holds the only rules that span sections.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import typing
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from pipeline.data.sprites import NUM_CLASSES, SIZES
from pipeline.models.kv_cache import CACHE_KINDS, ROPE_MODES

STAGES = ("pretrain_teacher", "init_student", "distill", "evaluate")
EVALUATED = ("teacher", "teacher_few_step", "student_init", "student")  # the models a run produces
BENCHMARKS = ("stream_cost", "forward_flops", "skyreels_stream", "dmd_step_cost")  # evaluate.benchmarks
# Seeds feed torch generators after offsets and products (ODE pair i: seed * 1_000_003 + i), which must stay
# below 2**64: any 32-bit seed does.
MAX_SEED = 2**32 - 1
# `${repo:configs/shapes/x.json}` in a config: a file shipped with this checkout, found wherever the command
# runs (every other relative path resolves where the user stands).
CHECKOUT = Path(__file__).resolve().parents[1]
OmegaConf.register_resolver("repo", lambda rel: str(CHECKOUT / rel), replace=True)


class ConfigError(ValueError):
    """A config problem, reported as one line; `key` is the config key it is about (None: several)."""

    def __init__(self, msg: str, key: str | None = None):
        super().__init__(msg)
        self.key = key


# ---------------------------------------------------------------------------------------- choices

class Choice(StrEnum):
    """A fixed set of string choices. Each member's name is its value, so a member *is* that string:
    `cfg.data.kind == "sprites"`, dict keys, f-strings, JSON, `repr` and `to_yaml` see the plain string."""

    def __repr__(self) -> str:  # the plain string's (dataclass reprs, used as fingerprints, are unchanged)
        return repr(self.value)

    @classmethod
    def expected(cls) -> str:
        """The choices in words: `a, b or c`."""
        names = list(cls.__members__)
        return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} or {names[-1]}"


def choices(name: str, *values: str) -> type[Choice]:
    """A `Choice` enum whose members are `values` (each named as itself)."""
    return Choice(name, [(v, v) for v in values], module=__name__, qualname=name)


Device = choices("Device", "auto", "cpu", "cuda")
MixedPrecision = choices("MixedPrecision", "auto", "no", "bf16")
DataKind = choices("DataKind", "sprites", "latents", "prompts")
Dtype = choices("Dtype", "fp32", "bf16", "fp16")
Prediction = choices("Prediction", "flow", "x0")
SamplerKind = choices("SamplerKind", "autoregressive", "synchronous")
Rope = choices("Rope", *ROPE_MODES)
KVCacheKind = choices("KVCacheKind", *CACHE_KINDS)
LRSchedule = choices("LRSchedule", "constant", "cosine")
EMADevice = choices("EMADevice", "same", "cpu")
Attention = choices("Attention", "block_causal", "bidirectional")
Trajectory = choices("Trajectory", "df", "tf", "bid")
SigmaKind = choices("SigmaKind", "logit_normal", "uniform")
DistillMethod = choices("DistillMethod", "sf_dmd", "df_dmd", "sf_gan")
Rollout = choices("Rollout", "chunkwise", "rolling")
CriticSamples = choices("CriticSamples", "fresh", "generator")
TimestepSampling = choices("TimestepSampling", "per_frame", "uniform")
ExitStep = choices("ExitStep", "per_rollout", "per_chunk")
CleanSource = choices("CleanSource", "data", "ode_pairs")
Stage = choices("Stage", *STAGES)
Evaluated = choices("Evaluated", *EVALUATED)
Benchmark = choices("Benchmark", *BENCHMARKS)


def choice_list(default: list, noun: str, hint: str = "") -> Any:
    """A list of choices; a bad one reads `KEY: unknown NOUN 'x' (NOUNs: a, b, c[; hint])`."""
    return field(default_factory=lambda: list(default), metadata={"noun": noun, "hint": hint})


# ----------------------------------------------------------------------------------------- ranges

def _num(x) -> str:
    return str(int(x)) if isinstance(x, float) and x.is_integer() else str(x)


@dataclass(frozen=True)
class Range:
    """What a numeric key (or each value of a numeric list) may be: bounds, a divisor, finite for floats;
    for lists a length. `what` words a list's whole expectation; `rule` words a bound that several keys
    share (`{section}` is the key's section), for messages that name them together."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False  # lo < x (else lo <= x)
    hi_open: bool = False  # x < hi (else x <= hi)
    multiple_of: int | None = None
    length: int | None = None  # lists: exactly this many values
    min_length: int = 0  # lists: at least this many
    what: str | None = None
    rule: str | None = None

    def in_bounds(self, x) -> bool:
        return ((self.lo is None or (x > self.lo if self.lo_open else x >= self.lo))
                and (self.hi is None or (x < self.hi if self.hi_open else x <= self.hi)))

    def contains(self, x) -> bool:
        finite = not isinstance(x, float) or math.isfinite(x)
        return finite and self.in_bounds(x) and (self.multiple_of is None or x % self.multiple_of == 0)

    def bounds(self, key: str) -> str:
        """The bounds, said of `key`: `KEY must be positive`, `KEY must be >= 1`, `KEY: need 0 <= leaf < 1`."""
        lo_op, hi_op = ("<" if self.lo_open else "<="), ("<" if self.hi_open else "<=")
        if self.lo is not None and self.hi is not None:
            return f"{key}: need {_num(self.lo)} {lo_op} {key.rpartition('.')[2]} {hi_op} {_num(self.hi)}"
        if self.lo is not None:
            return f"{key} must be positive" if self.lo == 0 and self.lo_open else \
                f"{key} must be {'>' if self.lo_open else '>='} {_num(self.lo)}"
        return f"{key} must be {hi_op} {_num(self.hi)}"

    def problem(self, key: str, x) -> str | None:
        """The one-line message for value `x` of `key`, or None when it is in range."""
        if x is None:  # an Optional key left unset
            return None
        if isinstance(x, (list, tuple)):
            return self._list_problem(key, x)
        if self.contains(x):
            return None
        if isinstance(x, float) and not math.isfinite(x):
            return f"{key} must be a finite number, got {x}"
        if not self.in_bounds(x):
            if self.rule:
                return f"{self.rule.format(section=key.rpartition('.')[0])}, got {key}={x}"
            return f"{self.bounds(key)}, got {x}"
        return f"{key} must be a multiple of {self.multiple_of}, got {x}"

    def _list_problem(self, key: str, xs) -> str | None:
        if (self.length is not None and len(xs) != self.length) or len(xs) < self.min_length:
            n = self.length if self.length is not None else f"at least {self.min_length}"
            return f"{key}: expected {self.what or f'{n} values'}, got {list(xs)}"
        for i, x in enumerate(xs):
            bad = self.problem(f"{key}[{i}]", x)
            if bad:
                return f"{key}: expected {self.what}, got {list(xs)}" if self.what else bad
        return None


def _ranged(default, rng: Range) -> Any:
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"range": rng})
    return field(default=default, metadata={"range": rng})


def positive(default=None, **kw) -> Any:
    """A field > 0 (each value, for a list)."""
    return _ranged(default, Range(lo=0, lo_open=True, **kw))


def at_least(lo, default=None, **kw) -> Any:
    """A field >= lo."""
    return _ranged(default, Range(lo=lo, **kw))


def in_range(lo, hi, default=None, **kw) -> Any:
    """A field in [lo, hi] (`lo_open` / `hi_open` for strict bounds)."""
    return _ranged(default, Range(lo=lo, hi=hi, **kw))


def finite(default=None) -> Any:
    """A float field of any finite value."""
    return _ranged(default, Range())


def random_seed(default=None) -> Any:
    """A random seed: 0 .. MAX_SEED."""
    return _ranged(default, Range(lo=0, hi=MAX_SEED))


def redefault(base: type, name: str, default) -> Any:
    """A subclass's new default for an inherited field, keeping the range declared beside it."""
    return _ranged(default, base.__dataclass_fields__[name].metadata["range"])


class Section:
    """A config section: `check` applies the ranges declared beside its fields and (nested sections)
    theirs; a section with rules among its own keys extends it."""

    def check(self, prefix: str) -> None:
        for f in dataclasses.fields(self):
            value, key = getattr(self, f.name), f"{prefix}.{f.name}"
            if isinstance(value, Section):
                value.check(key)
            elif "range" in f.metadata:
                bad = f.metadata["range"].problem(key, value)
                if bad:
                    raise ConfigError(bad, key)


def need(cond, msg: str, key: str | None = None) -> None:
    if not cond:
        raise ConfigError(msg, key)


# --------------------------------------------------------------------------------------- sections

@dataclass
class RunConfig(Section):
    dir: str = "runs/tiny"
    seed: int = random_seed(0)
    stages: List[Stage] = choice_list(STAGES, "stage")
    device: Device = Device.auto  # auto | cpu | cuda
    mixed_precision: MixedPrecision = MixedPrecision.auto  # auto (bf16 where supported) | no | bf16


@dataclass
class DataConfig(Section):
    kind: DataKind = DataKind.sprites  # sprites | latents (encoded videos + prompts) | prompts (prompt embeddings only)
    size: int = positive(16)  # sprites frame size S (16 or 32); latents/prompts: square latent size if latent_size unset
    frames: int = positive(12)  # training clip length (latent frames)
    frames_per_chunk: int = positive(3)  # the causal unit
    path: Optional[str] = None  # latents/prompts: folder of safetensors shards (prepare_data writes it)
    # The real-scale path (`stages/prepare_data.py`; pipeline/data/sources.py: latent_shape):
    # [H, W] of the latents (None = [size, size]); Wan 480x832 -> [60, 104]
    latent_size: Optional[List[int]] = positive(None, length=2, what="[H, W] of positive ints")
    videos: Optional[str] = None  # prepare_data, kind=latents: folder of .mp4/.gif videos, a same-named .txt caption each
    prompts: Optional[str] = None  # prepare_data, kind=prompts: text file, one prompt per line
    # prepare_data: [H, W] videos are resized (short side) and centre-cropped to
    pixel_size: Optional[List[int]] = positive(None, length=2, what="[H, W] of positive ints")
    pixel_frames: Optional[int] = positive(None)  # prepare_data: frames taken from each video's start (Wan: 81 -> 21 latent)
    num_classes: int = positive(6)
    cond_tokens: int = positive(4)  # prompt-embedding sequence length of the class stand-in
    cond_seed: int = random_seed(1234)  # seed of the fixed class-embedding table

    def check(self, prefix: str) -> None:
        super().check(prefix)
        need(self.frames % self.frames_per_chunk == 0, f"{prefix}.frames ({self.frames}) must be a multiple of "
             f"{prefix}.frames_per_chunk ({self.frames_per_chunk})", f"{prefix}.frames")
        if self.kind == "sprites":
            need(self.size in SIZES, f"{prefix}.size: sprites frames are {' or '.join(map(str, SIZES))} pixels, "
                                     f"got {self.size}", f"{prefix}.size")
            need(self.num_classes == NUM_CLASSES, f"{prefix}.num_classes: the sprites world has {NUM_CLASSES} "
                                                  f"classes, got {self.num_classes}", f"{prefix}.num_classes")

    def frame_size(self) -> tuple[int, int]:
        """`(H, W)` of a training frame in the model's space (pipeline/data/sources.py: latent_shape)."""
        h, w = self.latent_size or (self.size, self.size)
        return h, w


@dataclass
class ModelConfig(Section):
    """Arguments of diffusers' WanTransformer3DModel (Wan2.1-1.3B: 12 heads × 128, 30 layers)."""

    patch_size: List[int] = positive([1, 4, 4], length=3, what="3 positive ints [1, h, w]")
    num_attention_heads: int = positive(4)
    attention_head_dim: int = positive(24, multiple_of=2)  # even: RoPE rotates pairs of channels
    in_channels: int = positive(3)
    out_channels: int = positive(3)
    text_dim: int = positive(32)
    freq_dim: int = positive(64)
    ffn_dim: int = positive(384)
    num_layers: int = positive(4)
    cross_attn_norm: bool = True
    rope_max_seq_len: int = positive(1024)
    pretrained: Optional[str] = None  # a diffusers folder to start from
    prediction: Prediction = Prediction.flow  # what the network outputs: flow (ε - x0, Wan's) | x0
    # How attention is computed (pipeline/models/attention.py BACKENDS): auto (CPU: dense mask + SDPA; CUDA:
    # FlexAttention block mask for masked calls, SDPA otherwise) | dense | native | flex | flash | cudnn | ...
    attention_backend: str = "auto"

    def check(self, prefix: str) -> None:
        super().check(prefix)
        need(self.patch_size[0] == 1, f"{prefix}.patch_size: the temporal patch must be 1 (per-frame causality)",
             f"{prefix}.patch_size")
        need(self.out_channels == self.in_channels,
             f"{prefix}.out_channels ({self.out_channels}) must equal {prefix}.in_channels ({self.in_channels}): "
             "the network predicts the flow of its input", f"{prefix}.out_channels")
        from pipeline.models.attention import check_backend  # here: diffusers loads only when a config is validated
        try:
            self.attention_backend = check_backend(self.attention_backend)
        except ValueError as e:
            raise ConfigError(f"{prefix}.attention_backend: {e}", f"{prefix}.attention_backend") from None


@dataclass
class SamplerConfig(Section):
    kind: SamplerKind = SamplerKind.autoregressive  # autoregressive | synchronous
    steps: int = positive(32)
    guidance: float = at_least(0, 2.0)
    shift: float = positive(1.0)
    context_sigma: float = in_range(0, 1, 0.0)
    clip_x0: float = at_least(0, 0.0)  # clamp predicted x0 to ±clip_x0 while sampling (0 = off)
    lag: int = at_least(0, 0)  # autoregressive: frame j of a chunk starts j*lag Euler iterations late (0 = synchronous)
    max_context_frames: Optional[int] = positive(None)  # rolling KV window in latent frames (None = all finished frames)
    sink_frames: int = at_least(0, 0)  # first frames kept when the window rolls
    rope: Rope = Rope.relative  # cached frames' RoPE positions: relative (re-indexed in the window) | absolute (SF, LongLive)
    kv_cache: KVCacheKind = KVCacheKind.auto  # static (preallocated, in place) | dynamic (reference) | auto: static on CUDA


STEPS_AND_BATCH = "{section}.steps and batch_size must be positive"


@dataclass
class LoraSection(Section):
    """LoRA adapters (peft) on the models a stage trains (`pipeline/models/lora.py`); rank 0: full fine-tuning.
    Checkpoints hold the adapters and their optimizer state; the saved `transformer/`, `transformer_ema/` and
    `critic/` are merged plain weights."""

    rank: int = at_least(0, 0)
    alpha: Optional[float] = positive(None)  # the update's scale is alpha / rank (None: alpha = rank, scale 1)
    # Linear layers to adapt, by name suffix (diffusers' Wan attention projections; add "ffn.net.0.proj",
    # "ffn.net.2" for the feed-forward)
    target_modules: List[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    dropout: float = in_range(0, 1, 0.0, hi_open=True)
    critic: bool = True  # distill: the critic (fake score) gets adapters too, as LongLive's


@dataclass
class TrainingConfig(Section):
    """What every training stage's section has: length, optimiser (AdamW, constant LR after warm-up),
    EMA, checkpoints, logging."""

    steps: int = positive(1000, rule=STEPS_AND_BATCH)
    batch_size: int = positive(16, rule=STEPS_AND_BATCH)
    grad_accum: int = positive(1)
    lr: float = positive(1e-3)
    warmup_steps: int = at_least(0, 50)
    lr_schedule: LRSchedule = LRSchedule.constant  # after warm-up: constant | cosine (decays to 0 at `steps`)
    weight_decay: float = at_least(0, 0.0)
    betas: List[float] = in_range(0, 1, [0.9, 0.99], hi_open=True, length=2, what="[beta1, beta2], each in [0, 1)")
    grad_clip: float = positive(1.0)
    ema_decay: float = in_range(0, 1, 0.99, hi_open=True)
    checkpoint_every: int = positive(250)
    keep_checkpoints: int = positive(2)
    log_every: int = positive(25)
    preview_n: int = at_least(0, 12)
    gradient_checkpointing: bool = False  # recompute block activations in the backward pass (memory for time)
    # where the EMA copy lives: same (the model's device) | cpu (frees 4 bytes/param on the GPU)
    ema_device: EMADevice = EMADevice.same
    lora: LoraSection = field(default_factory=LoraSection)


@dataclass
class TeacherConfig(TrainingConfig):
    steps: int = redefault(TrainingConfig, "steps", 2000)
    batch_size: int = redefault(TrainingConfig, "batch_size", 32)
    warmup_steps: int = redefault(TrainingConfig, "warmup_steps", 100)
    label_dropout: float = in_range(0, 1, 0.1)
    attention: Attention = Attention.block_causal  # block_causal | bidirectional
    trajectory: Trajectory = Trajectory.df  # df | tf | bid
    per_chunk: bool = False  # df: one level per chunk
    tf_prob: float = in_range(0, 1, 0.0)  # df: fraction of teacher-forcing states
    bid_prob: float = in_range(0, 1, 0.0)  # df: fraction of synchronous states
    sigma_kind: SigmaKind = SigmaKind.logit_normal  # logit_normal (σ = sigmoid(N(mean, std²))) | uniform
    sigma_mean: float = finite(0.0)
    sigma_std: float = positive(1.0)
    sigma_shift: float = positive(1.0)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)

    def check(self, prefix: str) -> None:
        super().check(prefix)
        need(self.tf_prob + self.bid_prob <= 1, f"{prefix}: need tf_prob + bid_prob <= 1, got {self.tf_prob} + "
                                                f"{self.bid_prob}", f"{prefix}.bid_prob")


@dataclass
class StudentConfig(Section):
    """The few-step causal student's sampler (shared by init_student, distill, evaluate and sample)."""

    denoising_steps: List[int] = in_range(0, 1000, [1000, 750, 500, 250], lo_open=True, min_length=1,
                                          what="decreasing timesteps in (0, 1000]")
    shift: float = positive(5.0)  # warps denoising_steps as Self-Forcing does (5: [1000, 937.5, 833.3, 625])
    context_sigma: float = in_range(0, 1, 0.0)  # level at which finished chunks are written to the KV cache
    clip_x0: float = at_least(0, 0.0)  # clamp x̂0 to ±clip_x0 while sampling (0 = off)
    max_context_frames: Optional[int] = positive(None)  # rolling KV window in latent frames (None = all)
    sink_frames: int = at_least(0, 0)  # first frames kept when the window rolls
    rope: Rope = Rope.relative  # cached frames' RoPE positions: relative (re-indexed in the window) | absolute (SF, LongLive)
    # inference: static (preallocated, in place) | dynamic (reference) | auto: static on CUDA
    kv_cache: KVCacheKind = KVCacheKind.auto

    def check(self, prefix: str) -> None:
        super().check(prefix)
        st = self.denoising_steps
        need(all(a > b for a, b in zip(st, st[1:])), f"{prefix}.denoising_steps: expected decreasing timesteps in "
                                                      f"(0, 1000], got {st}", f"{prefix}.denoising_steps")


@dataclass
class InitStudentConfig(TrainingConfig):
    """CausVid's initialisation: teacher weights, then regression onto the teacher's ODE pairs."""

    teacher: Optional[str] = None  # a teacher stage or diffusers folder (default: <run.dir>/pretrain_teacher)
    # the teacher's attention where its source does not record it (a stock diffusers Wan folder: bidirectional);
    # a bidirectional teacher makes its ODE pairs synchronously (whole clips), a block_causal one chunk by chunk
    teacher_attention: Optional[Attention] = None
    # a diffusers config.json of the teacher's shape, for a source without one (a `.pt`) and for --dry-run
    # before the weights exist (configs/shapes/); a stage folder's own is used for stage folders
    teacher_config: Optional[str] = None
    ode_pairs: int = positive(1024)  # teacher ODE trajectories to sample
    ode_shard_size: int = positive(64)  # pairs per safetensors shard (a crash loses at most one shard)
    # videos the teacher samples at once (None: a whole shard); bounds its KV cache
    ode_batch_size: Optional[int] = positive(None)


@dataclass
class DistillConfig(TrainingConfig):
    """DMD distillation (Self-Forcing or CausVid's DF approximation). `steps` counts critic updates; the
    generator updates every `critic_steps_per_generator_step`-th of them. lr/betas/weight_decay/grad_clip/
    warmup_steps/ema_decay are the generator's; the critic has its own lr and clip.
    Self-Forcing's Wan settings: lr 2e-6, critic_lr 4e-7, betas (0, 0.999), weight_decay 0.01, clip 10."""

    # sf_dmd (rollout on own outputs) | df_dmd (noised clean videos, one forward) | sf_gan (rollouts, GAN only)
    method: DistillMethod = DistillMethod.sf_dmd
    student: Optional[str] = None  # generator start: a student stage/diffusers folder (default <run.dir>/init_student)
    teacher: Optional[str] = None  # real score, frozen; critic start (default <run.dir>/pretrain_teacher)
    teacher_attention: Optional[Attention] = None  # the real score's, where its source does not record it
    critic: Optional[str] = None  # the fake score's start, any source (default: the teacher); may be smaller
    critic_attention: Optional[Attention] = None  # the fake score's, where its source does not record it
    # `*_config`: a diffusers config.json of that model's shape, for a source without one (a `.pt`) and for
    # --dry-run before the weights exist (configs/shapes/); a stage folder's own is used for stage folders
    student_config: Optional[str] = None
    teacher_config: Optional[str] = None
    critic_config: Optional[str] = None
    # the frozen real score lives on the CPU, each layer moved to the device for its call (accelerate's
    # cpu_offload): its weights leave the GPU's memory for PCIe traffic. (Sharded: a ZeRO-3 --accelerate-config.)
    teacher_offload: bool = False
    steps: int = redefault(TrainingConfig, "steps", 1000)
    lr: float = redefault(TrainingConfig, "lr", 2e-6)
    critic_lr: float = positive(4e-7)
    betas: List[float] = redefault(TrainingConfig, "betas", [0.0, 0.999])
    weight_decay: float = redefault(TrainingConfig, "weight_decay", 0.01)
    grad_clip: float = redefault(TrainingConfig, "grad_clip", 10.0)
    critic_grad_clip: float = positive(10.0)
    warmup_steps: int = redefault(TrainingConfig, "warmup_steps", 0)
    ema_start: int = at_least(0, 0)  # generator updates before the EMA starts averaging (it copies the weights until then)
    critic_steps_per_generator_step: int = positive(5)
    # fresh: every critic update makes its own samples (Self-Forcing's code) |
    # generator: after a generator update the critic reuses that update's samples, detached (one rollout saved)
    critic_samples: CriticSamples = CriticSamples.fresh
    real_guidance: float = at_least(0, 4.0)  # x0_real = uncond + w·(cond - uncond); Self-Forcing's "3.0" is w = 4
    fake_guidance: float = at_least(0, 1.0)  # the critic: conditional only (1) or guided like the real score
    # per_frame (independent σ per frame, seed 002) | uniform (one per video)
    timestep_sampling: TimestepSampling = TimestepSampling.per_frame
    sigma_min: float = in_range(0, 1, 0.02)  # DMD / critic levels: U(min, max), shifted, clamped to [min, max]
    sigma_max: float = in_range(0, 1, 0.98)
    sigma_shift: float = positive(5.0)
    exit_step: ExitStep = ExitStep.per_rollout  # sf_dmd: one exit step for all chunks | per_chunk
    # df_dmd: data (the training videos) | ode_pairs (init_student's ODE end points)
    clean_source: CleanSource = CleanSource.data
    # The GAN (pipeline/methods/gan.py): sf_gan trains by it alone; on sf_dmd / df_dmd, gan_weight > 0 adds DMD2's
    # GAN term to the generator's loss and the critic's (the fake score doubles as the discriminator's features).
    gan_weight: float = at_least(0, 0.0)
    disc_lr: Optional[float] = positive(None)  # the discriminator head's learning rate (None: critic_lr)
    disc_layer: Optional[int] = at_least(0, None)  # the block whose output the head reads (None: the middle one)
    disc_hidden: int = positive(256)  # the head's MLP width
    r1_weight: float = at_least(0, 0.0)  # γ of the R1 penalty γ/2·E‖∇D(real)‖² (0: none)
    # R1 by a finite difference at this input perturbation, E[(ΣD(x+σε) − ΣD(x))²]/σ² (APT's approximation): one
    # more discriminator pass instead of a double backward, so any attention kernel, gradient checkpointing and
    # ZeRO-3 work, and its memory is that of a pass (in bf16 the difference must stand above the logits' rounding:
    # on the tiny discriminator σ = 1e-2 read 3.1x the exact penalty, 1e-1 1.00x; README "The GAN row").
    # None: the exact gradient (SDPA's math kernel, every block's attention scores kept: ~3 TB on the Wan recipe)
    r1_sigma: Optional[float] = positive(None)
    # the first steps train the critic (and discriminator) alone: a generator following an untrained discriminator's
    # gradients drifts (Adam scales even noise to full steps); sf_gan on sprites fell from 0.96 to 0.38 valid frames
    critic_warmup: int = at_least(0, 0)
    # sf_dmd: LongLive's switch DMD: this fraction of rollouts switch prompt at a random chunk (to another video's
    # prompt of the batch); the scores judge every frame under the prompt in force there
    switch_prob: float = in_range(0, 1, 0.0)
    switch_recache: bool = True  # rebuild the rollout's KV window under the new prompt at the switch (as LongLive)
    # sf_dmd / sf_gan: long self-rollout tuning (LongLive, Self-Forcing++): the student rolls out this many frames
    # (its KV window and sinks), the scores judge a clip-length window at a random chunk of it; gradients only
    # through that window's exit steps (None: rollouts of data.frames)
    long_frames: Optional[int] = positive(None)
    # sf_dmd / sf_gan rollouts: chunkwise (Self-Forcing: chunk by chunk, a random exit step each) | rolling (Rolling
    # Forcing: the rolling window of `sampling.rolling_rollout`, gradients through each chunk's call at its random
    # exit level, drawn as exit_step says)
    rollout: Rollout = Rollout.chunkwise

    def check(self, prefix: str) -> None:
        super().check(prefix)
        need(not self.switch_prob or (self.method == "sf_dmd" and not self.gan_weight),
             f"{prefix}.switch_prob: prompt switches train sf_dmd without a GAN term (method {self.method}, "
             f"gan_weight {self.gan_weight})", f"{prefix}.switch_prob")
        need(self.sigma_min < self.sigma_max, f"{prefix}: need 0 <= sigma_min < sigma_max <= 1, got {self.sigma_min}, "
                                              f"{self.sigma_max}", f"{prefix}.sigma_min")


VIDEOS = "{section}: num_videos and real_videos must be >= 2"  # the Fréchet distance needs two videos a side


@dataclass
class EvaluateConfig(Section):
    """The report comparing every model of a run (see `stages/evaluate.py`)."""

    models: List[Evaluated] = choice_list(EVALUATED, "model", "others go in evaluate.extra")
    extra: Dict[str, str] = field(default_factory=dict)  # more models: name -> stage or diffusers folder
    num_videos: int = at_least(2, 96, rule=VIDEOS)  # per model, balanced over the classes
    long_factor: int = positive(4)  # long rollouts: long_factor x data.frames
    seed: Optional[int] = random_seed(None)  # noise of every model (default run.seed)
    batch_size: int = positive(48)  # videos per sampling batch (speed is measured at this batch)
    real_videos: int = at_least(2, 1000, rule=VIDEOS)  # real videos the Fréchet distance compares against
    real_seed: int = random_seed(1_000_003)  # their stream (training reads run.seed's)
    preview_videos: int = at_least(0, 12)
    benchmarks: List[Benchmark] = choice_list([], "benchmark")  # scripts of benchmarks/ to run too (see BENCHMARKS)
    # prompt switching (SPRITES.md "Switched videos"): each causal model also rolls out the long videos with every
    # class c becoming (c + 1) mod 6 at this frame, the cache kept and re-cached; the report scores the switch
    switch_at: Optional[int] = at_least(1, None)
    # Text runs (data.kind latents / prompts): no sprites metrics; each model's decoded videos are written in
    # VBench's layout, <evaluate>/vbench/<model>/<prompt>-<i>.mp4, for VBench to score (components.vae decodes).
    prompts: Optional[str] = None  # prompt file, one per line (e.g. VBench's prompt suite)
    videos_per_prompt: int = positive(5)  # VBench's standard protocol samples 5 per prompt

    def check(self, prefix: str) -> None:
        super().check(prefix)
        for m in self.extra:
            need(m not in EVALUATED and m != "real" and m.replace("_", "").isalnum(),
                 f"{prefix}.extra: '{m}' must be a new name of letters, digits and _ (not {', '.join(EVALUATED)}, "
                 "real)", f"{prefix}.extra")


@dataclass
class ComponentsConfig(Section):
    """The frozen text encoder and VAE of the real-scale path, from LOCAL folders (never downloaded):
    a diffusers Wan pipeline folder (with `text_encoder/`, `tokenizer/`, `vae/`) or the component folders
    themselves. Used by `prepare_data` (offline encoding) and by sampling text models (`sample --prompts`)."""

    text_encoder: Optional[str] = None  # UMT5EncoderModel folder, or a pipeline folder holding text_encoder/
    tokenizer: Optional[str] = None  # tokenizer folder (None: the pipeline's tokenizer/, or beside text_encoder/)
    vae: Optional[str] = None  # AutoencoderKLWan folder, or a pipeline folder holding vae/
    text_encoder_dtype: Dtype = Dtype.bf16  # fp32 | bf16 | fp16 (Wan's T5 runs in bf16)
    vae_dtype: Dtype = Dtype.fp32  # fp32 | bf16 | fp16 (diffusers' Wan examples keep the VAE in fp32)
    text_encoder_offload: bool = True  # keep the encoder on the CPU, on the device only while encoding a batch
    device: Device = Device.auto  # auto (cuda if available) | cpu | cuda: where encoding runs
    max_sequence_length: int = positive(512)  # prompt tokens (WanPipeline's default; embeddings past each prompt zeroed)


@dataclass
class PrepareDataConfig(Section):
    """`stages/prepare_data.py`: videos or prompts -> safetensors shards in `data.path`."""

    shard_size: int = positive(64)  # samples per shard (a crash loses at most one shard)
    batch_size: int = positive(4)  # videos / prompts per encoder call
    cache_dir: Optional[str] = None  # prompt-embedding cache (None: <data.path>/.cache)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    components: ComponentsConfig = field(default_factory=ComponentsConfig)
    prepare_data: PrepareDataConfig = field(default_factory=PrepareDataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    pretrain_teacher: TeacherConfig = field(default_factory=TeacherConfig)
    init_student: InitStudentConfig = field(default_factory=InitStudentConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)


def validate(cfg: Config) -> None:
    """Every section's own checks, then the rules across sections (the only ones kept here)."""
    for f in dataclasses.fields(cfg):
        getattr(cfg, f.name).check(f.name)
    if cfg.data.kind == "prompts":  # prompt embeddings only: nothing to regress or noise
        need(cfg.distill.method != "df_dmd", "distill.method=df_dmd needs videos: data.kind=prompts has none "
                                             "(use data.kind=latents, or distill.method=sf_dmd)", "distill.method")
        need("pretrain_teacher" not in cfg.run.stages, "run.stages: pretrain_teacher needs videos (data.kind=latents); "
                                                       "data.kind=prompts has none", "run.stages")
    if cfg.data.kind == "prompts" and (cfg.distill.method == "sf_gan" or cfg.distill.gan_weight > 0):
        key = "distill.method" if cfg.distill.method == "sf_gan" else "distill.gan_weight"
        need(False, f"{key}: the GAN's discriminator needs real videos: data.kind=prompts has none "
                    "(use data.kind=latents or sprites)", key)
    if cfg.data.kind == "sprites":
        for key in ("in_channels", "out_channels"):
            need(getattr(cfg.model, key) == 3, f"model.{key}: sprites videos have 3 channels (RGB), got "
                                               f"{getattr(cfg.model, key)}", f"model.{key}")
    (h, w), (_, ph, pw) = cfg.data.frame_size(), cfg.model.patch_size
    need(h % ph == 0 and w % pw == 0, f"model.patch_size {cfg.model.patch_size} must divide the {h}x{w} frames "
                                      f"(data.{'latent_size' if cfg.data.latent_size else 'size'})", "model.patch_size")
    fpc = cfg.data.frames_per_chunk
    long_f = cfg.data.frames * cfg.evaluate.long_factor
    need(cfg.evaluate.switch_at is None or cfg.evaluate.switch_at < long_f,
         f"evaluate.switch_at ({cfg.evaluate.switch_at}) must fall inside the long rollouts (data.frames x "
         f"evaluate.long_factor = {long_f} frames)", "evaluate.switch_at")
    need(cfg.distill.rollout == "chunkwise" or (cfg.distill.method != "df_dmd" and not cfg.distill.switch_prob
                                                and cfg.distill.long_frames is None),
         "distill.rollout=rolling: a self-rollout method (sf_dmd, sf_gan) without switch_prob or long_frames",
         "distill.rollout")
    long = cfg.distill.long_frames
    if long is not None:
        need(long % fpc == 0 and long >= cfg.data.frames and cfg.distill.method != "df_dmd"
             and not cfg.distill.switch_prob,
             f"distill.long_frames ({long}) must be a multiple of data.frames_per_chunk ({fpc}), at least data.frames "
             f"({cfg.data.frames}), with a self-rollout method (sf_dmd, sf_gan; got {cfg.distill.method}) and no "
             "switch_prob", "distill.long_frames")
    for name, sec in (("pretrain_teacher.sampler", cfg.pretrain_teacher.sampler), ("student", cfg.student)):
        window, sinks = sec.max_context_frames, sec.sink_frames
        if window is not None:
            need(window % fpc == 0 and sinks % fpc == 0 and window > sinks,
                 f"{name}.max_context_frames ({window}) and sink_frames ({sinks}) must be multiples of "
                 f"data.frames_per_chunk ({fpc}), the window larger than the sinks", f"{name}.max_context_frames")


# ---------------------------------------------------------------------------------------- loading

@functools.cache
def _hints(cls) -> dict:
    return typing.get_type_hints(cls)


def _schema_field(key: str) -> tuple[Any, dataclasses.Field] | None:
    """The type hint and dataclass field of a dotted config key (a list index dropped), or None."""
    cls, hint, found = Config, None, None
    for part in key.split("[")[0].split("."):
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            return None
        found = cls.__dataclass_fields__.get(part)
        if found is None:
            return None
        hint = _hints(cls)[part]
        cls = hint
    return hint, found


def _choice_type(hint) -> tuple[type[Choice] | None, bool]:
    """`(the Choice enum, whether it is a list of them)` of a type hint; `(None, False)` for any other."""
    while typing.get_origin(hint) is typing.Union:  # Optional[X]
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) in (list, List):
        inner = typing.get_args(hint)[0]
        return (inner, True) if isinstance(inner, type) and issubclass(inner, Choice) else (None, False)
    return (hint, False) if isinstance(hint, type) and issubclass(hint, Choice) else (None, False)


def _choice_error(key: str, value) -> ConfigError | None:
    """One line for a value that is not one of a `Choice` key's choices (None: the key has no choices)."""
    found = _schema_field(key.split("[")[0])
    if found is None:
        return None
    enum, is_list = _choice_type(found[0])
    if enum is None or is_list != ("[" in key):  # a list key given a non-list is a type error, said as one
        return None
    base = key.split("[")[0]
    if is_list:
        meta = found[1].metadata
        hint = f"; {meta['hint']}" if meta.get("hint") else ""
        return ConfigError(f"{base}: unknown {meta['noun']} '{value}' ({meta['noun']}s: "
                           f"{', '.join(enum.__members__)}{hint})", base)
    return ConfigError(f"{base}: expected {enum.expected()}, got '{value}'", base)


def _all_keys(node, prefix="") -> list[str]:
    keys = []
    for k, v in node.items():
        full = f"{prefix}{k}"
        keys.append(full)
        if OmegaConf.is_dict(v):
            keys.extend(_all_keys(v, full + "."))
    return keys


def _not_a_mapping(layer, cls=Config, prefix: str = "") -> tuple[str, Any] | None:
    """The first section key of a raw layer given something other than a mapping: `(key, value)`."""
    for name, hint in _hints(cls).items():
        if isinstance(hint, type) and dataclasses.is_dataclass(hint) and OmegaConf.is_dict(layer) and name in layer:
            value = layer[name]
            if value is not None and not OmegaConf.is_dict(value):
                return f"{prefix}{name}", value
            found = _not_a_mapping(value, hint, f"{prefix}{name}.")
            if found:
                return found
    return None


def _one_line(err: OmegaConfBaseException, schema, layer, source: str, from_file: bool) -> ConfigError:
    key = str(getattr(err, "full_key", None) or getattr(err, "key", None) or "")
    if not key and (found := _not_a_mapping(layer)):
        key, value = found
        value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        return ConfigError(f"{source}: config key '{key}' is a section: expected a mapping of its keys, got {value!r}",
                           key)
    key = key or "?"
    if isinstance(err, ConfigKeyError) or "not in struct" in str(err) or "Key '" in str(err):
        close = difflib.get_close_matches(key, _all_keys(schema), n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return ConfigError(f"{source}: unknown config key '{key}'{hint}", key)
    if isinstance(err, ValidationError):
        bad_choice = _choice_error(key, getattr(err, "value", None))
        if bad_choice is not None:
            return ConfigError(f"{source}: {bad_choice}", bad_choice.key) if from_file else bad_choice
        msg = str(err).splitlines()[0]
        return ConfigError(f"{source}: wrong type for config key '{key}': {msg}", key)
    return ConfigError(f"{source}: {str(err).splitlines()[0]} (key '{key}')", key)


@functools.cache
def _yes_no_choices(cls=Config, prefix: str = "") -> tuple:
    """`(key, word for false, word for true)` of every `Choice` key with a member `no` or `yes`."""
    found = []
    for name, hint in _hints(cls).items():
        if isinstance(hint, type) and dataclasses.is_dataclass(hint):
            found += _yes_no_choices(hint, f"{prefix}{name}.")
        elif (enum := _choice_type(hint))[0] is not None and not enum[1]:
            words = enum[0].__members__
            if "no" in words or "yes" in words:
                found.append((f"{prefix}{name}", "no" if "no" in words else None, "yes" if "yes" in words else None))
    return tuple(found)


def _yaml11_choices(layer) -> None:
    """YAML 1.1 reads a bare `no` as false (`mixed_precision: no`): where a `Choice` key has a member `no`
    (or `yes`), a boolean in that key means it. Edits a raw (untyped) layer before it is merged."""
    for key, no, yes in _yes_no_choices():
        *parents, leaf = key.split(".")
        node = layer
        for part in parents:
            node = node[part] if OmegaConf.is_dict(node) and part in node else None
        if OmegaConf.is_dict(node) and leaf in node and isinstance(node[leaf], bool):
            word = yes if node[leaf] else no
            if word is not None:
                node[leaf] = word


def _sets(layer, key: str) -> bool:
    """Whether a raw layer (file, settings, one override) sets `key`."""
    node = layer
    for part in key.split("[")[0].split("."):
        if not OmegaConf.is_dict(node) or part not in node:
            return False
        node = node[part]
    return True


@functools.cache
def _schema(cls, names: tuple) -> Any:
    """The structured schema of `cls` (built once per class and set of sections: merging copies it)."""
    return OmegaConf.structured(cls)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                partial: dict | None = None, partial_source: str = "settings") -> Config:
    """Merge defaults < YAML file < `partial` (a nested dict of some sections, e.g. the sampling
    settings stored beside a converted model) < `key=value` overrides, and validate.

    Raises:
        ConfigError: missing file, unknown key (naming the closest valid key), wrong type, a value that is
            not one of the key's choices or outside its range (naming the file when the value came from one).
    """
    schema = _schema(Config, tuple(Config.__dataclass_fields__))
    cfg = schema
    layers = []  # (source named in value errors, or None for an override; the raw layer)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            where = "" if path.is_absolute() else f" (relative paths resolve where the command runs: {Path.cwd()})"
            raise ConfigError(f"config file not found: {path}{where}")
        try:
            file_cfg = OmegaConf.load(path)
        except Exception as e:  # yaml errors carry multi-line messages
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not OmegaConf.is_dict(file_cfg):
            raise ConfigError(f"{path}: expected a mapping of config sections (run:, data:, model:, ...) at the "
                              f"top level, got a {type(file_cfg).__name__.removesuffix('Config').lower()}")
        layers.append((str(path), file_cfg, str(path)))
    if partial:
        if not isinstance(partial, dict):
            raise ConfigError(f"{partial_source}: expected an object of config sections, got {type(partial).__name__}")
        try:
            layers.append((partial_source, OmegaConf.create(partial), partial_source))
        except OmegaConfBaseException as e:
            raise ConfigError(f"{partial_source}: {str(e).splitlines()[0]}") from None
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        try:
            layers.append((None, OmegaConf.from_dotlist([item]), f"override '{item}'"))
        except OmegaConfBaseException as e:
            raise ConfigError(f"override '{item}': {str(e).splitlines()[0]}") from None
    for _, layer, _ in layers:
        _yaml11_choices(layer)
    try:
        cfg = OmegaConf.merge(cfg, *(layer for _, layer, _ in layers))  # one copy of the schema, not one a layer
    except OmegaConfBaseException:
        for named, layer, source in layers:  # which layer: merged one at a time, the first refused one is said
            try:
                cfg = OmegaConf.merge(cfg, layer)
            except OmegaConfBaseException as e:
                raise _one_line(e, schema, layer, source, from_file=named is not None) from None
    conf: Config = OmegaConf.to_object(cfg)
    try:
        validate(conf)
    except ConfigError as e:
        named = next((n for n, layer, _ in reversed(layers) if e.key and _sets(layer, e.key)), None)
        if named is None:
            raise
        raise ConfigError(f"{named}: {e}", e.key) from None
    return conf


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
