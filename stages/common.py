"""What every stage shares: command-line parsing, the accelerator, optimiser/EMA/checkpoint plumbing,
loading models, sampling and previews."""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import sys
import warnings
from pathlib import Path

import torch
from accelerate import Accelerator, DeepSpeedPlugin
from accelerate.utils import DistributedType, InitProcessGroupKwargs, ProjectConfiguration
from diffusers.optimization import get_scheduler
from diffusers.utils import logging as diffusers_logging
from safetensors.torch import save_file

from pipeline.models.causal_wan import CausalWanTransformer
from pipeline.training.checkpoint import CheckpointError, latest_checkpoint, load_training_checkpoint, read_safetensors
from pipeline.config import Config, ConfigError, load_config
from pipeline.io.convert import build_model, read_source, sampling_config
from pipeline.data.sources import class_table
from pipeline.io.guard import GuardError, Lock, replacing
from pipeline.io.media import save_video_grid
from pipeline.diffusion.sampling import Denoiser, few_step_sigmas, generate, generate_few_step
from pipeline.data.shard import ShardedGenerator
from pipeline.io.run_dir import StageDir
from pipeline.data.sprites import NULL_CLASS, balanced_labels


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite."""


# Errors that are the user's to fix: reported as one line and a non-zero exit, never a traceback.
USER_ERRORS = (ConfigError, CheckpointError, OSError, ValueError, NonFiniteLoss)  # OSError: unwritable/full disk


def run_device(cfg: Config) -> torch.device:
    """The device of the run: cuda when one is visible and `run.device` is not `cpu`."""
    return torch.device("cuda" if torch.cuda.is_available() and cfg.run.device != "cpu" else "cpu")


def mixed_precision(cfg: Config) -> str:
    """`run.mixed_precision` with `auto` resolved: bf16 on a GPU that supports it, else no."""
    mp = cfg.run.mixed_precision
    if mp == "auto":
        mp = "bf16" if run_device(cfg).type == "cuda" and torch.cuda.is_bf16_supported() else "no"
    return mp


def make_accelerator(cfg: Config, stage_path: Path, grad_accum: int = 1, batch_size: int = 1,
                     models: dict[str, float | None] | None = None) -> Accelerator:
    """An `Accelerator` logging TensorBoard scalars under `<stage>/logs`; bf16 where supported.

    Under DeepSpeed (an accelerate config with `distributed_type: DEEPSPEED`), every model gets its
    own plugin, as accelerate's multi-model API requires: `models` maps a name to its gradient clip
    (a trained model: the config file's ZeRO stage) or None (frozen: ZeRO-3, weights partitioned, no
    optimizer); select one with `accelerator.state.select_deepspeed_plugin(name)` before preparing it.
    Without a GPU, DeepSpeed runs over gloo. `batch_size` is the per-process micro-batch DeepSpeed asks for.
    """
    cpu = run_device(cfg).type == "cpu"
    mp = mixed_precision(cfg)
    kwargs = {}
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        kwargs["deepspeed_plugins"] = deepspeed_plugins(models or {"model": 1.0}, batch_size, grad_accum)
        if cpu:
            kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
            cpu = False  # DeepSpeed picks its CPU accelerator itself; accelerate's cpu flag would disable it
    return Accelerator(cpu=cpu, mixed_precision=mp, gradient_accumulation_steps=grad_accum, log_with="tensorboard",
                       project_config=ProjectConfiguration(project_dir=str(stage_path), logging_dir=str(stage_path)),
                       **kwargs)


def deepspeed_plugins(models: dict[str, float | None], batch_size: int, grad_accum: int) -> dict:
    """One `DeepSpeedPlugin` per model: trained ones at the ZeRO stage (and offload) of the accelerate
    config (read by accelerate from the environment its launcher sets), frozen ones at ZeRO-3."""
    stage = int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))
    offload = {k: os.environ.get(f"ACCELERATE_DEEPSPEED_{k.upper()}", "none")
               for k in ("offload_optimizer_device", "offload_param_device")}
    plugins = {}
    for name, clip in models.items():
        frozen = clip is None
        plugin = DeepSpeedPlugin(zero_stage=3 if frozen else stage, gradient_accumulation_steps=grad_accum,
                                 gradient_clipping=1.0 if frozen else clip, zero3_init_flag=False,
                                 **({} if frozen else offload))
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = batch_size
        plugins[name] = plugin
    return plugins


def prepare(accelerator: Accelerator, name: str, model, optimizer=None):
    """Wrap one model (and its optimizer) for the run's backend: DDP, or its own DeepSpeed engine
    (`name` selects its plugin, see `make_accelerator`). A frozen model (no optimizer) is not put
    under DDP (`evaluation_mode`); under DeepSpeed it becomes a ZeRO-3 engine holding a shard of it.

    Returns:
        the wrapped model, or (model, optimizer).
    """
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        state = accelerator.state
        active = next(k for k, v in state.deepspeed_plugins.items() if v is state.deepspeed_plugin)
        state.select_deepspeed_plugin(name)
        if optimizer is not None:
            return accelerator.prepare(model, optimizer)
        model = accelerator.prepare(model)
        # Back to the trained models' config: libraries read the active one (diffusers' EMAModel
        # would treat the trained weights as ZeRO-3-partitioned after a ZeRO-3 teacher).
        state.select_deepspeed_plugin(active)
        return model
    if optimizer is None:
        return accelerator.prepare_model(model, evaluation_mode=True)
    return accelerator.prepare(model, optimizer)


def full_optimizer_state(accelerator: Accelerator, model, optimizer) -> dict:
    """The optimizer's state dict in the form a one-process `AdamW` over `model.parameters()` has it,
    whatever the backend, so a checkpoint resumes under any backend and process count.

    Under DeepSpeed the fp32 moments live in ZeRO partitions: they are gathered per parameter with
    DeepSpeed's `safe_get_full_optimizer_state` (a collective: every process must call this).
    """
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return optimizer.state_dict()
    from deepspeed.utils import safe_get_full_optimizer_state

    base = model.optimizer.optimizer  # the engine's ZeRO optimizer wraps ours, now over flat partitions
    params = list(model.module.parameters())
    steps = [st["step"] for st in base.state.values() if "step" in st]
    state = {}
    for i, p in enumerate(params):
        moments = {k: safe_get_full_optimizer_state(p, k) for k in ("exp_avg", "exp_avg_sq")}
        if all(v is not None for v in moments.values()) and steps:
            state[i] = {"step": steps[0].detach().clone().float().cpu(),
                        **{k: v.detach().float().cpu() for k, v in moments.items()}}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in base.param_groups]
    if len(groups) != 1:
        raise ValueError(f"expected one optimizer parameter group under DeepSpeed, found {len(groups)}")
    return {"state": state, "param_groups": [{**groups[0], "params": list(range(len(params)))}]}


def restore_optimizer_state(accelerator: Accelerator, model, state: dict) -> None:
    """After `prepare`: put a one-process optimizer state (loaded from a checkpoint before `prepare`)
    into a DeepSpeed engine's ZeRO partitions (elsewhere `prepare` kept it: nothing to do)."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED or not state.get("state"):
        return
    from deepspeed.utils import safe_set_full_optimizer_state

    base = model.optimizer.optimizer
    for i, p in enumerate(model.module.parameters()):
        for k in ("exp_avg", "exp_avg_sq"):
            safe_set_full_optimizer_state(p, state["state"][i][k].to(p.device), k)
    step = next(iter(state["state"].values()))["step"]
    for st in base.state.values():
        st["step"] = step.clone().to(st["step"].device) if torch.is_tensor(st.get("step")) else step.item()


