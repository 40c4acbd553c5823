"""The accelerator and what every process must agree on: devices, precision, DDP / DeepSpeed engines
per model, optimizer state across ZeRO partitions, replica checks, global-batch sharding."""

from __future__ import annotations

import copy
import functools
import json
import os
from pathlib import Path
from types import MethodType

import torch
from accelerate import Accelerator, DeepSpeedPlugin
from accelerate.utils import (DistributedDataParallelKwargs, DistributedType, InitProcessGroupKwargs,
                               ProjectConfiguration, convert_outputs_to_fp32)

from pipeline.config import Config, ConfigError
from pipeline.data.shard import ShardedGenerator
from pipeline.models.device import resolve_device
from pipeline.training.memory import DEEPSPEED_REDUCE_BUCKET, DeepSpeed




def run_device(cfg: Config) -> torch.device:
    """The device of the run: `run.device` under the one device policy (`pipeline/models/device.py`)."""
    return resolve_device(cfg.run.device, "run.device")


def mixed_precision(cfg: Config) -> str:
    """`run.mixed_precision` with `auto` resolved: bf16 on a GPU that supports it, else no."""
    mp = cfg.run.mixed_precision
    if mp == "auto":
        mp = "bf16" if run_device(cfg).type == "cuda" and torch.cuda.is_bf16_supported() else "no"
    return mp


def deepspeed_file(path: str | Path) -> dict:
    """A DeepSpeed JSON config (an accelerate config's `deepspeed_config_file`), checked for what the pipeline
    reads: a `zero_optimization` section. ConfigError (one line naming the file) otherwise."""
    path = Path(path)
    try:
        conf = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"deepspeed_config_file: file not found: {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"deepspeed_config_file {path}: not valid JSON ({e})") from None
    if not isinstance(conf, dict) or not isinstance(conf.get("zero_optimization"), dict):
        raise ConfigError(f"deepspeed_config_file {path}: needs a zero_optimization section")
    if unused := [k for k in ("optimizer", "scheduler") if k in conf]:  # would be ignored silently otherwise
        raise ConfigError(f"deepspeed_config_file {path}: remove its {' and '.join(unused)} section (the run's "
                          "config makes AdamW and its LR schedule: <section>.lr, betas, weight_decay, lr_schedule)")
    return conf


def offloaded(optimizer: str | None, params: str | None) -> tuple[str, ...]:
    """What a DeepSpeed config offloads ("optimizer", "params") from its two offload devices (`none`, None or
    empty: kept on the accelerator), whichever form the config has them in (accelerate YAML, environment, JSON)."""
    return tuple(what for what, device in (("optimizer", optimizer), ("params", params))
                 if str(device or "none").lower() not in ("none", ""))


def zero_settings(conf: dict) -> tuple[int, DeepSpeed]:
    """(ZeRO stage, its offload and reduce bucket) of a DeepSpeed JSON config."""
    zero = conf["zero_optimization"]
    try:
        stage = int(zero.get("stage", 0))
        bucket = zero.get("reduce_bucket_size", "auto")
        bucket = DEEPSPEED_REDUCE_BUCKET if bucket == "auto" else int(float(bucket))
    except (TypeError, ValueError):
        raise ConfigError("deepspeed_config_file: zero_optimization.stage and reduce_bucket_size must be numbers, "
                          f"got {zero.get('stage')!r} and {zero.get('reduce_bucket_size')!r}") from None
    if stage not in (0, 1, 2, 3):
        raise ConfigError(f"deepspeed_config_file: zero_optimization.stage must be 0..3, got {stage}")
    offload = offloaded(*((zero.get(key) or {}).get("device") for key in ("offload_optimizer", "offload_param")))
    return stage, DeepSpeed(offload=offload, reduce_bucket=bucket)


def _launched_file() -> dict | None:
    """The DeepSpeed JSON config the launch names (`ACCELERATE_DEEPSPEED_CONFIG_FILE`), if any; read once (the
    trainer, the accelerator and the estimate each ask), again only if the file changed. Not to be modified."""
    path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE", "none")
    if path in ("none", ""):
        return None
    try:
        stamp = os.stat(path).st_mtime_ns
    except OSError:
        stamp = None  # deepspeed_file names the missing file
    return _read_deepspeed_file(path, stamp)


