"""Typed configuration: defaults < YAML file < dotlist overrides, validated against dataclasses.

Every key has a type and a default here; OmegaConf's structured configs reject unknown keys and
wrong types, and `load_config` turns those into one-line errors that name the key (and, for a
misspelt key, the closest valid one).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from pipeline.models.kv_cache import CACHE_KINDS, ROPE_MODES

STAGES = ("pretrain_teacher", "init_student", "distill", "evaluate")
EVALUATED = ("teacher", "teacher_few_step", "student_init", "student")  # the models a run produces
BENCHMARKS = ("stream_cost", "forward_flops", "skyreels_stream", "dmd_step_cost")  # evaluate.benchmarks


class ConfigError(ValueError):
    """A config problem, reported as one line."""


@dataclass
class RunConfig:
    dir: str = "runs/tiny"
    seed: int = 0
    stages: List[str] = field(default_factory=lambda: list(STAGES))
    device: str = "auto"  # auto | cpu | cuda
    mixed_precision: str = "auto"  # auto (bf16 where supported) | no | bf16


@dataclass
class DataConfig:
    kind: str = "sprites"  # sprites | latents (encoded videos + prompts) | prompts (prompt embeddings only)
    size: int = 16  # sprites frame size S (16 or 32); latents/prompts: square latent size when latent_size is unset
    frames: int = 12  # training clip length (latent frames)
    frames_per_chunk: int = 3  # the causal unit
    path: Optional[str] = None  # latents/prompts: folder of safetensors shards (prepare_data writes it)
    # The real-scale path (`stages/prepare_data.py`; pipeline/data/sources.py: latent_shape):
    latent_size: Optional[List[int]] = None  # [H, W] of the latents (None = [size, size]); Wan 480x832 -> [60, 104]
    videos: Optional[str] = None  # prepare_data, kind=latents: folder of .mp4/.gif videos, a same-named .txt caption each
    prompts: Optional[str] = None  # prepare_data, kind=prompts: text file, one prompt per line
    pixel_size: Optional[List[int]] = None  # prepare_data: [H, W] videos are resized (short side) and centre-cropped to
    pixel_frames: Optional[int] = None  # prepare_data: frames taken from each video's start (Wan: 81 -> 21 latent)
    num_classes: int = 6
    cond_tokens: int = 4  # prompt-embedding sequence length of the class stand-in
    cond_seed: int = 1234  # seed of the fixed class-embedding table


@dataclass
class ModelConfig:
    """Arguments of diffusers' WanTransformer3DModel (Wan2.1-1.3B: 12 heads × 128, 30 layers)."""

    patch_size: List[int] = field(default_factory=lambda: [1, 4, 4])
    num_attention_heads: int = 4
    attention_head_dim: int = 24
    in_channels: int = 3
    out_channels: int = 3
    text_dim: int = 32
    freq_dim: int = 64
    ffn_dim: int = 384
    num_layers: int = 4
    cross_attn_norm: bool = True
    rope_max_seq_len: int = 1024
    pretrained: Optional[str] = None  # a diffusers folder to start from
    prediction: str = "flow"  # what the network outputs: flow (ε - x0, Wan's) | x0
    # How attention is computed (pipeline/models/attention.py BACKENDS): auto (CPU: dense mask + SDPA; CUDA:
    # FlexAttention block mask for masked calls, SDPA otherwise) | dense | native | flex | flash | cudnn | ...
    attention_backend: str = "auto"


@dataclass
class SamplerConfig:
    kind: str = "autoregressive"  # autoregressive | synchronous
    steps: int = 32
    guidance: float = 2.0
    shift: float = 1.0
    context_sigma: float = 0.0
    clip_x0: float = 0.0  # clamp predicted x0 to ±clip_x0 while sampling (0 = off)
    lag: int = 0  # autoregressive: frame j of a chunk starts j*lag Euler iterations late (0 = synchronous)
    max_context_frames: Optional[int] = None  # rolling KV window in latent frames (None = all finished frames)
    sink_frames: int = 0  # first frames kept when the window rolls
    rope: str = "relative"  # cached frames' RoPE positions: relative (re-indexed in the window) | absolute (SF, LongLive)
    kv_cache: str = "auto"  # static (preallocated, in place) | dynamic (reference) | auto: static on CUDA


