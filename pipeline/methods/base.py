"""What a training method is: a small class that declares its models and owns its training step.

A method says which models it trains (each with its optimizer, LR schedule and gradient clip) and which
it only evaluates, builds them and its data, and implements `train_step`, the whole of one step
including its own generator/critic alternation. The loop around it (accelerator, EMA, checkpoints,
logging, previews, saving) is `pipeline.training.trainer.Trainer`, the same for every method.

Adding a method is a subclass plus a config section (a `TrainingConfig` dataclass): see
`tests/test_trainer.py` for one written inside a test. The methods of the pipeline register themselves
in `METHODS` by name (`register`), which the stages look up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

import torch
from accelerate import Accelerator

from pipeline.config import Config, TrainingConfig
from pipeline.training.distributed import autocast, global_norm
from pipeline.training.faults import maybe_out_of_memory
from pipeline.training.memory import PhasePeaks
from pipeline.training.optim import averaged, ema_step, optimizer_step
from pipeline.training.settings import flatten, settings_of

METHODS: dict[str, type["Method"]] = {}


def register(name: str):
    """Class decorator: make a method findable as `METHODS[name]` (the value of its config key)."""
    def deco(cls):
        cls.name = name
        METHODS[name] = cls
        return cls
    return deco


@dataclass
class Trained:
    """A model the method trains.

    Attributes:
        module: the model (after `Trainer` prepares it: the DDP / DeepSpeed wrapper).
        optimizer, scheduler: its AdamW and LR schedule.
        grad_clip: the gradient-norm clip.
        lr_key: the config key to lower when its loss becomes NaN (named in the error).
        schedule_steps: how many LR-schedule steps the first `step` training steps made (a resume replays
            them); the identity for a model updated every step.
        partial: its loss reaches only part of it (sf_gan's critic, read after an inner block): DDP must
            look for the parameters without a gradient each step.
        engine: under DeepSpeed, its own engine (listed by `Method.engines`). False for a small model trained
            by another model's loss (`optimize(also=...)`: a discriminator's head), which one engine's backward
            cannot share: kept whole on every process, its gradients averaged by `optimizer_step`.
    """

    module: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    grad_clip: float
    lr_key: str
    schedule_steps: Callable[[int], int] = lambda step: step
    partial: bool = False
    engine: bool = True


@dataclass
class Update:
    """One optimiser step of one model over `grad_accum` micro-batches: the last micro-batch's loss and
    stats, the gradient norm (None between accumulation steps), and every `(batch, stats)` seen."""

    loss: torch.Tensor
    stats: dict
    grad_norm: float | None
    seen: list = field(default_factory=list)


class Method:
    """Base class of training methods (see the module docstring for the contract).

    The `Trainer` calls, in this order: `inputs` / `recorded_inputs` (what is read from disk), `load`
    (read input models, before the accelerator exists), `build(accelerator)` (models, EMA, optimizers,
    data, generator), `restore` (after a checkpoint was read), `prepare_data` (after the stage is marked
    running), `bind` (after the models were wrapped for the backend), `train_step` every step, `logs` at
    logging steps, `checkpoint_extra` / `rng_state` at checkpoints, then `preview` and `metrics`.

    Attributes set by `build`:
        trained: `{name: Trained}`; the first is the model whose EMA is kept and saved as the stage's
            `transformer/` and `transformer_ema/` (the checkpoint's `model.safetensors`).
        frozen: `{name: module}` models only evaluated (prepared without an optimizer).
        ema: a diffusers `EMAModel` over the first trained model.
        gen: the `ShardedGenerator` of every random draw of training (checkpointed).
    """

    name: ClassVar[str] = "method"
    stage: ClassVar[str] = "train"  # the stage folder it writes

    def __init__(self, *, cfg: Config, section: TrainingConfig):
        self.cfg, self.section = cfg, section
        self.accelerator: Accelerator | None = None
        self.precision = "no"  # the run's `mixed_precision(cfg)`, resolved by the trainer before `build`
        self.trained: dict[str, Trained] = {}
        self.frozen: dict[str, torch.nn.Module] = {}
        self.ema = None
        self.gen = None
        self.samples_seen = 0  # micro-batch rows over all processes, for samples/s
        self.peaks = PhasePeaks("cpu")  # the trainer's: device peaks by phase (`phase_of`), the phase an OOM is in

    # ---- what the stage reads -------------------------------------------------------------------------
    def inputs(self) -> dict:
        """`{config key: path}` the stage reads from disk (its folder may not be, hold or lie in one)."""
        return {}

    def recorded_inputs(self) -> dict | None:
        """`{name: path}` hashed into the manifest when the stage starts (a resume refuses changed ones)."""
        return None

    def engines(self) -> dict[str, float | None]:
        """`{model name: gradient clip, or None for a frozen model}`: one DeepSpeed engine each (every trained
        model with `Trained.engine`, every frozen one)."""
        return {"model": self.section.grad_clip}

    def fingerprint_sections(self) -> list[str]:
        """The config sections besides its own that shape what this method trains (see
        `pipeline/training/settings.py`): a resume refuses a change in them."""
        return ["run.seed", "run.mixed_precision", "data", "model"]

    def harmless_settings(self) -> tuple[str, ...]:
        """Keys or sections within the fingerprint that this method only uses for previews."""
        return ()

    def fingerprint(self, *, processes: int = 1) -> dict:
        """`{"section.key": value}` of everything that shapes what is trained (own section under `stage`).

        The batch counts over all `processes`: N processes × batch B train as one process with batch N·B
        (`pipeline/data/shard.py`), so a run may resume under another process count."""
        out = {**settings_of(self.cfg, self.fingerprint_sections()), **flatten(self.section, self.stage)}
        if "batch_size" in getattr(self.section, "__dataclass_fields__", {}):
            out[f"{self.stage}.batch_size*processes"] = out.pop(f"{self.stage}.batch_size") * processes
        if getattr(self.section, "lr_schedule", None) == "cosine":  # the schedule's length is its shape
            out[f"{self.stage}.cosine_length"] = self.section.steps
        return out

    def fingerprint_defaults(self) -> dict:
        """The fingerprint's keys at their defaults (a key added since a checkpoint was made, at its default,
        is no change: `pipeline/training/settings.py: changes`)."""
        out = {**settings_of(Config(), self.fingerprint_sections()), **flatten(type(self.section)(), self.stage)}
        return out

    def load(self) -> None:
        """Read input models (before the accelerator exists)."""

    # ---- building --------------------------------------------------------------------------------------
    def build(self, accelerator: Accelerator) -> None:
        raise NotImplementedError

    def restore(self, *, step: int, extra: dict, rng: dict) -> None:
        """Put back what the checkpoint of `step` recorded besides weights and optimizers (data position,
        generator)."""
        if step:
            self.gen.set_state(rng["train"])

    def prepare_data(self, *, stage_path: Path) -> None:
        """Data made by the stage itself before training (ODE pairs), once the stage is marked running."""

    def bind(self) -> None:
        """After the trained and frozen models were prepared: build what calls them (denoisers, losses)."""

    # ---- one step --------------------------------------------------------------------------------------
    def train_step(self, step: int) -> None:
        raise NotImplementedError

    def phase_of(self, name: str) -> str:
        """The `--dry-run` estimate's phase (`pipeline/training/memory.py`) of an update of `trained[name]`."""
        return "training"

    def optimize(self, name: str, *, step: int, batch: Callable[[int], Any],
                 loss: Callable[[Any], tuple[torch.Tensor, dict]], also: tuple[str, ...] = ()) -> Update:
        """One optimiser step of `trained[name]` over `section.grad_accum` micro-batches: micro-batch i is
        `batch(i)`, its loss `loss(batch(i)) -> (loss, stats)` under autocast; backward, clipping, the
        optimizer and the LR schedule as `pipeline.training.optim.optimizer_step` does them. `also`: further
        trained models the same loss updates, each with its own optimizer (a discriminator's head)."""
        acc, t = self.accelerator, self.trained[name]
        more = tuple((o.module, o.optimizer, o.scheduler, o.grad_clip) for o in (self.trained[n] for n in also))
        seen, norm = [], None
        with self.peaks.phase(self.phase_of(name)):
            maybe_out_of_memory(step + 1)
            for i in range(self.section.grad_accum):
                b = batch(i)
                with acc.accumulate(t.module, *(m[0] for m in more)):
                    with autocast(acc, self.precision):
                        value, stats = loss(b)
                    norm = optimizer_step(acc, t.module, t.optimizer, t.scheduler, value, t.lr_key, t.grad_clip, step,
                                          also=more)
                seen.append((b, stats))
                self.samples_seen += self.section.batch_size * acc.num_processes
        return Update(value, stats, norm, seen)

    def update_ema(self) -> None:
        """One EMA step over the first trained model's current weights (after that model's optimiser step)."""
        first = next(iter(self.trained.values()))
        ema_step(self.ema, averaged(self.accelerator.unwrap_model(first.module)))

    def global_norm(self, weight: torch.Tensor) -> torch.Tensor:
        """A loss denominator over the global batch (`pipeline.training.distributed.global_norm`)."""
        return global_norm(self.accelerator, weight)

    # ---- reporting -------------------------------------------------------------------------------------
    def logs(self, step: int, *, elapsed: float) -> tuple[dict, dict]:
        """At a logging step, `elapsed` seconds into this run: (TensorBoard scalars, progress-bar postfix)."""
        return {}, {}

    def checkpoint_extra(self) -> dict:
        """JSON-able state saved with a checkpoint (data position, last loss)."""
        return {}

    def rng_state(self) -> dict:
        return {"train": self.gen.get_state()}

    def sampling_settings(self) -> dict:
        """What the saved transformer records about how to sample it (`prediction`, a student's steps)."""
        return {"prediction": self.cfg.model.prediction}

    def preview(self, model: torch.nn.Module, path: Path) -> Path | None:
        """A GIF of samples of the trained model (sprites runs), or None."""
        return None

    def extra_outputs(self, stage_path: Path) -> dict:
        """Further outputs saved at the end besides the trained model (distill's critic)."""
        return {}

    def metrics(self, *, step: int, extra: dict) -> dict:
        """The manifest's metrics after `step` steps (`extra`: the resumed checkpoint's, for a run resumed at
        its last step)."""
        return {}


class OneModelMethod(Method):
    """A method that trains one model, `trained["model"]`, by one loss: each step is one optimiser step over
    `batch(i)` / `step_loss(batch) -> (loss, stats)`, then the EMA; it logs loss, gradient norm, LR and
    samples/s."""

    loss = None  # the last micro-batch's loss (at logging steps: the global batch's); None before any step

    def batch(self, i: int):
        raise NotImplementedError

    def step_loss(self, batch) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    def train_step(self, step: int) -> None:
        self.trained["model"].module.train()
        update = self.optimize("model", step=step, batch=self.batch, loss=self.step_loss)
        self.loss, self.grad_norm = update.loss, update.grad_norm
        self.update_ema()

    def logs(self, step: int, *, elapsed: float) -> tuple[dict, dict]:
        self.loss = self.accelerator.reduce(self.loss.detach(), "mean")  # the global batch's loss
        t = self.trained["model"]
        return ({"loss": self.loss.item(), "grad_norm": float(self.grad_norm), "lr": t.scheduler.get_last_lr()[0],
                 "samples_per_s": self.samples_seen / elapsed}, {"loss": f"{self.loss.item():.4f}"})