@functools.lru_cache(maxsize=4)
def _read_deepspeed_file(path: str, stamp: int | None) -> dict:
    return deepspeed_file(path)


def launched_backend() -> tuple[str, int, int]:
    """(backend, ZeRO stage, processes) this process was started with, from the environment `accelerate launch`
    sets (readable before any accelerator exists): DEEPSPEED with its stage (of the accelerate config, or of its
    `deepspeed_config_file`), FSDP, or DDP (a plain process too)."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        file = _launched_file()
        stage = zero_settings(file)[0] if file else int(os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "2"))
        return "DEEPSPEED", stage, processes
    if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
        return "FSDP", 0, processes
    return "DDP", 0, processes


def launched_deepspeed() -> DeepSpeed:
    """The launched DeepSpeed config's CPU offload for the trained models ("optimizer": `offload_optimizer_device`,
    "params": `offload_param_device`) and reduce bucket, from the launch environment (or its config file)."""
    file = _launched_file() if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true" else None
    if file:
        return zero_settings(file)[1]
    return DeepSpeed(offload=offloaded(*(os.environ.get(f"ACCELERATE_DEEPSPEED_OFFLOAD_{k}_DEVICE")
                                         for k in ("OPTIMIZER", "PARAM"))))


def make_accelerator(cfg: Config, stage_path: Path, grad_accum: int = 1, batch_size: int = 1,
                     models: dict[str, float | None] | None = None, *,
                     precision: str | None = None) -> Accelerator:
    """An `Accelerator` logging TensorBoard scalars under `<stage>/logs`; bf16 where supported.

    Under DeepSpeed (an accelerate config with `distributed_type: DEEPSPEED`), every model gets its
    own plugin, as accelerate's multi-model API requires: `models` maps a name to its gradient clip
    (a trained model: the config file's ZeRO stage, see `FullWeights` for ZeRO-3) or None (frozen: ZeRO-3,
    weights partitioned, no optimizer); select one with `accelerator.state.select_deepspeed_plugin(name)` before
    preparing it. Without a GPU, DeepSpeed runs over gloo. `batch_size` is the per-process micro-batch DeepSpeed
    asks for. `precision`: the run's `mixed_precision(cfg)`, if the caller resolved it already.
    """
    cpu = run_device(cfg).type == "cpu"
    mp = precision if precision is not None else mixed_precision(cfg)
    # DDP's gradients are views into its buckets, not a second copy (4 bytes per trained parameter saved)
    kwargs = {"kwargs_handlers": [DistributedDataParallelKwargs(gradient_as_bucket_view=True)]}
    if launched_backend()[0] == "DEEPSPEED":
        kwargs["deepspeed_plugins"] = deepspeed_plugins(models or {"model": 1.0}, batch_size, grad_accum)
        if cpu:
            kwargs["kwargs_handlers"] = [InitProcessGroupKwargs(backend="gloo")]
            cpu = False  # DeepSpeed picks its CPU accelerator itself; accelerate's cpu flag would disable it
    return Accelerator(cpu=cpu, mixed_precision=mp, gradient_accumulation_steps=grad_accum, log_with="tensorboard",
                       project_config=ProjectConfiguration(project_dir=str(stage_path), logging_dir=str(stage_path)),
                       **kwargs)


def deepspeed_plugins(models: dict[str, float | None], batch_size: int, grad_accum: int) -> dict:
    """One `DeepSpeedPlugin` per model: trained ones at the ZeRO stage (and offload) of the accelerate
    config (read by accelerate from the environment its launcher sets) or, if it names a `deepspeed_config_file`,
    with that file's settings (bucket sizes, offload, ...); frozen ones at ZeRO-3. What the run's config decides
    wins over the file: micro-batch, gradient accumulation, each model's gradient clipping, precision (below)."""
    stage = launched_backend()[1]
    file = _launched_file()
    offload = {k: os.environ.get(f"ACCELERATE_DEEPSPEED_{k.upper()}", "none")
               for k in ("offload_optimizer_device", "offload_param_device")}
    plugins = {}
    for name, clip in models.items():
        frozen = clip is None
        if file and not frozen:
            conf = copy.deepcopy(file)
            # the global batch follows from the micro-batch (below), the accumulation and the process count
            conf.update(gradient_accumulation_steps=grad_accum, gradient_clipping=clip, train_batch_size="auto")
            plugin = DeepSpeedPlugin(hf_ds_config=conf, zero3_init_flag=False)
        else:  # hf_ds_config "none": built from these arguments, not from a launched config file
            plugin = DeepSpeedPlugin(hf_ds_config="none", zero_stage=3 if frozen else stage,
                                     gradient_accumulation_steps=grad_accum, gradient_clipping=1.0 if frozen else clip,
                                     zero3_init_flag=False, **({} if frozen else offload))
        plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = batch_size
        # DeepSpeed's own bf16 would cast the weights to bf16 (and save them so); ours stay fp32 and the steps
        # compute under torch.autocast (`autocast` below), as under DDP: the same numerics, fp32 checkpoints
        plugin.deepspeed_config.update(bf16={"enabled": False}, fp16={"enabled": False})
        # ZeRO-3's memory-efficient linear replaces torch.nn.functional.linear for the whole process and adds the
        # bias after a rounded bf16 matmul: bf16 steps would differ from DDP's (by 2e-3 after 2 steps, measured)
        plugin.deepspeed_config["zero_optimization"]["memory_efficient_linear"] = False
        plugins[name] = plugin
    return plugins