@dataclass
class TrainingConfig:
    """What every training stage's section has: length, optimiser (AdamW, constant LR after warm-up),
    EMA, checkpoints, logging."""

    steps: int = 1000
    batch_size: int = 16
    grad_accum: int = 1
    lr: float = 1e-3
    warmup_steps: int = 50
    lr_schedule: str = "constant"  # after warm-up: constant | cosine (decays to 0 at `steps`)
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.99])
    grad_clip: float = 1.0
    ema_decay: float = 0.99
    checkpoint_every: int = 250
    keep_checkpoints: int = 2
    log_every: int = 25
    preview_n: int = 12
    gradient_checkpointing: bool = False  # recompute block activations in the backward pass (memory for time)
    ema_device: str = "same"  # where the EMA copy lives: same (the model's device) | cpu (frees 4 bytes/param on the GPU)


@dataclass
class TeacherConfig(TrainingConfig):
    steps: int = 2000
    batch_size: int = 32
    warmup_steps: int = 100
    label_dropout: float = 0.1
    attention: str = "block_causal"  # block_causal | bidirectional
    trajectory: str = "df"  # df | tf | bid
    per_chunk: bool = False  # df: one level per chunk
    tf_prob: float = 0.0  # df: fraction of teacher-forcing states
    bid_prob: float = 0.0  # df: fraction of synchronous states
    sigma_kind: str = "logit_normal"
    sigma_mean: float = 0.0
    sigma_std: float = 1.0
    sigma_shift: float = 1.0
    sampler: SamplerConfig = field(default_factory=SamplerConfig)


@dataclass
class StudentConfig:
    """The few-step causal student's sampler (shared by init_student, distill, evaluate and sample)."""

    denoising_steps: List[int] = field(default_factory=lambda: [1000, 750, 500, 250])
    shift: float = 5.0  # warps denoising_steps as Self-Forcing does (5: [1000, 937.5, 833.3, 625])
    context_sigma: float = 0.0  # level at which finished chunks are written to the KV cache
    clip_x0: float = 0.0  # clamp x̂0 to ±clip_x0 while sampling (0 = off)
    max_context_frames: Optional[int] = None  # rolling KV window in latent frames (None = all)
    sink_frames: int = 0  # first frames kept when the window rolls
    rope: str = "relative"  # cached frames' RoPE positions: relative (re-indexed in the window) | absolute (SF, LongLive)
    kv_cache: str = "auto"  # inference: static (preallocated, in place) | dynamic (reference) | auto: static on CUDA


@dataclass
class InitStudentConfig(TrainingConfig):
    """CausVid's initialisation: teacher weights, then regression onto the teacher's ODE pairs."""

    teacher: Optional[str] = None  # a teacher stage or diffusers folder (default: <run.dir>/pretrain_teacher)
    ode_pairs: int = 1024  # teacher ODE trajectories to sample
    ode_shard_size: int = 64  # pairs per safetensors shard (a crash loses at most one shard)
    ode_batch_size: Optional[int] = None  # videos the teacher samples at once (None: a whole shard); bounds its KV cache


