"""The one training loop: every training stage is `Trainer(method).run()`.

The method (`pipeline/methods/`) declares its models and implements one `train_step`; the trainer owns
everything around it, once, in the order below: the stage folder (guard, skip when done, manifest),
the accelerator (DDP, or one DeepSpeed engine per model), the EMA, the checkpoint manager (save,
keep-last-k, bit-exact resume of weights, EMA, every optimizer, data position, generator, step),
logging (tqdm, TensorBoard), device peaks by phase and out-of-memory errors said in one line (beside the
`--dry-run` estimate), fault points, the replica check, saving and the preview.
"""

from __future__ import annotations

import contextlib
import time

import torch
from accelerate.utils import DistributedType
from tqdm.auto import tqdm

from pipeline.config import to_yaml
from pipeline.io.run_dir import StageDir
from pipeline.methods.base import Method
from pipeline.models.loading import save_model, save_weights
from pipeline.training.checkpoint import CheckpointManager, latest_checkpoint
from pipeline.training.distributed import (FullWeights, check_replicas, full_optimizer_state, launched_backend,
                                           launched_deepspeed, make_accelerator, mixed_precision, prepare,
                                           restore_optimizer_state)
from pipeline.training.faults import maybe_kill
from pipeline.training.memory import OutOfMemory, PhasePeaks, is_out_of_memory, out_of_memory_message, peak_report
from pipeline.training.optim import averaged, place_ema, replay_schedule
from pipeline.training.stage_io import finished_already
from pipeline.training.settings import changes, refuse_changes


def force_move_aside(accelerator, stage) -> None:
    """`--force`: the main process moves an earlier run's stage folder aside, the others wait for it. Every
    process looks for the folder before it moves: one that looked later would find none, skip the wait, and
    pair its next collective with the wrong one of the others (a hang at start-up, seen under DDP)."""
    existed = stage.path.exists()
    accelerator.wait_for_everyone()
    if existed:
        if accelerator.is_main_process:
            print(f"[{stage.stage}] --force: moved the earlier stage folder aside to {stage.move_aside()}")
        accelerator.wait_for_everyone()


def memory_remedies_text(method: Method, device, processes: int, backend: str | None, zero: int,
                         started: bool) -> str:
    """The settings that would lower the stage's memory (`plan.memory_remedies`), and on GPUs the sharding to try;
    `started` (a checkpoint exists): those a resume would refuse say that they restart the stage."""
    from pipeline.plan import memory_remedies, remedies_text

    text = remedies_text(memory_remedies(method.cfg, method.stage, num_processes=processes, backend=backend,
                                         stage_zero=zero, deepspeed=launched_deepspeed()),
                         started=started, harmless=method.harmless_settings())
    shard = None
    if torch.device(device).type == "cuda":
        if backend != "DEEPSPEED":
            shard = "sharding over GPUs (--num-processes N --accelerate-config configs/accelerate/deepspeed_zero2.yaml)"
        elif zero < 3:
            shard = "ZeRO-3 (--accelerate-config configs/accelerate/deepspeed_zero3.yaml)"
        if shard and started:  # another global batch (or engine) than the checkpoint's
            shard += " (with --force: restarts the stage)"
    return ", or ".join(t for t in (text, shard) if t)


def phase_estimate(estimate, phase: str):
    """`estimate(phase)`, or None for a phase the estimate does not model (a report never fails a finished run)."""
    try:
        return estimate(phase)
    except ValueError:
        return None


@contextlib.contextmanager
def said_out_of_memory(stage: StageDir, step, peaks: PhasePeaks, estimate, remedies):
    """An out-of-memory error inside becomes `OutOfMemory` (a user error: one line, exit status 2) that names the
    stage, the step (`step()`: the steps done), the phase, what the device held, the `--dry-run` estimate
    (`estimate(phase)`) and the settings that would lower it (`remedies(started)`), and where a rerun resumes."""
    try:
        yield
    except Exception as error:
        if not is_out_of_memory(error):
            raise
        phase = peaks.failed_in
        at_phase = phase_estimate(estimate, phase) if phase else None
        last = latest_checkpoint(stage.path / "checkpoints")
        resume = int(last.name.split("_")[-1]) if last else 0
        # the phase's peak (its counter was reset as the error left it), else the process's
        peak = peaks.peaks.get(phase) if phase else peaks.overall()
        message = out_of_memory_message(stage=stage.stage, step=step() + 1, device=peaks.device, phase=phase,
                                        estimate=estimate(), phase_estimate=at_phase, peak=peak,
                                        remedies=remedies(resume > 0), resume_step=resume)
        raise OutOfMemory(message) from None