def _deepspeed_amp(accelerator: Accelerator, precision: str) -> bool:
    """Whether a bf16 run's autocast is ours to apply: under DeepSpeed accelerate leaves mixed precision to the
    engine, whose own bf16 we keep off (`deepspeed_plugins`), so `accelerator.autocast()` does nothing."""
    return accelerator.distributed_type == DistributedType.DEEPSPEED and precision == "bf16"


def autocast(accelerator: Accelerator, precision: str):
    """The context a training step's forward passes run in: `accelerator.autocast()` (bf16 autocast in a bf16
    run; `precision`: the run's, `mixed_precision(cfg)`), and the same under DeepSpeed."""
    if _deepspeed_amp(accelerator, precision):
        return _bf16_autocast(accelerator)
    return accelerator.autocast()


def _bf16_autocast(accelerator: Accelerator):
    """`accelerator.autocast()` of a bf16 run (accelerate's would pick the device's default dtype under
    DeepSpeed: fp16 on CUDA)."""
    kwargs = accelerator.autocast_handler.to_kwargs() if accelerator.autocast_handler is not None else {}
    return torch.autocast(accelerator.device.type, dtype=torch.bfloat16, **kwargs)


def _amp_forward(accelerator: Accelerator, model: torch.nn.Module) -> None:
    """What `accelerator.prepare` does to a model's forward in a bf16 run (autocast, outputs cast to fp32) but skips
    under DeepSpeed: done here so that DeepSpeed engines compute as DDP does."""
    autocast_forward(model, _bf16_autocast(accelerator))


def autocast_forward(model: torch.nn.Module, amp) -> None:
    """Run every call of `model` under the autocast context `amp`, its outputs cast to fp32 (accelerate's wrapper
    of a prepared model's forward)."""
    model._original_forward = model.forward  # `unwrap_model` takes the wrapper off again by this
    model.forward = MethodType(convert_outputs_to_fp32(amp(model.forward.__func__)), model)


def prepare(accelerator: Accelerator, name: str, model, optimizer=None, *, find_unused: bool = False,
            precision: str = "no", engine: bool = True):
    """Wrap one model (and its optimizer) for the run's backend: DDP, or its own DeepSpeed engine
    (`name` selects its plugin, see `make_accelerator`). A frozen model (no optimizer) is not put
    under DDP (`evaluation_mode`); under DeepSpeed it becomes a ZeRO-3 engine holding a shard of it.
    `find_unused`: its DDP looks for parameters a step leaves without gradient (`Trained.partial`).
    `precision`: the run's (`mixed_precision(cfg)`); in bf16 under DeepSpeed the model's forward gets the
    autocast accelerate gives it under DDP (`_amp_forward`). `engine` False (`Trained.engine`): under DeepSpeed
    the model stays a plain module on the device, whole on every process, with its plain optimizer
    (`optimizer_step` averages its gradients); under DDP it is wrapped as any other.

    Returns:
        the wrapped model, or (model, optimizer).
    """
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        state = accelerator.state
        active = next(k for k, v in state.deepspeed_plugins.items() if v is state.deepspeed_plugin)
        if _deepspeed_amp(accelerator, precision):
            _amp_forward(accelerator, model)
        if not engine:
            model.to(accelerator.device)
            optimizer.load_state_dict(optimizer.state_dict())  # a resumed state follows its parameters' device
            return model, optimizer
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
    if not find_unused:
        return accelerator.prepare(model, optimizer)
    handler, accelerator.ddp_handler = accelerator.ddp_handler, DistributedDataParallelKwargs(
        find_unused_parameters=True, gradient_as_bucket_view=True)
    try:  # this model's DDP only: a search per step costs a graph walk the others need not pay
        return accelerator.prepare(model, optimizer)
    finally:
        accelerator.ddp_handler = handler