@dataclass
class DistillConfig(TrainingConfig):
    """DMD distillation (Self-Forcing or CausVid's DF approximation). `steps` counts critic updates; the
    generator updates every `critic_steps_per_generator_step`-th of them. lr/betas/weight_decay/grad_clip/
    warmup_steps/ema_decay are the generator's; the critic has its own lr and clip.
    Self-Forcing's Wan settings: lr 2e-6, critic_lr 4e-7, betas (0, 0.999), weight_decay 0.01, clip 10."""

    method: str = "sf_dmd"  # sf_dmd (rollout on own outputs) | df_dmd (noised clean videos, one forward)
    student: Optional[str] = None  # generator start: a student stage/diffusers folder (default <run.dir>/init_student)
    teacher: Optional[str] = None  # real score, frozen; critic start (default <run.dir>/pretrain_teacher)
    steps: int = 1000
    lr: float = 2e-6
    critic_lr: float = 4e-7
    betas: List[float] = field(default_factory=lambda: [0.0, 0.999])
    weight_decay: float = 0.01
    grad_clip: float = 10.0
    critic_grad_clip: float = 10.0
    warmup_steps: int = 0
    ema_start: int = 0  # generator updates before the EMA starts averaging (it copies the weights until then)
    critic_steps_per_generator_step: int = 5
    critic_samples: str = "fresh"  # fresh: every critic update makes its own samples (Self-Forcing's code) |
    # generator: after a generator update the critic reuses that update's samples, detached (one rollout saved)
    real_guidance: float = 4.0  # x0_real = uncond + w·(cond - uncond); Self-Forcing's "3.0" is w = 4
    fake_guidance: float = 1.0  # the critic: conditional only (1) or guided like the real score
    timestep_sampling: str = "per_frame"  # per_frame (independent σ per frame, seed 002) | uniform (one per video)
    sigma_min: float = 0.02  # DMD / critic levels: U(min, max), shifted, clamped to [min, max]
    sigma_max: float = 0.98
    sigma_shift: float = 5.0
    exit_step: str = "per_rollout"  # sf_dmd: one exit step for all chunks | per_chunk
    clean_source: str = "data"  # df_dmd: data (the training videos) | ode_pairs (init_student's ODE end points)


@dataclass
class EvaluateConfig:
    """The report comparing every model of a run (see `stages/evaluate.py`)."""

    models: List[str] = field(default_factory=lambda: ["teacher", "teacher_few_step", "student_init", "student"])
    extra: Dict[str, str] = field(default_factory=dict)  # more models: name -> stage or diffusers folder
    num_videos: int = 96  # per model, balanced over the classes
    long_factor: int = 4  # long rollouts: long_factor x data.frames
    seed: Optional[int] = None  # noise of every model (default run.seed)
    batch_size: int = 48  # videos per sampling batch (speed is measured at this batch)
    real_videos: int = 1000  # real videos the Fréchet distance compares against
    real_seed: int = 1_000_003  # their stream (training reads run.seed's)
    preview_videos: int = 12
    benchmarks: List[str] = field(default_factory=list)  # scripts of benchmarks/ to run too (see BENCHMARKS)
    # Text runs (data.kind latents / prompts): no sprites metrics; each model's decoded videos are written in
    # VBench's layout, <evaluate>/vbench/<model>/<prompt>-<i>.mp4, for VBench to score (components.vae decodes).
    prompts: Optional[str] = None  # prompt file, one per line (e.g. VBench's prompt suite)
    videos_per_prompt: int = 5  # VBench's standard protocol samples 5 per prompt


@dataclass
class ComponentsConfig:
    """The frozen text encoder and VAE of the real-scale path, from LOCAL folders (never downloaded):
    a diffusers Wan pipeline folder (with `text_encoder/`, `tokenizer/`, `vae/`) or the component folders
    themselves. Used by `prepare_data` (offline encoding) and by sampling text models (`sample --prompts`)."""

    text_encoder: Optional[str] = None  # UMT5EncoderModel folder, or a pipeline folder holding text_encoder/
    tokenizer: Optional[str] = None  # tokenizer folder (None: the pipeline's tokenizer/, or beside text_encoder/)
    vae: Optional[str] = None  # AutoencoderKLWan folder, or a pipeline folder holding vae/
    text_encoder_dtype: str = "bf16"  # fp32 | bf16 | fp16 (Wan's T5 runs in bf16)
    vae_dtype: str = "fp32"  # fp32 | bf16 | fp16 (diffusers' Wan examples keep the VAE in fp32)
    text_encoder_offload: bool = True  # keep the encoder on the CPU, on the device only while encoding a batch
    device: str = "auto"  # auto (cuda if available) | cpu | cuda: where encoding runs
    max_sequence_length: int = 512  # prompt tokens (WanPipeline's default; embeddings past each prompt zeroed)