class Trainer:
    """Runs `method` as the training stage `method.stage` of `method.cfg.run.dir`.

    Args:
        method: the method, constructed with its config and section.
        force: rerun from scratch (the earlier stage folder is moved aside whole; a done stage is redone).
    """

    def __init__(self, method: Method, *, force: bool = False):
        self.method, self.force = method, force

    def run(self) -> StageDir:
        method, force = self.method, self.force
        cfg, section = method.cfg, method.section
        stage = StageDir(cfg.run.dir, method.stage)
        stage.guard(method.inputs(), force)
        backend, zero, processes = launched_backend()  # the accelerator does not exist yet
        settings = method.fingerprint(processes=processes)
        harmless, defaults = method.harmless_settings(), method.fingerprint_defaults()
        if stage.done and not force:  # a done stage is never kept silently on changed settings or inputs
            if "settings" in stage.manifest():
                refuse_changes(stage.stage, "the finished stage",
                               changes(stage.manifest()["settings"], settings, defaults),
                               harmless=harmless)
            stage.check_inputs(method.recorded_inputs())
        if finished_already(stage, section, force):
            return stage
        method.load()
        method.precision = mp = mixed_precision(cfg)  # resolved once: the accelerator, the wrappers and every step
        accelerator = make_accelerator(cfg, stage.path, grad_accum=section.grad_accum, batch_size=section.batch_size,
                                       models=method.engines(), precision=mp)
        if force:  # a rerun from scratch: the earlier run's folder is kept aside
            force_move_aside(accelerator, stage)
        torch.manual_seed(cfg.run.seed)  # the same initial weights on every process
        method.accelerator = accelerator
        method.build(accelerator)
        names = list(method.trained)
        main, others = method.trained[names[0]], {n: method.trained[n] for n in names[1:]}

        # Resume: read the newest checkpoint before anything is written (a failed resume writes nothing).
        checkpoints = CheckpointManager(stage.path / "checkpoints", keep=section.keep_checkpoints,
                                        accelerator=accelerator)
        step, extra, rng = checkpoints.restore(model=main.module, ema=method.ema, optimizer=main.optimizer,
                                               others={n: (t.module, t.optimizer) for n, t in others.items()})
        changed = {}
        if step and "settings" in extra:  # checkpoints of older versions carry none
            changed = refuse_changes(stage.stage, f"the checkpoint step_{step:07d}",
                                     changes(extra["settings"], settings, defaults), harmless=harmless)
        if accelerator.is_main_process:
            stage.begin(to_yaml(cfg), inputs=method.recorded_inputs(), force=force)
            if changed:  # harmless changes (a longer run, other intervals) are allowed and recorded
                stage.record("setting_changes", {"at_step": step, **{k: list(v) for k, v in changed.items()}})
        for t in method.trained.values():
            replay_schedule(t.scheduler, t.schedule_steps(step))
        method.restore(step=step, extra=extra, rng=rng)

        def estimate(phase: str | None = None):  # the --dry-run memory estimate of this very setting (or phase)
            from pipeline.plan import memory_estimate

            return memory_estimate(cfg, stage.stage, num_processes=accelerator.num_processes, backend=backend,
                                   stage_zero=zero, deepspeed=launched_deepspeed(), phase=phase)

        # Device peaks by phase (CUDA); a setting too large for the device stops with one line saying what would fit.
        method.peaks = peaks = PhasePeaks(accelerator.device)
        with said_out_of_memory(stage, lambda: step, peaks, estimate, remedies=lambda started: memory_remedies_text(
                method, accelerator.device, accelerator.num_processes, backend, zero, started)):
            method.prepare_data(stage_path=stage.path)

            # Wrap every model for the backend; DeepSpeed re-creates optimizer states, so put them back.
            whole = FullWeights(accelerator, {n: t.module for n, t in method.trained.items() if t.engine})
            loaded = {n: t.optimizer.state_dict() for n, t in method.trained.items()}
            for n, t in method.trained.items():
                t.module, t.optimizer = prepare(accelerator, n, t.module, t.optimizer, find_unused=t.partial,
                                                precision=mp, engine=t.engine)
            for n, m in method.frozen.items():
                method.frozen[n] = prepare(accelerator, n, m, precision=mp)
            if step:
                for n, t in method.trained.items():
                    restore_optimizer_state(accelerator, t.module, loaded[n])
            del loaded  # (a resumed run's moments, as read: the optimizers hold their own now)
            place_ema(method.ema, section, accelerator.device)
            method.bind()
            accelerator.init_trackers("logs")

            # The loop. The bar is closed on errors too, so that an error message starts its own line.
            with tqdm(total=section.steps, initial=step, desc=getattr(method, "desc", method.stage),
                      disable=not accelerator.is_main_process) as bar:
                t0, elapsed0 = time.time(), extra.get("elapsed_s", 0.0)
                while step < section.steps:
                    method.train_step(step)
                    step += 1
                    maybe_kill("step", step)
                    bar.update(1)
                    if step % section.log_every == 0 or step == section.steps:
                        scalars, postfix = method.logs(step, elapsed=time.time() - t0)
                        if (peak := peaks.overall()) is not None:
                            scalars["memory/peak_gib"] = peak / 2 ** 30
                            postfix = {**postfix, "mem": f"{peak / 2 ** 30:.1f}G"}
                        accelerator.log(scalars, step=step)
                        bar.set_postfix(postfix)
                    if step % section.checkpoint_every == 0 or step == section.steps:
                        # every process: gathering ZeRO partitions is a collective
                        states = {n: full_optimizer_state(accelerator, t.module, t.optimizer)
                                  for n, t in method.trained.items()}
                        models = {n: whole.of(n, t.module) for n, t in method.trained.items()}
                        if accelerator.is_main_process:
                            checkpoints.save(step, model=models[names[0]], ema=method.ema,
                                             optimizer=states[names[0]], rng=method.rng_state(),
                                             extra={**method.checkpoint_extra(), "settings": settings,
                                                    "elapsed_s": elapsed0 + time.time() - t0},
                                             others={n: (models[n], states[n]) for n in others})
        replicas = check_replicas(accelerator, {n: t.module for n, t in method.trained.items()}, ema=method.ema)

        # Nothing reads the optimizers' moments after the last checkpoint: freed (with the checkpoint's references to
        # them) before the outputs and the final preview, which would otherwise run on top of them.
        states = None
        if accelerator.distributed_type != DistributedType.DEEPSPEED:  # (an engine's partitions are its own)
            for t in method.trained.values():
                t.optimizer.state.clear()
        outputs = {}
        models = {n: whole.of(n, t.module) for n, t in method.trained.items()}  # ZeRO-3: in CPU memory
        if accelerator.is_main_process:
            for n in others:
                save_model(models[n], stage.path / n)
                outputs[n] = str(stage.path / n)
            raw = models[names[0]]
            raw.disable_gradient_checkpointing()
            outputs.update(save_weights(stage.path, raw, method.ema, cfg, **method.sampling_settings()))
            # raw now holds the EMA weights: the preview shows what was saved as transformer_ema
            if cfg.data.kind == "sprites":
                preview = method.preview(raw, stage.path / "preview.gif")
                if preview is not None:
                    outputs["preview"] = str(preview)
            method.ema.restore(averaged(raw))
            outputs.update(method.extra_outputs(stage.path))
        accelerator.end_training()
        if accelerator.is_main_process:
            metrics = {**method.metrics(step=step, extra=extra), "steps": step,
                       "processes": accelerator.num_processes, "replicas_identical": replicas}
            if (peak := peaks.overall()) is not None:  # the figure the --dry-run estimate predicts, and by phase
                est = estimate()
                phases = {name: (p, at) for name, p in peaks.peaks.items() if (at := phase_estimate(estimate, name))}
                metrics.update(peak_memory_gib=peak / 2 ** 30, memory_estimate_gib=est.total / 2 ** 30,
                               memory_by_phase_gib={name: {"peak": p / 2 ** 30, "estimate": e.total / 2 ** 30}
                                                    for name, (p, e) in phases.items()})
                print(peak_report(stage.stage, peak, est, phases))
            stage.finish(outputs, metrics, settings=settings)
        return stage