def check_replicas(accelerator: Accelerator, **models) -> int:
    """Check that every process holds the same weights of each trained model (a silent divergence
    would make rank 0's checkpoint one of several different models).

    Returns:
        the number of processes compared (1: nothing to compare).
    Raises:
        RuntimeError naming the model whose weights differ.
    """
    if accelerator.num_processes == 1:
        return 1
    for name, model in models.items():
        flat = torch.cat([p.detach().double().flatten() for p in accelerator.unwrap_model(model).parameters()])
        position = torch.arange(1, len(flat) + 1, dtype=torch.float64)
        fingerprint = torch.stack([flat.sum(), (flat * position).sum(), flat.abs().max()])[None]
        every = accelerator.gather(fingerprint.to(accelerator.device)).cpu()
        if not (every == every[:1]).all():
            raise RuntimeError(f"{name}: weights differ between processes ({every.tolist()})")
    return accelerator.num_processes


def global_norm(accelerator: Accelerator, weight: torch.Tensor) -> torch.Tensor:
    """A loss denominator over the global batch: the mean over processes of `weight.sum()` (see
    `pipeline.diffusion.losses`: each process's weighted sum divided by it, averaged by DDP, is the global loss)."""
    return accelerator.reduce(weight.sum().detach(), "mean") if accelerator.num_processes > 1 else weight.sum()