def engine(accelerator: Accelerator, model) -> bool:
    """Whether `model` (prepared) is a DeepSpeed engine (not a plain module kept whole: `prepare(engine=False)`)."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return False
    from deepspeed import DeepSpeedEngine

    return isinstance(model, DeepSpeedEngine)


def full_optimizer_state(accelerator: Accelerator, model, optimizer) -> dict:
    """The optimizer's state dict in the form a one-process `AdamW` over `model.parameters()` has it,
    whatever the backend, so a checkpoint resumes under any backend and process count.

    Under DeepSpeed the fp32 moments live in ZeRO partitions: they are gathered per parameter with
    DeepSpeed's `safe_get_full_optimizer_state` (a collective: every process must call this).
    """
    if not engine(accelerator, model):
        return optimizer.state_dict()
    from deepspeed.utils import safe_get_full_optimizer_state

    base = model.optimizer.optimizer  # the engine's ZeRO optimizer wraps ours, now over flat partitions
    params = list(model.module.parameters())
    steps = [st["step"] for st in base.state.values() if "step" in st]
    state = {}
    for i, p in enumerate(params if steps else ()):  # no moments before the engine's first step (an sf_gan warm-up)
        moments = {k: safe_get_full_optimizer_state(p, k) for k in ("exp_avg", "exp_avg_sq")}
        if all(v is not None for v in moments.values()):
            state[i] = {"step": torch.as_tensor(steps[0]).detach().clone().float().cpu(),  # an int when offloaded
                        **{k: v.detach().float().cpu() for k, v in moments.items()}}
    groups = [{k: v for k, v in g.items() if k != "params"} for g in base.param_groups]
    if len(groups) != 1:
        raise ValueError(f"expected one optimizer parameter group under DeepSpeed, found {len(groups)}")
    return {"state": state, "param_groups": [{**groups[0], "params": list(range(len(params)))}]}


def restore_optimizer_state(accelerator: Accelerator, model, state: dict) -> None:
    """After `prepare`: put a one-process optimizer state (loaded from a checkpoint before `prepare`)
    into a DeepSpeed engine's ZeRO partitions (elsewhere `prepare` kept it: nothing to do)."""
    if not engine(accelerator, model) or not state.get("state"):
        return
    from deepspeed.utils import safe_set_full_optimizer_state

    base = model.optimizer.optimizer
    # ZeRO-3 creates the moments of its flat fp32 partitions at the first step only: made here as AdamW makes them
    for flat in getattr(model.optimizer, "fp32_partitioned_groups_flat", []):
        if flat not in base.state:
            base.state[flat] = {"step": torch.tensor(0.0), "exp_avg": torch.zeros_like(flat),
                                "exp_avg_sq": torch.zeros_like(flat)}
    for i, p in enumerate(model.module.parameters()):
        for k in ("exp_avg", "exp_avg_sq"):
            safe_set_full_optimizer_state(p, state["state"][i][k].to(p.device), k)
    step = next(iter(state["state"].values()))["step"]
    for st in base.state.values():
        st["step"] = step.clone().to(st["step"].device) if torch.is_tensor(st.get("step")) else step.item()


def zero3(accelerator: Accelerator) -> bool:
    """Whether the trained models are ZeRO-3 engines (each process holds a partition of every weight)."""
    return (accelerator.distributed_type == DistributedType.DEEPSPEED
            and int(accelerator.state.deepspeed_plugin.zero_stage) == 3)


