"""Stage 4, `evaluate`: one report comparing every model of a run.

Every model draws the same noise (seed `evaluate.seed`, default `run.seed`) for the same balanced class
labels and generates `evaluate.long_factor` × `data.frames` frames:

- `teacher`: the DF teacher with its many-step sampler (`pretrain_teacher.sampler` of its stage);
- `teacher_few_step`: the same teacher with the student's few-step sampler (`student` section): the
  "no distillation" baseline;
- `student_init`, `student`: the init_student and distill stages with their few-step sampler;
- `evaluate.extra`: further stage (or diffusers) folders by name, e.g. a `df_dmd` run.

The models and their samplers: `pipeline/evaluation/models.py`; sampling, saving and scoring each one (and
the `real` row, real videos through the same code): `pipeline/evaluation/scoring.py`; the report:
`pipeline/evaluation/report.py`; `evaluate.benchmarks`, run in this process: `benchmarks/suite.py`.

Outputs in `<run.dir>/evaluate/`: `samples/<model>.safetensors` (training length; INTERFACE.md format),
`samples/<model>_long.safetensors`, GIF previews, `report.json` (schema in `pipeline/evaluation/report.py`),
`report.md`, `plots/{drift,modes,speed_quality}.png`. A model whose stage has not run is skipped with
a note; a finished model is not sampled again when the stage resumes (`samples/<model>.json` records
its result and what it was computed from). A finished stage asked for a model it has not scored (a new
`evaluate.extra` entry) is extended: only the new model is sampled, and the report covers every model asked for.

Text runs (`data.kind` latents / prompts) have no such metrics here: `run_text` writes every model's
videos for `evaluate.prompts`, decoded by the VAE, in VBench's layout under `<evaluate>/vbench/<model>/`.
"""

from __future__ import annotations

import os
import sys

import torch
from tqdm import tqdm

from pipeline.cli import stage_main
from pipeline.config import Config, ConfigError, to_yaml
from pipeline.evaluation.models import entries, weights_of
from pipeline.evaluation.report import make_report, manifest_metrics, write_report
from pipeline.evaluation.scoring import evaluate_entry, evaluate_text_entry, real_reference
from pipeline.io.run_dir import StageDir
from pipeline.training.distributed import run_device
from pipeline.training.stage_io import component_inputs


def finished(stage: StageDir, models: list, force: bool) -> bool:
    """Whether the stage is done with every model of `models` (`entries`) scored; says so. A finished stage
    asked for a model it has not scored is reopened (and says which): the scored models' records are reused."""
    if force or not stage.done:
        return False
    new = [m.name for m in models if m.name not in stage.manifest().get("inputs", {})]
    if not new:
        print(f"[evaluate] done already: {stage.path} (use --force to rerun)")
        return True
    print(f"[evaluate] extending the finished {stage.path} with {', '.join(new)} (models scored before are reused)")
    return False


def run_text(cfg: Config, force: bool = False) -> StageDir:
    """Text runs (data.kind latents / prompts): every model's videos for `evaluate.prompts`, decoded by
    `components.vae`, in VBench's layout `<evaluate>/vbench/<model>/<prompt>-<i>.mp4` (VBench, not installed
    here, scores them). Resumable per model (`vbench/<model>.json` records what its videos came from)."""
    from pipeline.data.prompts import read_prompts
    from pipeline.models.text_encoder import prompt_embeds
    from pipeline.models.vae import WanVAE

    e = cfg.evaluate
    if e.prompts is None:
        raise ConfigError("evaluate.prompts must name a prompt file (one per line) for a text run "
                          f"(data.kind={cfg.data.kind}): evaluate writes each model's videos in VBench's layout")
    prompts = read_prompts(e.prompts)
    stage = StageDir(cfg.run.dir, "evaluate")
    models = entries(cfg)
    if finished(stage, models, force):
        return stage
    seed = cfg.run.seed if e.seed is None else e.seed
    stage.guard({**{f"model '{m.name}'": m.source for m in models}, "evaluate.prompts": e.prompts,
                 **component_inputs(cfg)}, force)
    stage.begin(to_yaml(cfg), {m.name: weights_of(m.source) for m in models}, check_inputs=False)
    hashes = stage.manifest()["inputs"]
    folder = stage.path / "vbench"
    folder.mkdir(exist_ok=True)
    context, null = prompt_embeds(cfg, prompts, folder / ".cache")
    vae = WanVAE.from_config(cfg)
    device = run_device(cfg)
    outputs = {}
    with torch.no_grad():
        for m in models:
            outputs[m.name] = str(evaluate_text_entry(m, cfg, folder=folder, prompts=prompts, context=context,
                                                      null=null, vae=vae, seed=seed, device=device,
                                                      weights_sha256=hashes[m.name]["sha256"], force=force))
    stage.finish(outputs, {"prompts": len(prompts), "videos_per_prompt": e.videos_per_prompt})
    print(f"[evaluate] wrote VBench folders under {folder}")
    return stage


def run(cfg: Config, force: bool = False) -> StageDir:
    """Evaluate every model of the run; returns the stage folder."""
    if cfg.data.kind != "sprites":
        return run_text(cfg, force)
    stage = StageDir(cfg.run.dir, "evaluate")
    models = entries(cfg)
    if finished(stage, models, force):
        return stage
    if int(os.environ.get("RANK", "0")) != 0:  # sampling is single-process: other ranks have nothing to do
        return stage
    if cfg.evaluate.seed is None:
        cfg.evaluate.seed = cfg.run.seed
    stage.guard({f"model '{e.name}'": e.source for e in models}, force)
    stage.begin(to_yaml(cfg), {e.name: weights_of(e.source) for e in models}, check_inputs=False)
    hashes = stage.manifest()["inputs"]  # each model's weights, hashed once by `begin`
    out = stage.path
    if force:
        for p in (out / "samples").glob("*.json"):
            p.unlink()
    (out / "samples").mkdir(parents=True, exist_ok=True)
    device = run_device(cfg)
    features, real = real_reference(cfg)
    results = {}
    with torch.no_grad():
        for e in tqdm(models, desc="evaluate", unit="model", file=sys.stdout):
            results[e.name] = evaluate_entry(e, cfg, out=out, real_features=features, device=device,
                                             weights_sha256=hashes[e.name]["sha256"])
    report = make_report(cfg, models=results, real=real, device=device)
    if cfg.evaluate.benchmarks:  # the benchmark scripts' own code, called in this process
        from benchmarks.suite import run_benchmarks

        student = next((e.source for e in reversed(models) if e.name in ("student", "student_init")), None)
        report["benchmarks"] = run_benchmarks(cfg.evaluate.benchmarks, stage_path=out, student=student)
    outputs = write_report(report, out)
    stage.finish(outputs, manifest_metrics(results))
    print(f"[evaluate] wrote {out / 'report.md'}")
    return stage


def main(argv=None) -> int:
    return stage_main("evaluate", run, argv)


if __name__ == "__main__":
    sys.exit(main())
