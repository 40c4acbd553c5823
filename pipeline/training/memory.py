"""A per-device memory estimate for `--dry-run`: what each stage holds, under DDP or DeepSpeed ZeRO,
and the tools that measure it (on the CPU: `SavedTensors`, `TensorPeak`; tests/test_checkpointing.py
checks the estimate against them within 25 %).

Model states are counted exactly from the parameter count `P` (bytes per parameter):

| state | bytes | DDP | ZeRO-1 | ZeRO-2 | ZeRO-3 |
| --- | --- | --- | --- | --- | --- |
| fp32 weights (trained) | 4 | 4 | 4 + 4/N | 4 + 4/N | 4/N + 4/N, + the gathered layers |
| fp32 gradients (while the model updates) | 4 | 4 | 4 + bucket | 4/N + bucket | 4/N + bucket (kept) |
| AdamW moments (2 × fp32) | 8 | 8 | 8/N | 8/N | 8/N |
| EMA copy (fp32, generator / teacher; `ema_device: cpu`: 0) | 4 | 4 | 4 | 4 | 4 |
| frozen weights (distill's real score; bf16 runs hold its matmul weights in bf16) | 4 (2 in bf16) | same | 4/N (a ZeRO-3 engine, fp32) | same | same |

A DeepSpeed engine keeps an fp32 master copy of its partition beside the model's weights (the `+ 4/N`), and
while its model updates, the gradient bucket it reduces through (`DEEPSPEED_REDUCE_BUCKET` fp32 elements, 1.86 GiB,
whatever the model's size, or a `deepspeed_config_file`'s `reduce_bucket_size`: `DeepSpeed`) and its gradient partition; under ZeRO-1/2 it frees both at the optimiser step, under
ZeRO-3 it keeps them (so distill holds the generator's and the critic's at once). ZeRO-3 gathers each layer's
weights whole for its forward and backward, prefetching up to `DEEPSPEED_PREFETCH_BUCKET` elements ahead: the
"gathered layers" (the whole model, if smaller). Measured on the CPU with `benchmarks/memory_estimate.py` under
`accelerate launch`, ZeRO-2 and ZeRO-3, 1 and 2 processes.

Gradients live from a model's first backward of an update to its optimiser step (`zero_grad(set_to_none)`),
across the micro-batches of `grad_accum`. Where they stay between updates differs: under DDP (more than one
process) each trained model's gradient buckets are allocated when it is wrapped and kept (the gradients are
views into them, `gradient_as_bucket_view`), and so are ZeRO-3's (above); one process and ZeRO-1/2 keep none, so
distill's generator and critic updates each hold only their own model's gradients.

Activations follow what the code saves for the backward pass, measured on `CausalWanTransformer`
(`SavedTensors`, CPU, fp32 and bf16 autocast; `a` = 4 bytes in fp32, 2 under bf16 autocast):

| term | bytes |
| --- | --- |
| one block, per token (no recomputation) | α·D + β·ffn: fp32 89·D + 8·ffn, bf16 69·D + 4·ffn (many fp32 upcasts in the block) |
| one block, dense block-causal mask (SDPA's additive bias, per video) | Lq·Lk·a, plus the boolean mask Lq·Lk once per pass |
| one block with gradient checkpointing | its input, D·a per token |
| patch embedding and output head, per token | 15·D |
| backward working set | 0.1 block (no recomputation: the peak is at the end of the forward), 1.05 blocks (recomputing one) |
| a gradient-free forward (scores, samplers) | 0.45 block, or if more 0.3 block + one dense mask's bool and bias, or + K, rotated K and V over a KV cache and the call |
| autocast's bf16 copies of the weights of a model that requires grad | 2·P per such model in a bf16 pass |
| ... with gradient checkpointing: only the weights outside the blocks (the blocks cache none) | 2·P_out |
| KV cache | 2 (K, V) × layers × cached tokens × D × a |

FlexAttention (`model.attention_backend` auto on CUDA) saves no mask: the mask terms are dropped.
The coefficients were measured on the CPU (no GPU here); CUDA kernels may save a little differently.

What each stage holds at its peak (the larger of its phases; B videos of T tokens, chunks of c tokens):
- `pretrain_teacher`, `init_student` training: one trained pass over B·T tokens (block-causal: masked).
- `init_student` ODE pairs (before training; the teacher samples in fp32, no autocast; weights only):
  the KV cache over a shard's videos × 2 (guidance), autoregressive sampler, and one gradient-free call.
- `distill` generator update, sf_dmd: every chunk's exit call keeps what it saved until the backward
  (c tokens each, B·T in all) and the K/V of the cached tokens it attended to (chunk k: k·c tokens, a
  window's worth at most; with checkpointing instead the cache segments the recomputations will read:
  every chunk written, once, as `KVCache` snapshots share them); then
  the critic's and the teacher's gradient-free DMD forwards (2·B videos with guidance) run on top,
  with autocast's bf16 copies of the generator's weights (with checkpointing only those outside the blocks;
  not the critic's: it is called with its weights not requiring grad, `no_parameter_grads`, so autocast caches
  no copy of them). df_dmd: one trained pass
  of the generator over B·T tokens instead of the rollout. The update's peak is the larger of its forward (the
  above; no gradients of the generator yet, unless kept between updates or left by an earlier micro-batch) and its
  backward (what is held, the generator's gradients and one recomputed block; the cached casts only without
  checkpointing, where the saved activations keep them).
- `distill` critic update: a gradient-free rollout (its KV cache; no bf16 copy of the generator's weights
  cached), then the critic's trained pass over B·T tokens (the teacher's attention). Generator and critic updates alternate: only one holds
  activations at a time.
- The GAN (`sf_gan`, `gan_weight`): the critic's update also holds the discriminator (the critic's first
  `disc_layer + 1` blocks and the head) over the generated and the real videos (sf_gan: instead of the
  denoising pass); with R1 the real pass runs in SDPA's math kernel and keeps its input gradient's graph
  (`R1_BYTES`: its attention scores, B·heads·T² per block, make it infeasible at Wan scale; `r1_sigma`'s
  finite difference instead runs one more pass over the real videos). The
  generator's update adds the discriminator over its samples with frozen weights (`FROZEN_BLOCK_BYTES`)
  after the scores. sf_gan loads no real score. Measured on the CPU (`benchmarks/memory_estimate.py`, the
  test configuration of tests/test_checkpointing.py, fp32 and bf16, with and without checkpointing, R1 exact or
  by a finite difference): 0.98-1.13 x the measured peak.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass, field

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

GIB = 1024 ** 3
DEEPSPEED_REDUCE_BUCKET = 500_000_000  # DeepSpeed's reduce_bucket_size (elements): its default, allocated whole
DEEPSPEED_PREFETCH_BUCKET = 50_000_000  # ZeRO-3's stage3_prefetch_bucket_size (elements): weights gathered ahead


@dataclass(frozen=True)
class DeepSpeed:
    """What of a DeepSpeed config moves the estimate besides the ZeRO stage.

    Args:
        offload: what it keeps in CPU memory instead of the device (`offload_optimizer` / `offload_param` device
            cpu): "optimizer" (the fp32 master partition, the AdamW moments and the gradient partition; the reduce
            bucket stays), "params" (ZeRO-3's weight partitions; the gathered layers stay). DeepSpeed's documented
            placement, not measured here.
        reduce_bucket: `zero_optimization.reduce_bucket_size` (elements), allocated whole.
    """

    offload: tuple[str, ...] = ()
    reduce_bucket: int = DEEPSPEED_REDUCE_BUCKET
# Bytes saved per token by one block without recomputation: (per D, per ffn), by activation bytes (4: fp32, 2: bf16).
BLOCK_BYTES = {4: (89, 8), 2: (69, 4)}
# ... by a block whose weights are frozen while its input needs gradients (the generator's GAN term): no layer
# inputs kept for weight gradients.
FROZEN_BLOCK_BYTES = {4: (49, 4), 2: (37, 2)}
# R1's real pass (SDPA's math kernel, then the input gradient with create_graph, kept for the loss's backward),
# per block: (per token: per D, per ffn; per attention score: video x head x query x key), by (activation bytes,
# checkpointing): checkpointing saves little, the inner gradient recomputes every block and keeps its graph.
R1_BYTES = {(4, False): (202, 16, 12), (4, True): (150, 12, 12), (2, False): (184, 8, 14), (2, True): (133, 6, 14)}
DISC_HEAD_BYTES = {4: (8, 8), 2: (6, 4)}  # the GAN's head, per token: (per D, per hidden unit)
R1_EXTRA = 2.0  # the working set of R1's inner gradient and of the loss's backward through it, in R1 blocks
HEAD_BYTES_PER_DIM = 15  # patch embedding and output head, per token (measured: 13-15 D)
BACKWARD_EXTRA = 0.1  # what the loss and the first gradients add on top of the saved activations, in blocks
RECOMPUTE = 1.05  # one recomputed block's activations and its gradients (checkpointing), in blocks
NO_GRAD_FORWARD = 0.45  # the live working set of a gradient-free forward, in blocks' worth (feed-forward) ...
NO_GRAD_MASKED = 0.3  # ... or, with a dense mask, in attention: this much and the mask's bool and bias


@dataclass
class MemoryEstimate:
    """Bytes per device, by component, at the stage's peak (`phase`)."""

    weights: float
    gradients: float
    optimizer: float
    ema: float
    frozen: float
    activations: float
    kv_cache: float
    phase: str = field(default="", compare=False)
    models: dict = field(default_factory=dict, compare=False)  # distill: each model's own states, by role

    COMPONENTS = ("weights", "gradients", "optimizer", "ema", "frozen", "activations", "kv_cache")

    @property
    def total(self) -> float:
        return sum(getattr(self, k) for k in self.COMPONENTS)

    def line(self) -> str:
        unit, size = ("GiB", GIB) if self.total >= GIB else ("MiB", 2 ** 20)
        parts = ", ".join(f"{k} {getattr(self, k) / size:.2f}" for k in self.COMPONENTS if getattr(self, k))
        at = f", peak: {self.phase}" if self.phase else ""
        return f"~{self.total / size:.1f} {unit} per device ({parts} {unit}{at})"

    def model_lines(self) -> list[str]:
        """One line per model (distill): its weights, gradients, optimizer and EMA on each device."""
        unit, size = ("GiB", GIB) if self.total >= GIB else ("MiB", 2 ** 20)
        return [f"{role}: {desc}, {b / size:.2f} {unit} of states per device" for role, (desc, b) in self.models.items()]


def size_text(n: float) -> str:
    """Bytes in words, as the estimate's lines give them: `58.9 GiB`, `3.1 MiB`."""
    return f"{n / GIB:.1f} GiB" if n >= GIB else f"{n / 2 ** 20:.1f} MiB"


def params_text(n: int) -> str:
    """A parameter count in words: `14.3B params`, `693k params`."""
    return f"{n / 1e9:.3g}B params" if n >= 1e8 else (f"{n / 1e6:.3g}M params" if n >= 1e6 else f"{n / 1e3:.3g}k params")


def model_states(params: int, trained: int, ema: int, frozen: int, backend: str, zero_stage: int, processes: int,
                 frozen_bytes: float = 4, trained_params: int | None = None,
                 deepspeed: DeepSpeed = DeepSpeed()) -> dict:
    """Bytes per device of weights, gradients, optimizer, EMA and frozen copies.

    Args:
        params: parameters of one model.
        trained, ema, frozen: how many models of that size are trained (with AdamW), EMA-averaged on the
            device, held frozen.
        backend: "DDP" (or single), "DEEPSPEED"; `zero_stage` applies to DeepSpeed.
        frozen_bytes: 4 (fp32) or about 2 (bf16) per frozen weight (a DeepSpeed engine holds fp32).
        trained_params: of a trained model, the parameters that train (LoRA: the adapters; their gradients,
            AdamW state and EMA; its frozen base weights are held as weights); default all.
        deepspeed: the DeepSpeed config's offload and reduce bucket (`DeepSpeed`).
    """
    n = max(processes, 1)
    t = params if trained_params is None else trained_params
    if backend == "DEEPSPEED":
        # measured on the CPU (benchmarks/memory_estimate.py under accelerate launch): each engine keeps an fp32
        # master copy of its partition beside the model's weights, and while its model updates, its fp32
        # gradient bucket (`DEEPSPEED_REDUCE_BUCKET` elements, whatever the model's size) and gradient partition
        # ZeRO-3: the weights are partitioned too, and gathered a few layers at a time for each pass
        whole = 4 / n if zero_stage >= 3 else 4
        gathered = 4 * min(params, DEEPSPEED_PREFETCH_BUCKET) if zero_stage >= 3 else 0
        o = 8 / n if zero_stage >= 1 else 8
        offload = deepspeed.offload
        host_optimizer, host_params = "optimizer" in offload, "params" in offload and zero_stage >= 3
        return dict(weights=trained * (params * whole * (not host_params) + t * 4 / n * (not host_optimizer)
                                       + gathered),
                    gradients=trained * (4 * deepspeed.reduce_bucket
                                         + t * (4 / n if zero_stage >= 2 else 4) * (not host_optimizer)),
                    optimizer=trained * t * o * (not host_optimizer), ema=ema * t * 4, frozen=frozen * params * 4 / n)
    return dict(weights=trained * params * 4, gradients=trained * t * 4, optimizer=trained * t * 8, ema=ema * t * 4,
                frozen=frozen * params * frozen_bytes)


def lora_params(shape: "Shape", rank: int, target_modules) -> int:
    """Adapter parameters of LoRA of `rank` on a Wan transformer of `shape`: rank·(in + out) per adapted Linear;
    per block the attention projections (`to_q`, `to_k`, `to_v`, `to_out.0`, in self- and cross-attention, each
    dim -> dim) and the feed-forward's (`ffn.net.0.proj` dim -> ffn, `ffn.net.2` ffn -> dim). Other targets are not
    counted (the estimate stays a lower bound; peft itself refuses a target the model lacks)."""
    sizes = {"to_q": 2 * 2 * shape.dim, "to_k": 2 * 2 * shape.dim, "to_v": 2 * 2 * shape.dim,
             "to_out.0": 2 * 2 * shape.dim, "ffn.net.0.proj": shape.dim + shape.ffn, "net.0.proj": shape.dim + shape.ffn,
             "ffn.net.2": shape.ffn + shape.dim, "net.2": shape.ffn + shape.dim}
    return shape.layers * rank * sum(sizes.get(m, 0) for m in target_modules)


@dataclass
class Shape:
    """The transformer and the clip, as the estimate needs them.

    Args:
        params, dim, ffn, layers: parameter count, hidden size, feed-forward size, blocks.
        tokens_per_frame, frames, frames_per_chunk: one video's latent tokens per frame, latent frames, chunk.
        heads: attention heads (R1's attention scores).
    """

    params: int
    dim: int
    ffn: int
    layers: int
    tokens_per_frame: int
    frames: int
    frames_per_chunk: int
    heads: int = 1

    @property
    def video(self) -> int:
        return self.tokens_per_frame * self.frames

    @property
    def chunk(self) -> int:
        return self.tokens_per_frame * self.frames_per_chunk

    @property
    def chunks(self) -> int:
        return self.frames // self.frames_per_chunk

    @property
    def outside_blocks(self) -> int:
        """Parameters outside the blocks (embeddings, head), a block taken as its matmul weights: attention
        and cross-attention 8·D², feed-forward 2·D·ffn."""
        return max(0, self.params - self.layers * (8 * self.dim ** 2 + 2 * self.dim * self.ffn))


def block_bytes(tokens: float, shape: Shape, act: int, frozen: bool = False) -> float:
    """Bytes one block saves for the backward pass over `tokens` tokens (no mask, no recomputation; `frozen`:
    its weights need no gradient)."""
    per_dim, per_ffn = (FROZEN_BLOCK_BYTES if frozen else BLOCK_BYTES)[act]
    return tokens * (per_dim * shape.dim + per_ffn * shape.ffn)


def mask_bytes(q_tokens: float, k_tokens: float, act: int, masked: str | None) -> tuple[float, float]:
    """(per block, per pass) bytes of a dense block-causal mask: SDPA's additive bias `[Lq, Lk]` (saved by
    every block) and the boolean mask (one per pass). FlexAttention or no mask: (0, 0)."""
    if masked != "dense":
        return 0.0, 0.0
    return q_tokens * k_tokens * act, q_tokens * k_tokens


def trained_pass(shape: Shape, videos: int, act: int, checkpointing: bool, masked: str | None,
                 blocks: int | None = None, frozen: bool = False) -> tuple[float, float]:
    """A forward with gradients over `videos` whole clips (`masked`: the dense/flex block-causal mask or
    None) through `blocks` blocks (default: all; the GAN's discriminator: up to its layer), `frozen`: its
    weights need none (the generator's GAN term). Returns (bytes held until its backward, the backward's
    extra working set)."""
    t, blocks = shape.video, shape.layers if blocks is None else blocks
    block = block_bytes(videos * t, shape, act, frozen)
    bias, boolean = mask_bytes(t, t, act, masked)
    head = HEAD_BYTES_PER_DIM * shape.dim * videos * t
    if checkpointing:
        return blocks * videos * t * shape.dim * act + head + boolean, RECOMPUTE * (block + bias)
    return blocks * (block + bias) + head + boolean, BACKWARD_EXTRA * (block + bias)


def r1_pass(shape: Shape, videos: int, act: int, checkpointing: bool, blocks: int) -> tuple[float, float]:
    """The GAN's R1 pass over `videos` real clips through `blocks` blocks (`R1_BYTES`: its attention scores,
    `videos · heads · T²` per block, dominate at scale). Returns (held until the loss's backward, extra)."""
    per_dim, per_ffn, per_score = R1_BYTES[act, checkpointing]
    t = shape.video
    block = videos * t * (per_dim * shape.dim + per_ffn * shape.ffn) + per_score * videos * shape.heads * t * t
    return blocks * block + HEAD_BYTES_PER_DIM * shape.dim * videos * t, R1_EXTRA * block


def no_grad_forward(shape: Shape, tokens: float, act: int, q_tokens: float = 0.0, k_tokens: float = 0.0,
                    masked: str | None = None, cached: float = 0.0) -> float:
    """The live working set of a gradient-free forward over `tokens` tokens: in the feed-forward, or in
    attention with its extras, a dense mask (`[q_tokens, k_tokens]` per video) or the keys and values
    over a KV cache of `cached` tokens (all rows; concatenated, the keys also rotated)."""
    bias, boolean = mask_bytes(q_tokens, k_tokens, act, masked)
    block = block_bytes(tokens, shape, act)
    attention = bias + boolean + 3 * (cached + tokens) * shape.dim * act if cached else bias + boolean
    return max(NO_GRAD_FORWARD * block, NO_GRAD_MASKED * block + attention)


def kv_cache_bytes(tokens: float, dim: int, layers: int, bytes_per: int = 2) -> float:
    """K and V of `tokens` cached tokens (all rows together) in every block."""
    return 2 * layers * tokens * dim * bytes_per


def rollout_held(shape: Shape, videos: int, act: int, checkpointing: bool, window_frames: int | None
                 ) -> tuple[float, float, float]:
    """sf_dmd's generator rollout with gradients at every chunk's exit call.

    Returns:
        (bytes held for the backward after the rollout, the KV cache at its end (freed with it), the
        backward's extra working set).
    """
    c, layers, d = shape.chunk, shape.layers, shape.dim
    window = shape.tokens_per_frame * window_frames if window_frames else None
    held = 0.0
    for k in range(shape.chunks):
        cached = k * c if window is None else min(k * c, window)
        head = HEAD_BYTES_PER_DIM * d * videos * c
        if checkpointing:  # the block inputs
            held += layers * videos * c * d * act + head
        else:  # the activations, and K and V over the cached tokens too (concatenated to the chunk's)
            held += layers * (block_bytes(videos * c, shape, act) + 2 * videos * cached * d * act) + head
    cached = (shape.chunks - 1) * c if window is None else min((shape.chunks - 1) * c, window)
    block = block_bytes(videos * c, shape, act)
    extra = RECOMPUTE * block if checkpointing else BACKWARD_EXTRA * block
    if checkpointing:  # the recomputations read the cache segments they saw: every chunk written, once
        # (KVCache segments are shared between snapshots; evicted ones stay alive until the backward)
        return held + kv_cache_bytes(videos * (shape.chunks - 1) * c, d, layers, act), 0.0, extra
    return held, kv_cache_bytes(videos * cached, d, layers, act), extra


def no_grad_rollout(shape: Shape, videos: int, act: int, window_frames: int | None, fused: bool = True
                    ) -> tuple[float, float]:
    """A gradient-free chunk-wise rollout with `videos` rows (the student's few-step rollout, whose calls
    carry the previous chunk too (`fused`), or a teacher's sampler): (its KV cache at the end, the
    working set of its last call)."""
    cached = shape.video - shape.chunk
    if window_frames:
        cached = min(cached, shape.tokens_per_frame * window_frames)
    call = videos * shape.chunk * (2 if fused else 1)
    return (kv_cache_bytes(videos * cached, shape.dim, shape.layers, act),
            no_grad_forward(shape, call, act, cached=videos * cached))


@dataclass
class Run:
    """What a stage runs (from the config; `estimate_config` fills it in).

    Args:
        batch: videos per process and micro-batch.
        checkpointing, bf16: the section's gradient checkpointing; bf16 autocast.
        masked: how masked (block-causal) attention runs: "dense" (SDPA with a boolean mask), "flex", or None.
        attention: the trained full-clip pass's attention (pretrain_teacher: its own; distill: the
            teacher's, for critic and real score).
        ema_cpu: the EMA copy lives on the CPU.
        method, window_frames, real_guidance, fake_guidance: distill's.
        ode_videos, ode_guidance, ode_sampler: init_student's ODE-pair sampling: videos per shard, the
            teacher sampler's guidance and kind.
    """

    batch: int
    checkpointing: bool = False
    bf16: bool = False
    masked: str | None = "dense"
    attention: str = "block_causal"
    ema_cpu: bool = False
    method: str = "sf_dmd"
    window_frames: int | None = None
    real_guidance: float = 4.0
    fake_guidance: float = 1.0
    ode_videos: int = 1
    ode_guidance: float = 1.0
    ode_sampler: str = "autoregressive"
    grad_accum: int = 1  # micro-batches per optimiser step (gradients exist in every forward after the first)
    real_attention: str | None = None  # distill's real score's, when it differs from the critic's (`attention`)
    deepspeed: DeepSpeed = DeepSpeed()  # the DeepSpeed config's offload and bucket for the trained models
    teacher_offload: bool = False  # distill: the real score waits on the CPU, one block at a time on the device
    lora_params: int | None = None  # the trained model's adapters under LoRA (None: it trains whole)
    critic_lora_params: int | None = None  # distill: the critic's
    gan: bool = False  # distill trains a GAN discriminator (`sf_gan`, or `gan_weight` > 0) ...
    disc_blocks: int = 0  # ... reading the critic after this many blocks ...
    disc_head_params: int = 0  # ... through a head of this many parameters ...
    disc_hidden: int = 256  # ... and this MLP width ...
    r1: str | None = None  # ... with R1 on its real inputs: "exact" (a double backward) or "finite difference"


def stage_estimate(stage: str, shape: Shape, run: Run, backend: str = "DDP", zero_stage: int = 2,
                   processes: int = 1, real: Shape | None = None, fake: Shape | None = None,
                   phase: str | None = None) -> MemoryEstimate:
    """Per-device memory of one training stage at its peak phase (see the module docstring), or at the
    phase named `phase` ("training", "ODE pairs", "generator update", "critic update").

    `shape` is the trained model's (distill: the student's); distill's real and fake scores may have
    their own (`real`, `fake`; default: the student's)."""
    act = 2 if run.bf16 else 4
    p, b = shape.params, run.batch
    ema = 0 if run.ema_cpu else 1

    def weight_copies(sh: Shape, trained: int | None) -> float:
        """autocast's cached bf16 copies of a trained model's weights (`trained` of them require grad; None:
        all): with checkpointing only those outside the blocks (a checkpointed block caches no casts,
        `causal_wan.checkpoint_under_forward_kernels`)."""
        trained = sh.params if trained is None else trained
        if not run.bf16:
            return 0.0
        return 2.0 * (min(trained, sh.outside_blocks) if run.checkpointing else trained)

    def masked(attention):  # a whole-clip pass's mask: none when bidirectional or one chunk
        return run.masked if attention == "block_causal" and shape.chunks > 1 else None

    phases = []
    if stage in ("pretrain_teacher", "init_student"):
        states = model_states(p, 1, ema, 0, backend, zero_stage, processes, trained_params=run.lora_params,
                              deepspeed=run.deepspeed)
        attention = run.attention if stage == "pretrain_teacher" else "block_causal"
        held, extra = trained_pass(shape, b, act, run.checkpointing, masked(attention))
        phases.append(("training", states, held + extra + weight_copies(shape, run.lora_params), 0.0))
        if stage == "init_student":  # ODE pairs first: the teacher samples in fp32, weights only
            rows = run.ode_videos * (2 if run.ode_guidance != 1.0 else 1)
            pair_states = dict(weights=4.0 * p, gradients=0.0, optimizer=0.0, ema=0.0, frozen=0.0)
            if run.ode_sampler == "synchronous":
                work = no_grad_forward(shape, rows * shape.video, 4, shape.video, shape.video,
                                       masked(run.attention))
                phases.append(("ODE pairs", pair_states, work, 0.0))
            else:
                kv, work = no_grad_rollout(shape, rows, 4, None, fused=False)
                phases.append(("ODE pairs", pair_states, work, kv))
    elif stage == "distill":  # generator (EMA) + critic trained, real score frozen
        real, fake = real or shape, fake or shape
        frozen_bytes = 2 if run.bf16 else 4
        gen_states = model_states(p, 1, ema, 0, backend, zero_stage, processes, trained_params=run.lora_params,
                                  deepspeed=run.deepspeed)
        critic_states = model_states(fake.params, 1, 0, 0, backend, zero_stage, processes,
                                     trained_params=run.critic_lora_params, deepspeed=run.deepspeed)
        # offloaded: one block's weights on the device at a time (besides the embeddings and head, small)
        gan_only = run.method == "sf_gan"  # no real score: the GAN alone
        real_states = model_states(0 if gan_only else real.params // real.layers if run.teacher_offload else
                                   real.params, 0, 0, 1, "DDP" if run.teacher_offload else backend, zero_stage,
                                   processes, frozen_bytes)
        # the GAN's head: a plain module (no DeepSpeed engine), its gradients averaged as DDP's
        head_states = model_states(run.disc_head_params, 1, 0, 0, "DDP", zero_stage, processes)
        states = {k: gen_states[k] + critic_states[k] + real_states[k] + head_states[k] for k in gen_states}
        # gradients held between updates (see the docstring)
        kept = zero_stage >= 3 if backend == "DEEPSPEED" else processes > 1
        gen_phase = states if kept else {**states, "gradients": gen_states["gradients"]}
        critic_phase = states if kept else {**states, "gradients": critic_states["gradients"]}
        critic_masked = masked(run.attention)
        real_masked = masked(run.real_attention or run.attention)
        real_rows = b * (2 if run.real_guidance != 1.0 else 1)
        fake_rows = b * (2 if run.fake_guidance != 1.0 else 1)
        # the DMD forwards (no gradients), one after the other (the critic's weights do not require grad meanwhile:
        # autocast caches no bf16 copy of them)
        scores = 0.0 if gan_only else max(
            no_grad_forward(real, real_rows * real.video, act, real.video, real.video, real_masked),
            no_grad_forward(fake, fake_rows * fake.video, act, fake.video, fake.video, critic_masked))
        per_dim, per_hidden = DISC_HEAD_BYTES[act]
        # what one discriminator pass's head saves: its backward frees it before the pass's blocks are recomputed
        disc_head = b * fake.video * (per_dim * fake.dim + per_hidden * run.disc_hidden)
        # then the generator's GAN term: the discriminator over its samples, gradients to them only
        disc_held, disc_extra = trained_pass(fake, b, act, run.checkpointing, critic_masked, run.disc_blocks,
                                             frozen=True)
        disc = disc_held + max(disc_extra, disc_head) if run.gan else 0.0
        # The generator update's forward holds no gradients of the generator yet (unless kept between updates, or
        # from an earlier micro-batch) but autocast's cached weight casts; its backward the gradients, and the casts
        # only without checkpointing (the saved activations keep them).
        copies = weight_copies(shape, run.lora_params)
        fresh = not kept and run.grad_accum == 1
        forward_states = {**gen_phase, "gradients": gen_phase["gradients"] - gen_states["gradients"] * fresh}
        if run.method in ("sf_dmd", "sf_gan"):
            held, kv, extra = rollout_held(shape, b, act, run.checkpointing, run.window_frames)
            _, rollout_work = no_grad_rollout(shape, b, act, run.window_frames)
            # the rollout's cache lives during the rollout; the scores and the GAN term come after it
            gen_kv = kv if kv + rollout_work >= max(scores, disc) else 0.0
            forward = (forward_states, held + max(kv + rollout_work, scores, disc) - gen_kv + copies, gen_kv)
            sample_kv, sample_work = no_grad_rollout(shape, b, act, run.window_frames)
        else:  # df_dmd: one trained block-causal pass of the generator
            held, extra = trained_pass(shape, b, act, run.checkpointing, masked("block_causal"))
            forward = (forward_states, held + max(scores, disc) + copies, 0.0)
            sample_kv, sample_work = 0.0, no_grad_forward(shape, b * shape.video, act, shape.video, shape.video,
                                                          masked("block_causal"))
        backward = (gen_phase, held + max(extra, disc) + (0.0 if run.checkpointing else copies), 0.0)
        phases.append(("generator update", *max(forward, backward, key=lambda ph: sum(ph[0].values()) + ph[1] + ph[2])))
        # the critic's denoising pass (none under sf_gan), then the discriminator on the generator's samples
        # and on real videos (R1: in SDPA's math kernel, with its input gradient), all held for one backward
        held, extra = (0.0, 0.0) if gan_only else trained_pass(fake, b, act, run.checkpointing, critic_masked)
        if run.gan:
            fake_held, fake_extra = trained_pass(fake, b, act, run.checkpointing, critic_masked, run.disc_blocks)
            real_held, real_extra = fake_held, fake_extra
            if run.r1 == "exact":
                real_held, real_extra = r1_pass(fake, b, act, run.checkpointing, run.disc_blocks)
            passes = 3 if run.r1 == "finite difference" else 2  # the perturbed real videos: one more pass
            # the backward takes the passes last to first: the earlier passes' heads live through the last one's
            held += (passes - 1) * (fake_held + disc_head) + real_held
            extra = max(extra, fake_extra, real_extra, disc_head)
        # the critic's own bf16 weight copies (its sampling by the generator caches none: `no_parameter_grads`)
        copies = weight_copies(fake, run.critic_lora_params)
        if held + extra >= sample_kv + sample_work:
            phases.append(("critic update", critic_phase, held + extra + copies, 0.0))
        else:
            phases.append(("critic update", critic_phase, sample_work, sample_kv))  # before the critic's pass
        models = {"generator": gen_states, "critic": critic_states, **({} if gan_only else {"real score": real_states}),
                  **({"discriminator head": head_states} if run.gan else {})}
    else:
        raise ValueError(f"no memory estimate for stage '{stage}'")
    if phase is not None:
        named = [ph for ph in phases if ph[0] == phase]
        if not named:
            raise ValueError(f"stage '{stage}' has no phase '{phase}' here (its phases: {[ph[0] for ph in phases]})")
        phases = named
    name, states, activations, kv = max(phases, key=lambda ph: sum(ph[1].values()) + ph[2] + ph[3])
    described = {}
    if stage == "distill":
        where = {"real score": "offloaded to the CPU" if run.teacher_offload else
                 ("ZeRO-3 shard" if backend == "DEEPSPEED" else "on the device")}
        lora = {"generator": run.lora_params, "critic": run.critic_lora_params}
        for role, sh in (("generator", shape), ("critic", fake), ("real score", real)):
            if role not in models:
                continue
            desc = f"{params_text(sh.params)}, {sh.layers} layers x {sh.dim}"
            if lora.get(role):
                desc += f", LoRA: {params_text(lora[role])} trainable"
            described[role] = (desc + (f", {where[role]}" if role in where else ""), sum(models[role].values()))
        if run.gan:
            described["discriminator head"] = (f"{params_text(run.disc_head_params)}, on the critic after block "
                                               f"{run.disc_blocks - 1}" + (f", R1 ({run.r1})" if run.r1 else ""),
                                               sum(head_states.values()))
    return MemoryEstimate(**states, activations=activations, kv_cache=kv, phase=name, models=described)


def estimate(stage: str, params: int, dim: int, layers: int, tokens_per_frame: int, frames: int, batch: int,
             window_frames: int | None, backend: str = "DDP", zero_stage: int = 2, processes: int = 1,
             checkpointing: bool = False, bf16: bool = False, ffn: int | None = None, frames_per_chunk: int = 1,
             **run) -> MemoryEstimate:
    """`stage_estimate` from plain numbers (`ffn` defaults to 4·dim; `run`: further `Run` fields)."""
    shape = Shape(params, dim, ffn or 4 * dim, layers, tokens_per_frame, frames, frames_per_chunk)
    return stage_estimate(stage, shape, Run(batch, checkpointing, bf16, window_frames=window_frames, **run),
                          backend, zero_stage, processes)


def estimate_config(cfg, stage: str, shape: Shape, backend: str = "DDP", zero_stage: int = 2, processes: int = 1,
                    bf16: bool = False, masked: str | None = "dense", teacher_attention: str | None = None,
                    real: Shape | None = None, fake: Shape | None = None, real_attention: str | None = None,
                    deepspeed: DeepSpeed = DeepSpeed(), phase: str | None = None) -> MemoryEstimate:
    """`stage_estimate` of a `Config`'s stage, at its peak phase or at `phase` (`bf16`, `masked`: the run's resolved mixed precision and
    masked-attention method; `teacher_attention`: the loaded teacher's (distill: the fake score's),
    default the config's; distill's `real` / `fake` score shapes and the real score's attention)."""
    section = getattr(cfg, stage)
    tc, st, dc, ic = cfg.pretrain_teacher, cfg.student, cfg.distill, cfg.init_student
    if stage == "init_student":
        teacher_attention = teacher_attention or ic.teacher_attention
    # a bidirectional teacher makes its ODE pairs synchronously (pipeline/methods/ode_regression.py: ode_sampler)
    ode_sampler = "synchronous" if (teacher_attention or tc.attention) == "bidirectional" else tc.sampler.kind
    run = Run(batch=section.batch_size, checkpointing=bool(section.gradient_checkpointing), bf16=bf16, masked=masked,
              attention=teacher_attention or tc.attention, ema_cpu=getattr(section, "ema_device", "same") == "cpu",
              method=dc.method, window_frames=st.max_context_frames, real_guidance=dc.real_guidance,
              fake_guidance=dc.fake_guidance, ode_videos=min(ic.ode_batch_size or ic.ode_shard_size, ic.ode_shard_size,
                                                             ic.ode_pairs),
              ode_guidance=tc.sampler.guidance, ode_sampler=ode_sampler, grad_accum=section.grad_accum,
              real_attention=real_attention,
              teacher_offload=dc.teacher_offload, deepspeed=deepspeed)
    if stage == "distill" and (dc.method == "sf_gan" or dc.gan_weight > 0):  # the GAN's discriminator
        from pipeline.models.discriminator import FrameDiscriminatorHead

        critic = fake or shape
        with torch.device("meta"):
            head = FrameDiscriminatorHead(dim=critic.dim, hidden=dc.disc_hidden)
        layer = critic.layers // 2 if dc.disc_layer is None else dc.disc_layer
        run.gan, run.disc_blocks, run.disc_hidden = True, layer + 1, dc.disc_hidden
        run.r1 = None if not dc.r1_weight else "exact" if dc.r1_sigma is None else "finite difference"
        run.disc_head_params = sum(p.numel() for p in head.parameters())
    lc = section.lora
    if lc.rank:
        run.lora_params = lora_params(shape, lc.rank, lc.target_modules)
        if stage == "distill" and lc.critic:
            run.critic_lora_params = lora_params(fake or shape, lc.rank, lc.target_modules)
    return stage_estimate(stage, shape, run, backend, zero_stage, processes, real=real, fake=fake, phase=phase)


# ---------------------------------------------------------------------------------------------------
# Measuring, on any device (here: the CPU): what the estimate is checked against
# (tests/test_checkpointing.py, benchmarks/memory_estimate.py).

def _storage_key(t: torch.Tensor) -> int:
    return t.untyped_storage()._cdata


class SavedTensors:
    """Bytes saved for the backward pass while active (`torch.autograd.graph.saved_tensors_hooks`): every
    tensor autograd packs, counted once per storage; storages of `exclude` (the weights: model states,
    not activations) are left out. Non-reentrant gradient checkpointing saves its blocks' tensor inputs
    through the same hooks; what the recomputed blocks save is not packed (it is never kept).

    Usage: `with SavedTensors(model.parameters()) as saved: loss = f(...)`, then `saved.bytes`.
    """

    def __init__(self, exclude=()):
        self.exclude = {_storage_key(t) for t in exclude}
        self.sizes: dict = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            key = _storage_key(t)
            if key not in self.exclude:
                self.sizes[key] = t.untyped_storage().nbytes()
        return t

    @property
    def bytes(self) -> int:
        return sum(self.sizes.values())

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        self._hooks.__exit__(*exc)


class TensorPeak(TorchDispatchMode):
    """The peak bytes of live tensors created while active: every op's outputs are tracked by storage
    (views and in-place results count once) until the storage is freed — what a CUDA caching
    allocator reports as `max_memory_allocated` (without its rounding), on any device. Tensors that
    existed before (weights, optimizer moments) are not in it: add them (`tensor_bytes`).

    Usage: `with TensorPeak() as peak: ...`, then `peak.peak` (and `peak.now`: still alive).
    """

    def __init__(self):
        super().__init__()
        self.live: dict = {}
        self.now = self.peak = 0

    def _free(self, key):
        self.now -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                st = t.untyped_storage()
                key, n = st._cdata, st.nbytes()
                old = self.live.get(key)
                if old is None:
                    weakref.finalize(st, self._free, key)
                self.live[key] = n
                self.now += n - (old or 0)
                self.peak = max(self.peak, self.now)
        return out


def tensor_bytes(*groups) -> int:
    """Bytes of the distinct storages among `groups`: iterables of tensors, or optimizers (their state)."""
    seen = {}
    for g in groups:
        if isinstance(g, torch.optim.Optimizer):
            g = [v for st in g.state.values() for v in st.values() if torch.is_tensor(v)]
        for t in g:
            if t is not None and t.device.type != "meta":
                seen[_storage_key(t)] = t.untyped_storage().nbytes()
    return sum(seen.values())


class PhasePeaks:
    """The device peak of each phase of a training stage ("training", "ODE pairs", "generator update", "critic
    update": the `--dry-run` estimate's phases), so a run can say which phase its peak was in and check each phase's
    estimate. On CUDA, `torch.cuda.max_memory_allocated` after `reset_peak_memory_stats` at the phase's start (host-side
    allocator counters: no synchronisation); the peak outside and before the phases is kept here, so `overall` is the
    stage's peak since this object was made (the models and states loaded: everything then allocated counts; an
    earlier stage's transients in the same process do not). Off CUDA nothing is measured (`overall` None), only `current` kept:
    the phase an out-of-memory error is reported in. `allocator`: what has those two counters (default `torch.cuda`
    on CUDA, else none).
    """

    def __init__(self, device, allocator=None):
        self.device = torch.device(device)
        self.allocator = allocator if allocator is not None else torch.cuda if self.device.type == "cuda" else None
        self.peaks: dict[str, int] = {}
        self.current: str | None = None  # the phase running now
        self.failed_in: str | None = None  # the phase an error left
        self._outside = 0
        if self.allocator is not None:  # this stage's peak, not an earlier stage's of the same process
            self.allocator.reset_peak_memory_stats(self.device)

    @contextlib.contextmanager
    def phase(self, name: str):
        if self.current is not None:  # (a phase inside another: counted in the outer one)
            yield
            return
        a = self.allocator
        if a is not None:
            self._outside = max(self._outside, a.max_memory_allocated(self.device))
            a.reset_peak_memory_stats(self.device)
        self.current = name
        try:
            yield
        except BaseException:
            self.failed_in = name
            raise
        finally:
            if a is not None:
                peak = a.max_memory_allocated(self.device)
                self.peaks[name] = max(self.peaks.get(name, 0), peak)
                self._outside = max(self._outside, peak)
                a.reset_peak_memory_stats(self.device)
            self.current = None

    def overall(self) -> int | None:
        """The stage's peak on the device (see the class docstring; None without an allocator's counters: off CUDA)."""
        if self.allocator is None:
            return None
        return max(self._outside, self.allocator.max_memory_allocated(self.device), *self.peaks.values())


def peak_report(stage: str, peak: int, estimate: "MemoryEstimate", phases: dict[str, tuple[int, "MemoryEstimate"]]
                | None = None) -> str:
    """One line: the measured device peak beside the `--dry-run` estimate of the same setting, and each phase's
    (`phases`: name -> (measured peak, that phase's estimate))."""
    gib = 2 ** 30
    at = f"peak: {estimate.phase}; " if estimate.phase else ""
    each = "".join(f"; {name} {p / gib:.2f} GiB, estimate {e.total / gib:.2f} ({e.total / p:.2f})"
                   for name, (p, e) in (phases or {}).items() if p)
    return (f"[{stage}] peak device memory {peak / gib:.2f} GiB (max_memory_allocated, this stage); "
            f"--dry-run estimate {estimate.total / gib:.2f} GiB ({at}estimate / measured {estimate.total / peak:.2f})"
            f"{each}")


class OutOfMemory(Exception):
    """A training stage ran out of device memory: the setting does not fit (`out_of_memory_message` says what
    would)."""


def is_out_of_memory(error: BaseException | None) -> bool:
    """A device allocator's out-of-memory error: torch's `OutOfMemoryError` (CUDA and other accelerators) or the
    CPU allocator's RuntimeError, or an error raised from one (`raise ... from`: torch.compile's wrappers of what
    failed while compiling or autotuning, a compiled FlexAttention kernel's)."""
    for _ in range(16):  # (a cause chain is short; this bounds a cyclic one)
        if error is None:
            return False
        if isinstance(error, torch.OutOfMemoryError) or (
                isinstance(error, RuntimeError) and "DefaultCPUAllocator: can't allocate memory" in str(error)):
            return True
        error = error.__cause__
    return False


TRAINING_PHASES = ("training", "generator update", "critic update")  # a step's own updates (`Method.optimize`)


def out_of_memory_message(*, stage: str, step: int, device, phase: str | None, estimate: "MemoryEstimate",
                          phase_estimate: "MemoryEstimate | None", peak: int | None, remedies: str,
                          resume_step: int) -> str:
    """One line for a stage that ran out of memory in step `step` (1-based: the step being taken) during `phase`
    (None: between the updates: preparing, logging, checkpointing): what the device held (CUDA; `peak`: the
    phase's, or the process's), the `--dry-run` estimate of this setting, the settings that would lower it
    (`plan.remedies_text`), where a rerun resumes."""
    device = torch.device(device)
    where = f"at step {step} ({phase})" if phase in TRAINING_PHASES else \
        f"before step {step}{f' ({phase})' if phase else ''}"
    held = ""
    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        most = f", at most {peak / GIB:.1f}{' in this phase' if phase else ''}" if peak else ""
        held = f": {torch.cuda.memory_allocated(device) / GIB:.1f} GiB allocated{most}, of {total / GIB:.1f} GiB"
    est = f"--dry-run estimates ~{size_text(estimate.total)} per device for this setting (peak: {estimate.phase}"
    if phase_estimate is not None and phase_estimate.phase != estimate.phase:
        est += f"; {phase}: ~{size_text(phase_estimate.total)}"
    lower = f"; lower with {remedies}" if remedies else ""
    resume = f"from its checkpoint of step {resume_step}" if resume_step else "from the start (no checkpoint yet)"
    return f"out of {device.type} memory in the {stage} stage {where}{held}; {est}){lower}; a rerun resumes {resume}"