class FullWeights:
    """The trained models as whole modules, for what reads all their weights at once on the main process:
    checkpoints, the saved folders, the preview.

    Elsewhere that is `accelerator.unwrap_model`. Under ZeRO-3 every weight is partitioned over the processes and
    the module's hooks gather them only inside a forward that every process runs; so the main process keeps a
    plain copy of each trained model (made before `prepare`, on the meta device until first filled: no memory
    before the first checkpoint), and `of` fills it by gathering the partitions one parameter at a time (a
    collective: every process calls it; only the main process gets the copy, the others None). The copy lives in
    CPU memory (a whole fp32 model on the device beside the engines would undo ZeRO-3's saving; the preview of a
    sprites run then samples on the CPU).
    """

    def __init__(self, accelerator: Accelerator, models: dict[str, torch.nn.Module]):
        """`models`: the trained models that become engines (`Trained.engine`), before `prepare`."""
        self.accelerator, self.copies = accelerator, {}
        self.partitioned = set(models) if zero3(accelerator) else set()
        if self.partitioned and accelerator.is_main_process:
            for name, model in models.items():  # the structure without the data: every tensor mapped to a meta one
                memo = {id(t): (torch.nn.Parameter(t.to("meta"), requires_grad=t.requires_grad)
                                if isinstance(t, torch.nn.Parameter) else t.to("meta"))
                        for t in (*model.parameters(), *model.buffers())}
                self.copies[name] = copy.deepcopy(model, memo)

    def of(self, name: str, wrapped) -> torch.nn.Module | None:
        """Trained model `name` (`wrapped`: its prepared module) whole (under ZeRO-3 its copy, in CPU memory)."""
        raw = self.accelerator.unwrap_model(wrapped)
        if name not in self.partitioned:
            return raw
        import deepspeed

        out = self.copies.get(name)
        if out is not None:
            if any(p.is_meta for p in out.parameters()):  # the first time
                out.to_empty(device="cpu")
            into = dict(out.named_parameters())
        for key, p in raw.named_parameters():
            with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                if out is not None:
                    into[key].data.copy_(p.data)
        if out is not None:  # buffers are not partitioned
            source = dict(raw.named_buffers())
            for key, b in out.named_buffers():
                b.copy_(source[key])
        return out


def check_replicas(accelerator: Accelerator, models: dict, *, ema=None) -> int:
    """Check that every process holds the same weights of each trained model in `models` (`{name: module}`) and
    the same EMA copy (`ema`: a diffusers `EMAModel`, kept by every process): a silent divergence would make
    rank 0's checkpoint one of several different models. A ZeRO-3 engine's weights exist once (partitioned): not
    compared.

    Returns:
        the number of processes compared (1: nothing to compare).
    Raises:
        RuntimeError naming the model whose weights differ.
    """
    if accelerator.num_processes == 1:
        return 1
    tensors = {n: list(accelerator.unwrap_model(m).parameters()) for n, m in models.items()}
    tensors = {n: params for n, params in tensors.items() if not any(hasattr(p, "ds_id") for p in params)}
    if ema is not None:
        tensors["EMA"] = list(ema.shadow_params)
    if not tensors:
        return 1
    for name, params in tensors.items():
        every = accelerator.gather(_fingerprint(params).to(accelerator.device)).cpu()
        if not (every == every[:1]).all():
            raise RuntimeError(f"{name}: weights differ between processes ({every.tolist()})")
    return accelerator.num_processes


def _fingerprint(params) -> torch.Tensor:
    """[1, 3] float64: the sum, the position-weighted sum and the largest magnitude of all `params` in order, one
    tensor at a time where it lives (a whole model flattened to float64 would hold 8 bytes per weight, three times
    over: about 34 GB for Wan2.1-1.3B, at the end of a run)."""
    params = list(params)
    device = params[0].device if params else torch.device("cpu")  # summed where they live: one copy to the host
    total = weighted = largest = torch.zeros((), dtype=torch.float64, device=device)
    offset = 0
    for p in params:
        x = p.detach().flatten().double()
        position = torch.arange(offset + 1, offset + x.numel() + 1, dtype=torch.float64, device=x.device)
        total = total + x.sum()
        weighted = weighted + (x * position).sum()
        largest = torch.maximum(largest, x.abs().max()) if x.numel() else largest
        offset += x.numel()
        del x, position  # before the next tensor's copies exist
    return torch.stack([total, weighted, largest])[None].cpu()


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