@dataclass
class PrepareDataConfig:
    """`stages/prepare_data.py`: videos or prompts -> safetensors shards in `data.path`."""

    shard_size: int = 64  # samples per shard (a crash loses at most one shard)
    batch_size: int = 4  # videos / prompts per encoder call
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


def _all_keys(node, prefix="") -> list[str]:
    keys = []
    for k, v in node.items():
        full = f"{prefix}{k}"
        keys.append(full)
        if OmegaConf.is_dict(v):
            keys.extend(_all_keys(v, full + "."))
    return keys


def _one_line(err: OmegaConfBaseException, schema, source: str) -> ConfigError:
    key = getattr(err, "full_key", None) or getattr(err, "key", None) or "?"
    if isinstance(err, ConfigKeyError) or "not in struct" in str(err) or "Key '" in str(err):
        close = difflib.get_close_matches(str(key), _all_keys(schema), n=1, cutoff=0.5)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return ConfigError(f"{source}: unknown config key '{key}'{hint}")
    if isinstance(err, ValidationError):
        msg = str(err).splitlines()[0]
        return ConfigError(f"{source}: wrong type for config key '{key}': {msg}")
    return ConfigError(f"{source}: {str(err).splitlines()[0]} (key '{key}')")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                partial: dict | None = None, partial_source: str = "settings") -> Config:
    """Merge defaults < YAML file < `partial` (a nested dict of some sections, e.g. the sampling
    settings stored beside a converted model) < `key=value` overrides, and validate.

    Raises:
        ConfigError: missing file, unknown key (naming the closest valid key), wrong type, bad value.
    """
    schema = OmegaConf.structured(Config)
    cfg = schema
    if path is not None:
        path = Path(path)
        if not path.is_file():
            where = "" if path.is_absolute() else f" (relative paths resolve where the command runs: {Path.cwd()})"
            raise ConfigError(f"config file not found: {path}{where}")
        try:
            file_cfg = OmegaConf.load(path)
        except Exception as e:  # yaml errors carry multi-line messages
            raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        try:
            cfg = OmegaConf.merge(cfg, file_cfg)
        except OmegaConfBaseException as e:
            raise _one_line(e, schema, str(path)) from None
    if partial:
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.create(partial))
        except OmegaConfBaseException as e:
            raise _one_line(e, schema, partial_source) from None
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key=value")
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as e:
            raise _one_line(e, schema, f"override '{item}'") from None
    conf: Config = OmegaConf.to_object(cfg)
    validate(conf)
    return conf