def shared_generator(accelerator: Accelerator, seed: int) -> ShardedGenerator:
    """A generator seeded alike on every process, drawing this process's rows of the global batch
    (`pipeline/data/shard.py`: N processes × batch B train as one process with batch N·B)."""
    return ShardedGenerator(torch.Generator().manual_seed(seed), accelerator.process_index,
                            accelerator.num_processes)


def local_batch(source, n: int, gen: ShardedGenerator, device) -> dict:
    """This process's `n` rows of the source's next global batch of `n·processes` (every process
    reads the same stream, so the data position is one number, whatever the process count)."""
    batch = source.next_batch(n * gen.world)
    return {k: gen.rows(v).to(device) for k, v in batch.items()}


def trainable(model: torch.nn.Module, section) -> torch.nn.Module:
    """Put a model to be trained in train mode with gradients, and with gradient checkpointing when the
    section asks for it (every trained full-sequence pass recomputes its blocks in the backward pass:
    the same numbers, only the layer inputs kept). Returns the model."""
    model.train().requires_grad_(True)
    if section.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    return model


def hold_frozen(model: torch.nn.Module, mixed_precision: str) -> torch.nn.Module:
    """A frozen model (evaluation mode, no gradients), its matmul weights held in bf16 when the run
    computes in bf16: those of every Linear and Conv layer outside diffusers' `_keep_in_fp32_modules`
    (norms, modulation tables, time embedding, RoPE stay fp32). Autocast casts exactly those weights
    to bf16 at every call anyway, so the outputs are unchanged and the weights take half the memory.
    With `mixed_precision` no, nothing changes. Returns the model."""
    model.eval().requires_grad_(False)
    if mixed_precision != "bf16":
        return model
    keep = tuple(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, module in model.named_modules():
        if isinstance(module, (torch.nn.Linear, torch.nn.Conv3d)) and not any(k in name.split(".") for k in keep):
            module.to(torch.bfloat16)
    return model


def place_ema(ema, section, device) -> None:
    """Put the EMA copy where `section.ema_device` says: on the trained model's `device` (`same`) or on
    the CPU (`cpu`: 4 bytes per parameter off the accelerator; `ema_step` brings the weights over)."""
    ema.to(torch.device("cpu") if section.ema_device == "cpu" else device)


def ema_step(ema, parameters) -> None:
    """`ema.step(parameters)`, also when the EMA copy lives on another device than the weights
    (`ema_device: cpu`): then the weights are copied to it first, keeping `requires_grad` (which decides
    between averaging and copying); the same arithmetic, on the EMA's device."""
    params = list(parameters)
    if ema.shadow_params and any(p.device != s.device for p, s in zip(params, ema.shadow_params)):
        import contextlib

        gather = contextlib.nullcontext()
        try:  # ZeRO-3 partitions the weights: gather them while copying, as EMAModel.step does
            from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled
            if is_deepspeed_zero3_enabled():
                import deepspeed
                gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        except ImportError:
            pass
        with gather:
            params = [p.detach().to(s.device).requires_grad_(p.requires_grad)
                      for p, s in zip(params, ema.shadow_params)]
    ema.step(params)


def make_optimizer(model: torch.nn.Module, section, lr: float | None = None, total_steps: int | None = None):
    """AdamW and its LR schedule from a training section (lr, betas, weight_decay, warmup_steps,
    lr_schedule); `lr` overrides the section's, `total_steps` (default `section.steps`) is where a
    cosine schedule reaches 0."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=section.lr if lr is None else lr, betas=tuple(section.betas),
                                  weight_decay=section.weight_decay)
    name = {"constant": "constant_with_warmup", "cosine": "cosine"}[section.lr_schedule]
    return optimizer, get_scheduler(name, optimizer, num_warmup_steps=section.warmup_steps,
                                    num_training_steps=total_steps or section.steps)


def resume(ckpt_root: Path, model, ema, optimizer, scheduler, force: bool, accelerator: Accelerator | None = None,
           others: dict | None = None):
    """Restore the newest checkpoint under `ckpt_root` (after `--force`: delete them all instead).

    `scheduler` (None: the caller replays its own) is stepped once per restored step; `others` are
    further `{name: (model, optimizer)}` as in `save_training_checkpoint`. Every process reads the
    same checkpoint (the main process alone deletes, and the others wait for it).

    Returns:
        (step, extra, rng): 0, {}, {} when starting fresh.
    """
    main = accelerator is None or accelerator.is_main_process
    if force and main:  # a rerun from scratch: stale checkpoints must not be resumed from later
        remove_own(ckpt_root, ("step_*", ".tmp_step_*"))
    if accelerator is not None:
        accelerator.wait_for_everyone()
    last = latest_checkpoint(ckpt_root)
    if last is None:
        return 0, {}, {}
    step, extra, rng = load_training_checkpoint(last, model, ema, optimizer, others)
    if scheduler is not None:
        replay_schedule(scheduler, step)
    print(f"resuming from {last.name} (step {step}) in {last.parent}")
    return step, extra, rng


def remove_own(folder: Path, patterns: tuple[str, ...]) -> None:
    """Delete the entries of `folder` matching `patterns`: what a stage itself writes there (checkpoints,
    ODE-pair shards), never anything else a folder may hold."""
    for pattern in patterns:
        for p in Path(folder).glob(pattern):
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)


def replay_schedule(scheduler, steps: int) -> None:
    """Step an LR schedule `steps` times (after a resume)."""
    with warnings.catch_warnings():  # replaying the schedule, not stepping out of order
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(steps):
            scheduler.step()


def optimizer_step(accelerator: Accelerator, model, optimizer, scheduler, loss: torch.Tensor, lr_key: str,
                   grad_clip: float, step: int):
    """One backward pass and (when gradients sync, i.e. at the end of an accumulation) one clipped
    optimiser and LR-schedule step. A NaN/inf loss stops the run with a one-line `NonFiniteLoss`
    naming the config key `lr_key` to lower.

    Returns:
        the gradient norm before clipping, or None between accumulation steps.
    """
    if not torch.isfinite(loss):
        raise NonFiniteLoss(f"loss is {loss.item()} at step {step}; lower {lr_key} or check the data")
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # `accelerator.backward` drives only the first engine prepared; every engine steps itself
        # (clipping at its plugin's gradient_clipping, optimizer step, zero grad), as accelerate's wrapper does.
        model.set_gradient_accumulation_boundary(accelerator.sync_gradients)
        model.backward(loss)
        if not accelerator.sync_gradients:
            return None
        model.step()
        scheduler.step()
        norm = model.get_global_grad_norm()
        return float("nan") if norm is None else float(norm)
    accelerator.backward(loss)
    grad_norm = accelerator.clip_grad_norm_(model.parameters(), grad_clip) if accelerator.sync_gradients else None
    optimizer.step()
    if accelerator.sync_gradients:
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def finished_already(stage, section, force: bool) -> bool:
    """A done stage is skipped unless `--force` or its section now asks for more steps."""
    if not stage.done or force:
        return False
    done_steps = stage.manifest().get("metrics", {}).get("steps", 0)
    if done_steps >= section.steps:
        print(f"[{stage.stage}] done already: {stage.path} (use --force to rerun)")
        return True
    print(f"[{stage.stage}] done at {done_steps} steps; continuing to {section.steps}")
    return False


def save_weights(stage_path: Path, raw: torch.nn.Module, ema, cfg: Config, **model_config) -> dict:
    """Write `transformer/` (raw) and `transformer_ema/` as diffusers folders, plus the class table.

    `model_config` is recorded in each config.json (what the network predicts, a student's sampler),
    so a bare folder still says how to sample from it.
    """
    raw.register_to_config(**model_config)
    save_model(raw, stage_path / "transformer")
    ema.store(raw.parameters())
    ema.copy_to(raw.parameters())
    save_model(raw, stage_path / "transformer_ema")
    if cfg.data.kind == "sprites":
        with replacing(stage_path / "conditioning.safetensors") as tmp:
            save_file({"class_table": class_table(cfg).contiguous()}, str(tmp))
    return {"transformer": str(stage_path / "transformer"), "transformer_ema": str(stage_path / "transformer_ema")}


def save_model(model, folder: Path) -> Path:
    """`model.save_pretrained` into a temporary folder renamed onto `folder` (a stage's own output: an
    earlier copy, e.g. of a killed run, is replaced whole)."""
    with replacing(folder) as tmp:
        model.save_pretrained(tmp)
    return folder


def data_inputs(cfg: Config) -> dict:
    """The data a training stage reads from disk, by config key (sprites are generated: none)."""
    return {"data.path": cfg.data.path} if cfg.data.kind != "sprites" else {}


def component_inputs(cfg: Config) -> dict:
    """The local component folders (text encoder, tokenizer, VAE) a text run reads, by config key."""
    c = cfg.components
    return {"components.text_encoder": c.text_encoder, "components.tokenizer": c.tokenizer, "components.vae": c.vae}


def lock_run_dir(cfg: Config, stages: list[str], command: str) -> Lock:
    """The lock of `run.dir` (`pipeline.io.guard.Lock`), taken: one command at a time per run directory.

    Raises:
        LockedError naming the holder; OSError (one line) when the run directory cannot be written.
    """
    lock = Lock(cfg.run.dir, command)
    try:
        return lock.acquire()
    except GuardError:
        raise
    except OSError as e:
        folder = Path(cfg.run.dir) / (stages[0] if stages else "")
        raise OSError(f"cannot write the stage folder {folder}: {e.strerror or e}") from None


def student_config(cfg: Config) -> dict:
    """What a student's config.json records about its sampler."""
    return {"denoising_steps": list(cfg.student.denoising_steps), "shift": cfg.student.shift}


def load_model(folder: Path) -> CausalWanTransformer:
    """`from_pretrained` without diffusers' warning about the keys we add to config.json (prediction,
    a student's sampler): they are ours, read back through `model.config`."""
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        return CausalWanTransformer.from_pretrained(folder)
    finally:
        diffusers_logging.set_verbosity(level)


def load_source(source: str | Path, raw: bool = False, attention_backend: str | None = None):
    """Model, class table and config of any source `pipeline.io.convert.read_source` reads.

    A stage folder gives its EMA weights (`raw`: the raw ones), class table and config; any other
    source (diffusers folder, safetensors file, `.pt` checkpoint, ...) the default config under the
    sampling settings it carries (`sampling.json`, safetensors metadata, a stage folder's config.json).
    The model attends with `attention_backend` (None: the returned config's `model.attention_backend`).
    """
    model, table, cfg = _load_source(source, raw)
    model.set_attention_backend(attention_backend or cfg.model.attention_backend)
    return model, table, cfg


def _load_source(source: str | Path, raw: bool):
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"model source not found: {path}")
    if (path / "manifest.json").is_file():  # a stage folder
        status = StageDir(path.parent, path.name).manifest().get("status")
        if status != "done" or not (path / "transformer_ema").is_dir():
            raise CheckpointError(f"{path}: the stage has not finished (status '{status}'); run it to the end first")
        cfg = load_config(path / "config.yaml")
        model = load_model(path / ("transformer" if raw else "transformer_ema"))
        table = read_safetensors(path / "conditioning.safetensors")["class_table"] if cfg.data.kind == "sprites" \
            else None
        return model, table, cfg
    weights = read_source(path, ema=not raw)
    model = build_model(weights).float()  # a bf16/fp16 export samples in fp32 (an exact upcast)
    cfg = sampling_config(weights, model.config.text_dim)
    return model, class_table(cfg) if cfg.data.kind == "sprites" else None, cfg


def is_student(model) -> bool:
    return "denoising_steps" in model.config


def sample_student_videos(model, table: torch.Tensor, labels: torch.Tensor, frames: int, size: int,
                          frames_per_chunk: int, student, seed: int, prediction: str = "flow", channels: int = 3,
                          denoising_steps=None, on_chunk=None, batch_size: int = 64,
                          fuse_cache_write: bool = True) -> torch.Tensor:
    """Few-step student samples `[N, F, 3, S, S]` in [-1, 1] for class ids `labels [N]`.

    `student` is the `StudentConfig` (step list, shift, context level, window); `denoising_steps`
    overrides its step list.
    """
    model.eval()
    denoiser = Denoiser(model, "block_causal", frames_per_chunk, prediction, student.clip_x0, rope=student.rope,
                        kv_cache=student.kv_cache)
    sigmas = few_step_sigmas(denoising_steps or student.denoising_steps, student.shift)
    lat = generate_few_step(denoiser, table[labels], (channels, frames, size, size), sigmas, student.context_sigma,
                            seed, batch_size, max_context_frames=student.max_context_frames,
                            sink_frames=student.sink_frames, on_chunk=on_chunk, fuse_cache_write=fuse_cache_write)
    return lat.permute(0, 2, 1, 3, 4).clamp(-1, 1).contiguous()


def sample_videos(model, table: torch.Tensor, labels: torch.Tensor, frames: int, size: int, attention: str,
                  frames_per_chunk: int, sampler, seed: int, prediction: str = "flow", channels: int = 3,
                  on_chunk=None, batch_size: int = 64) -> torch.Tensor:
    """Sample sprites-like videos `[N, F, 3, S, S]` in [-1, 1] for class ids `labels [N]` with a many-step
    `SamplerConfig`."""
    model.eval()
    denoiser = Denoiser(model, attention, frames_per_chunk, prediction, sampler.clip_x0, rope=sampler.rope,
                        kv_cache=sampler.kv_cache)
    cond = table[labels]
    uncond = table[torch.full_like(labels, NULL_CLASS)]
    lat = generate(denoiser, cond, uncond, (channels, frames, size, size), sampler.kind, sampler.steps,
                   sampler.guidance, sampler.shift, sampler.context_sigma, seed, batch_size, lag=sampler.lag,
                   max_context_frames=sampler.max_context_frames, sink_frames=sampler.sink_frames, on_chunk=on_chunk)
    return lat.permute(0, 2, 1, 3, 4).clamp(-1, 1).contiguous()


def preview(cfg: Config, model, path: Path, attention: str = "block_causal", sampler=None, n: int = 12) -> Path:
    """A GIF grid of `n` samples: the many-step `sampler`, or (None) the few-step student sampler."""
    labels = balanced_labels(n)
    if sampler is None:
        videos = sample_student_videos(model, class_table(cfg), labels, cfg.data.frames, cfg.data.size,
                                       cfg.data.frames_per_chunk, cfg.student, cfg.run.seed, cfg.model.prediction)
    else:
        videos = sample_videos(model, class_table(cfg), labels, cfg.data.frames, cfg.data.size, attention,
                               cfg.data.frames_per_chunk, sampler, seed=cfg.run.seed, prediction=cfg.model.prediction)
    return save_video_grid(videos, path)


def parse_with_overrides(ap: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse flags anywhere on the line; every leftover `key=value` joins `args.overrides`."""
    args, rest = ap.parse_known_args(argv)
    bad = [r for r in rest if r.startswith("-")]
    if bad:
        ap.error(f"unrecognized arguments: {' '.join(bad)}")
    args.overrides += rest
    return args


def stage_main(stage: str, run, argv=None) -> int:
    """`python -m stages.<stage> --config CONFIG [--force] [key=value ...]`, holding the lock of `run.dir`."""
    ap = argparse.ArgumentParser(prog=f"python -m stages.{stage}")
    ap.add_argument("--config", required=True)
    ap.add_argument("--force", action="store_true", help="rerun even if the stage is done")
    ap.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parse_with_overrides(ap, argv)
    argv = sys.argv[1:] if argv is None else argv
    lock = None
    try:
        cfg = load_config(args.config, args.overrides)
        if int(os.environ.get("RANK", "0")) == 0:  # under `accelerate launch`: rank 0 holds it for all
            lock = lock_run_dir(cfg, [stage], f"python -m stages.{stage} {shlex.join(argv)}")
        run(cfg, force=args.force)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if lock is not None:
            lock.release()
    return 0