def validate(cfg: Config) -> None:
    """Checks across keys that types alone cannot express."""
    def need(cond, msg):
        if not cond:
            raise ConfigError(msg)

    if str(cfg.run.mixed_precision) in ("False", "false"):  # YAML 1.1 reads a bare `no` as false
        cfg.run.mixed_precision = "no"
    need(cfg.run.mixed_precision in ("auto", "no", "bf16"),
         f"run.mixed_precision: expected auto, no or bf16, got '{cfg.run.mixed_precision}'")
    for s in cfg.run.stages:
        need(s in STAGES, f"run.stages: unknown stage '{s}' (stages: {', '.join(STAGES)})")
    need(cfg.data.kind in ("sprites", "latents", "prompts"),
         f"data.kind: expected sprites, latents or prompts, got '{cfg.data.kind}'")
    if cfg.data.latent_size is not None:
        need(len(cfg.data.latent_size) == 2 and min(cfg.data.latent_size) > 0,
             f"data.latent_size: expected [H, W] of positive ints, got {cfg.data.latent_size}")
    if cfg.data.pixel_size is not None:
        need(len(cfg.data.pixel_size) == 2 and min(cfg.data.pixel_size) > 0,
             f"data.pixel_size: expected [H, W] of positive ints, got {cfg.data.pixel_size}")
    need(cfg.data.pixel_frames is None or cfg.data.pixel_frames > 0,
         f"data.pixel_frames must be positive, got {cfg.data.pixel_frames}")
    if cfg.data.kind == "prompts":  # prompt embeddings only: nothing to regress or noise
        need(cfg.distill.method != "df_dmd", "distill.method=df_dmd needs videos: data.kind=prompts has none "
                                             "(use data.kind=latents, or distill.method=sf_dmd)")
        need("pretrain_teacher" not in cfg.run.stages, "run.stages: pretrain_teacher needs videos (data.kind=latents); "
                                                       "data.kind=prompts has none")
    for key in ("text_encoder_dtype", "vae_dtype"):
        need(getattr(cfg.components, key) in ("fp32", "bf16", "fp16"),
             f"components.{key}: expected fp32, bf16 or fp16, got '{getattr(cfg.components, key)}'")
    need(cfg.components.device in ("auto", "cpu", "cuda"),
         f"components.device: expected auto, cpu or cuda, got '{cfg.components.device}'")
    need(cfg.components.max_sequence_length > 0, "components.max_sequence_length must be positive")
    need(cfg.prepare_data.shard_size > 0 and cfg.prepare_data.batch_size > 0,
         "prepare_data.shard_size and batch_size must be positive")
    if cfg.data.kind == "sprites":
        need(cfg.data.size in (16, 32), f"data.size: sprites frames are 16 or 32 pixels, got {cfg.data.size}")
    need(cfg.data.frames % cfg.data.frames_per_chunk == 0,
         f"data.frames ({cfg.data.frames}) must be a multiple of data.frames_per_chunk ({cfg.data.frames_per_chunk})")
    need(cfg.model.prediction in ("flow", "x0"), f"model.prediction: expected flow or x0, got '{cfg.model.prediction}'")
    need(len(cfg.model.patch_size) == 3, f"model.patch_size: expected 3 ints, got {cfg.model.patch_size}")
    need(cfg.model.patch_size[0] == 1, "model.patch_size: the temporal patch must be 1 (per-frame causality)")
    from pipeline.models.attention import check_backend  # here: diffusers loads only when a config is validated
    try:
        cfg.model.attention_backend = check_backend(cfg.model.attention_backend)
    except ValueError as e:
        raise ConfigError(f"model.attention_backend: {e}") from None
    for name in ("pretrain_teacher", "init_student", "distill"):
        need(getattr(cfg, name).lr_schedule in ("constant", "cosine"),
             f"{name}.lr_schedule: expected constant or cosine, got '{getattr(cfg, name).lr_schedule}'")
    for name in ("pretrain_teacher", "init_student", "distill"):
        sec = getattr(cfg, name)
        need(sec.lr > 0, f"{name}.lr must be positive, got {sec.lr}")
        need(sec.grad_accum >= 1 and sec.checkpoint_every >= 1 and sec.keep_checkpoints >= 1 and sec.log_every >= 1,
             f"{name}: grad_accum, checkpoint_every, keep_checkpoints and log_every must be >= 1")
        need(sec.warmup_steps >= 0 and sec.grad_clip > 0 and 0 <= sec.ema_decay < 1,
             f"{name}: need warmup_steps >= 0, grad_clip > 0 and 0 <= ema_decay < 1")
        need(sec.ema_device in ("same", "cpu"), f"{name}.ema_device: expected same or cpu, got '{sec.ema_device}'")
    t = cfg.pretrain_teacher
    need(t.attention in ("block_causal", "bidirectional"),
         f"pretrain_teacher.attention: expected block_causal or bidirectional, got '{t.attention}'")
    need(t.trajectory in ("df", "tf", "bid"), f"pretrain_teacher.trajectory: expected df, tf or bid, got '{t.trajectory}'")
    need(t.sampler.kind in ("autoregressive", "synchronous"),
         f"pretrain_teacher.sampler.kind: expected autoregressive or synchronous, got '{t.sampler.kind}'")
    need(t.steps > 0 and t.batch_size > 0, "pretrain_teacher.steps and batch_size must be positive")
    st = cfg.student
    need(len(st.denoising_steps) > 0 and all(0 < a <= 1000 for a in st.denoising_steps)
         and all(a > b for a, b in zip(st.denoising_steps, st.denoising_steps[1:])),
         f"student.denoising_steps: expected decreasing timesteps in (0, 1000], got {st.denoising_steps}")
    need(st.shift > 0, f"student.shift must be positive, got {st.shift}")
    i = cfg.init_student
    need(i.steps > 0 and i.batch_size > 0, "init_student.steps and batch_size must be positive")
    need(i.ode_pairs > 0 and i.ode_shard_size > 0, "init_student.ode_pairs and ode_shard_size must be positive")
    need(i.ode_batch_size is None or i.ode_batch_size > 0,
         f"init_student.ode_batch_size must be positive, got {i.ode_batch_size}")
    d = cfg.distill
    need(d.real_guidance >= 0 and d.fake_guidance >= 0 and t.sampler.guidance >= 0,
         f"guidance must be >= 0: distill.real_guidance {d.real_guidance}, distill.fake_guidance {d.fake_guidance}, "
         f"pretrain_teacher.sampler.guidance {t.sampler.guidance}")
    need(d.critic_lr > 0, f"distill.critic_lr must be positive, got {d.critic_lr}")
    need(d.method in ("sf_dmd", "df_dmd"), f"distill.method: expected sf_dmd or df_dmd, got '{d.method}'")
    need(d.steps > 0 and d.batch_size > 0, "distill.steps and batch_size must be positive")
    need(d.critic_steps_per_generator_step >= 1, "distill.critic_steps_per_generator_step must be >= 1")
    need(d.timestep_sampling in ("per_frame", "uniform"),
         f"distill.timestep_sampling: expected per_frame or uniform, got '{d.timestep_sampling}'")
    need(0 <= d.sigma_min < d.sigma_max <= 1, f"distill: need 0 <= sigma_min < sigma_max <= 1, got {d.sigma_min}, {d.sigma_max}")
    need(d.sigma_shift > 0, f"distill.sigma_shift must be positive, got {d.sigma_shift}")
    need(d.exit_step in ("per_rollout", "per_chunk"), f"distill.exit_step: expected per_rollout or per_chunk, got '{d.exit_step}'")
    need(d.critic_samples in ("fresh", "generator"),
         f"distill.critic_samples: expected fresh or generator, got '{d.critic_samples}'")
    need(d.clean_source in ("data", "ode_pairs"), f"distill.clean_source: expected data or ode_pairs, got '{d.clean_source}'")
    e = cfg.evaluate
    for m in e.models:
        need(m in EVALUATED, f"evaluate.models: unknown model '{m}' (models: {', '.join(EVALUATED)}; "
                             "others go in evaluate.extra)")
    for m in e.extra:
        need(m not in EVALUATED and m != "real" and m.replace("_", "").isalnum(),
             f"evaluate.extra: '{m}' must be a new name of letters, digits and _ (not {', '.join(EVALUATED)}, real)")
    for b in e.benchmarks:
        need(b in BENCHMARKS, f"evaluate.benchmarks: unknown benchmark '{b}' (benchmarks: {', '.join(BENCHMARKS)})")
    need(e.num_videos >= 2 and e.batch_size > 0 and e.real_videos >= 2 and e.long_factor >= 1,
         "evaluate: num_videos and real_videos must be >= 2, batch_size and long_factor >= 1")
    for name, window, sinks in (("pretrain_teacher.sampler", t.sampler.max_context_frames, t.sampler.sink_frames),
                                ("student", st.max_context_frames, st.sink_frames)):
        if window is not None:
            fpc = cfg.data.frames_per_chunk
            need(window % fpc == 0 and sinks % fpc == 0 and window > sinks,
                 f"{name}.max_context_frames ({window}) and sink_frames ({sinks}) must be multiples of "
                 f"data.frames_per_chunk ({fpc}), the window larger than the sinks")
    for name, sec in (("pretrain_teacher.sampler", t.sampler), ("student", st)):
        need(sec.rope in ROPE_MODES, f"{name}.rope: expected {' or '.join(ROPE_MODES)}, got '{sec.rope}'")
        need(sec.kv_cache in CACHE_KINDS, f"{name}.kv_cache: expected {', '.join(CACHE_KINDS)}, got '{sec.kv_cache}'")


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
