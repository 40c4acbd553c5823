"""Stage 4, `evaluate`: one report comparing every model of a run.

Every model draws the same noise (seed `evaluate.seed`, default `run.seed`) for the same balanced class
labels and generates `evaluate.long_factor` × `data.frames` frames:

- `teacher`: the DF teacher with its many-step sampler (`pretrain_teacher.sampler` of its stage);
- `teacher_few_step`: the same teacher with the student's few-step sampler (`student` section): the
  "no distillation" baseline;
- `student_init`, `student`: the init_student and distill stages with their few-step sampler;
- `evaluate.extra`: further stage (or diffusers) folders by name, e.g. a `df_dmd` run.

Training-length numbers are read off the first `data.frames` frames of the long rollout: a causal
sampler never looks ahead, so they are what a rollout of that length gives (a non-causal sampler —
synchronous or bidirectional — samples the short videos separately). The `real` row scores real videos
(a stream training never read) through the same code: the floor of every metric at this many videos.

Outputs in `<run.dir>/evaluate/`: `samples/<model>.safetensors` (training length; INTERFACE.md format),
`samples/<model>_long.safetensors`, GIF previews, `report.json` (schema in `pipeline/evaluation/report.py`),
`report.md`, `plots/{drift,modes,speed_quality}.png`. A model whose stage has not run is skipped with
a note; a finished model is not sampled again when the stage resumes (`samples/<model>.json` records
its result and what it was computed from).

Text runs (`data.kind` latents / prompts) have no such metrics here: `run_text` writes every model's
videos for `evaluate.prompts`, decoded by the VAE, in VBench's layout under `<evaluate>/vbench/<model>/`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

from pipeline.training.checkpoint import read_safetensors
from pipeline.config import Config, ConfigError, to_yaml
from pipeline.io.media import save_samples
from pipeline.evaluation.metrics import FEATURES, quality, video_features
from pipeline.evaluation.report import SCHEMA_VERSION, write_report
from pipeline.io.run_dir import StageDir, write_atomic
from pipeline.evaluation.speed import SpeedMeter
from pipeline.data.sprites import SpritesStream, balanced_labels
from pipeline.cli import stage_main
from pipeline.diffusion.videos import sample_student_videos, sample_videos
from pipeline.models.loading import is_student, load_source
from pipeline.training.distributed import run_device
from pipeline.training.resume import component_inputs


@dataclass
class Entry:
    """One model of the report: `source` folder, and whether it samples with the student's few steps
    although it is a teacher (`few_step`)."""

    name: str
    source: Path
    few_step: bool = False


def entries(cfg: Config) -> list[Entry]:
    """The models to evaluate, in report order; built-in ones whose stage is not done are skipped."""
    run = Path(cfg.run.dir)
    teacher = Path(cfg.distill.teacher or run / "pretrain_teacher")
    builtin = {"teacher": Entry("teacher", teacher), "teacher_few_step": Entry("teacher_few_step", teacher, True),
               "student_init": Entry("student_init", Path(cfg.distill.student or run / "init_student")),
               "student": Entry("student", run / "distill")}
    out = []
    for name in cfg.evaluate.models:
        e = builtin[name]
        if (e.source / "manifest.json").is_file() and not StageDir(e.source.parent, e.source.name).done:
            print(f"[evaluate] skipping {name}: {e.source} has not finished")
        elif not e.source.exists():
            print(f"[evaluate] skipping {name}: {e.source} not found")
        else:
            out.append(e)
    for name, path in cfg.evaluate.extra.items():
        if not Path(path).exists():
            raise FileNotFoundError(f"evaluate.extra.{name}: {path} not found")
        out.append(Entry(name, Path(path)))
    if not out:
        raise FileNotFoundError(f"evaluate: none of the models exists under {run}; run the training stages first")
    return out


class Sampler:
    """One model loaded for sampling: `sampler(labels [N], frames, on_chunk)` → videos `[N, F, 3, S, S]`.

    Attributes: `model` (the transformer, for the speed meter), `desc` (the sampler, for the report),
    `causal` (a prefix of a long rollout is a short rollout).
    """

    def __init__(self, entry: Entry, cfg: Config, device: torch.device):
        model, table, mcfg = load_source(entry.source)
        if table is None:
            raise ConfigError(f"{entry.source}: evaluate scores sprites models (class prompts); this one has none")
        if not (entry.source / "manifest.json").is_file():  # a bare diffusers folder: the run's samplers
            mcfg = replace(cfg, model=replace(cfg.model, prediction=mcfg.model.prediction),
                           student=mcfg.student if is_student(model) else cfg.student)
        self.model = model.to(device)
        self.table, self.cfg, self.mcfg = table.to(device), cfg, mcfg
        attention = mcfg.pretrain_teacher.attention
        self.few_step = is_student(model) or (entry.few_step and attention == "block_causal")
        if self.few_step:  # a student, or the teacher through the student's sampler
            self.student = mcfg.student if is_student(model) else cfg.student
            st = self.student
            self.desc = {"kind": "few_step", "denoising_steps": list(st.denoising_steps), "shift": st.shift,
                         "max_context_frames": st.max_context_frames}
            self.causal = True
        else:
            self.sampler = mcfg.pretrain_teacher.sampler
            if entry.few_step:  # a bidirectional teacher has no KV cache: its own sampler, the student's step count
                self.sampler = replace(self.sampler, steps=len(cfg.student.denoising_steps), lag=0)
            sp = self.sampler
            self.desc = {"kind": sp.kind, "steps": sp.steps, "lag": sp.lag, "guidance": sp.guidance,
                         "attention": attention, "max_context_frames": sp.max_context_frames}
            self.causal = sp.kind == "autoregressive" and attention == "block_causal"

    def __call__(self, labels: torch.Tensor, frames: int, on_chunk=None) -> torch.Tensor:
        c, e = self.cfg, self.cfg.evaluate
        args = (self.model, self.table, labels, frames, c.data.size)
        if self.few_step:
            return sample_student_videos(*args, c.data.frames_per_chunk, self.student, e.seed,
                                         self.mcfg.model.prediction, on_chunk=on_chunk, batch_size=e.batch_size)
        return sample_videos(*args, self.mcfg.pretrain_teacher.attention, c.data.frames_per_chunk, self.sampler,
                             e.seed, self.mcfg.model.prediction, on_chunk=on_chunk, batch_size=e.batch_size)


def _weights_of(source: Path) -> Path:
    return source / "transformer_ema" if (source / "transformer_ema").is_dir() else source


def score_file(path: Path, real_features: torch.Tensor) -> dict:
    """The metrics of a samples file: the one path by which every number of the report is computed."""
    data = read_safetensors(path)
    return quality(data["videos"], data["labels"], real_features)


def evaluate_entry(entry: Entry, cfg: Config, out: Path, real_features: dict, device: torch.device,
                   weights_sha256: str) -> dict:
    """Sample, save and score one model, or reuse its finished result (same `weights_sha256` and
    settings). Returns its report entry."""
    samples = out / "samples"
    n, f = cfg.evaluate.num_videos, cfg.data.frames
    long_f = f * cfg.evaluate.long_factor
    fingerprint = {"sha256": weights_sha256, "few_step": entry.few_step,
                   "num_videos": n, "frames": f, "long_frames": long_f, "seed": cfg.evaluate.seed,
                   "batch_size": cfg.evaluate.batch_size, "student": repr(cfg.student), "device": str(device),
                   "real": [cfg.evaluate.real_videos, cfg.evaluate.real_seed]}
    record = samples / f"{entry.name}.json"
    done = json.loads(record.read_text()) if record.is_file() else {}
    if done.get("fingerprint") == fingerprint:
        print(f"[evaluate] {entry.name}: done already ({record.name})")
        return done["result"]
    sampler = Sampler(entry, cfg, device)
    labels = balanced_labels(n)
    print(f"[evaluate] {entry.name}: {n} videos × {long_f} frames from {entry.source} ({sampler.desc['kind']})")
    with SpeedMeter(sampler.model) as meter:
        videos = sampler(labels, long_f, on_chunk=meter.clock)
    speed = meter.result(n, long_f)
    short = videos[:, :f] if sampler.causal else sampler(labels, f)
    paths = {"frames": samples / f"{entry.name}.safetensors", "long": samples / f"{entry.name}_long.safetensors"}
    save_samples(paths["frames"], short, labels, cfg.evaluate.preview_videos)
    save_samples(paths["long"], videos, labels, cfg.evaluate.preview_videos)
    result = {"source": str(entry.source), "sampler": sampler.desc,
              "samples": {k: str(p.relative_to(out)) for k, p in paths.items()},
              "frames": score_file(paths["frames"], real_features["frames"]),
              "long": score_file(paths["long"], real_features["long"]), "speed": speed}
    write_atomic(record, json.dumps({"fingerprint": fingerprint, "result": result}))
    return result


def run_benchmarks(names: list[str], stage_path: Path, student: Path | None) -> dict:
    """Run scripts of `benchmarks/` (each prints its figures; exit status 1 = goal missed) and keep
    their output in `benchmarks/<name>.txt`. Model-specific ones measure `student` (the distilled
    student, else student_init); the others take the stage's resolved config."""
    root = Path(__file__).resolve().parents[1]
    config = ["--config", os.path.abspath(stage_path / "config.yaml")]  # the scripts run in the checkout
    model = [os.path.abspath(student)] if student else config
    args = {"stream_cost": model, "forward_flops": model, "skyreels_stream": config, "dmd_step_cost": config}
    folder = stage_path / "benchmarks"
    folder.mkdir(exist_ok=True)
    out = {}
    for name in names:
        cmd = [sys.executable, str(root / "benchmarks" / f"{name}.py"), *args[name]]
        print(f"[evaluate] benchmark: {' '.join(cmd[1:])}")
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
        text = proc.stdout + proc.stderr
        write_atomic(folder / f"{name}.txt", text)
        out[name] = {"command": " ".join(["python", *cmd[1:]]), "exit_status": proc.returncode,
                     "output": text.strip().splitlines()[-12:]}
    return out


def real_reference(cfg: Config) -> tuple[dict, dict]:
    """Features of `evaluate.real_videos` real videos (training and long length) for the Fréchet
    distance, and the `real` row: `num_videos` other real videos scored like a model."""
    e, f = cfg.evaluate, cfg.data.frames
    long_f = f * e.long_factor
    ref = SpritesStream(cfg.data.size, long_f, e.real_seed).next_batch(e.real_videos)["videos"]
    features = {"frames": video_features(ref[:, :f]), "long": video_features(ref)}
    row = SpritesStream(cfg.data.size, long_f, e.real_seed + 1).next_batch(e.num_videos)
    return features, {"frames": quality(row["videos"][:, :f], row["labels"], features["frames"]),
                      "long": quality(row["videos"], row["labels"], features["long"])}


def run_text(cfg: Config, force: bool = False) -> StageDir:
    """Text runs (data.kind latents / prompts): every model's videos for `evaluate.prompts`, decoded by
    `components.vae`, in VBench's layout `<evaluate>/vbench/<model>/<prompt>-<i>.mp4` (VBench, not installed
    here, scores them). Resumable per model (`vbench/<model>.json` records what its videos came from)."""
    from pipeline.data.sources import latent_shape
    from pipeline.models.text_encoder import prompt_embeds
    from pipeline.models.vae import WanVAE
    from pipeline.evaluation.vbench import ChunkDecodeSink, write_text_samples
    from stages.prepare_data import read_prompts

    e = cfg.evaluate
    if e.prompts is None:
        raise ConfigError("evaluate.prompts must name a prompt file (one per line) for a text run "
                          f"(data.kind={cfg.data.kind}): evaluate writes each model's videos in VBench's layout")
    prompts = read_prompts(e.prompts)
    stage = StageDir(cfg.run.dir, "evaluate")
    if stage.done and not force:
        print(f"[evaluate] done already: {stage.path} (use --force to rerun)")
        return stage
    seed = cfg.run.seed if e.seed is None else e.seed
    models = entries(cfg)
    stage.guard({**{f"model '{m.name}'": m.source for m in models}, "evaluate.prompts": e.prompts,
                 **component_inputs(cfg)}, force)
    stage.begin(to_yaml(cfg), {m.name: _weights_of(m.source) for m in models}, check_inputs=False)
    hashes = stage.manifest()["inputs"]
    folder = stage.path / "vbench"
    folder.mkdir(exist_ok=True)
    context, null = prompt_embeds(cfg, prompts, folder / ".cache")
    vae = WanVAE.from_config(cfg)
    device = run_device(cfg)
    outputs = {}
    with torch.no_grad():
        for m in models:
            fingerprint = {"sha256": hashes[m.name]["sha256"], "prompts": prompts, "few_step": m.few_step,
                           "per_prompt": e.videos_per_prompt, "seed": seed, "student": repr(cfg.student)}
            record = folder / f"{m.name}.json"
            if not force and record.is_file() and json.loads(record.read_text()) == fingerprint:
                print(f"[evaluate] {m.name}: done already ({record.name})")
            else:
                model, _, mcfg = load_source(m.source)
                if not (m.source / "manifest.json").is_file():  # a bare folder: the run's samplers
                    mcfg = cfg
                few = m.few_step and mcfg.pretrain_teacher.attention == "block_causal"  # else: no KV cache
                if few:
                    mcfg = replace(mcfg, student=cfg.student)
                print(f"[evaluate] {m.name}: {len(prompts)} prompts × {e.videos_per_prompt} videos from {m.source}")
                sink = ChunkDecodeSink(vae)  # each chunk decoded as the sampler finishes it
                write_text_samples(model.to(device), mcfg, prompts, context, null, vae, folder / m.name,
                                   e.videos_per_prompt, latent_shape(cfg), seed, e.batch_size,
                                   few_step=True if few else None, sink=sink)
                print(f"[evaluate] {m.name}: VAE decode per chunk: {sink.summary()}")
                write_atomic(record, json.dumps(fingerprint))
            outputs[m.name] = str(folder / m.name)
    stage.finish(outputs, {"prompts": len(prompts), "videos_per_prompt": e.videos_per_prompt})
    print(f"[evaluate] wrote VBench folders under {folder}")
    return stage


def run(cfg: Config, force: bool = False) -> StageDir:
    """Evaluate every model of the run; returns the stage folder."""
    if cfg.data.kind != "sprites":
        return run_text(cfg, force)
    stage = StageDir(cfg.run.dir, "evaluate")
    if stage.done and not force:
        print(f"[evaluate] done already: {stage.path} (use --force to rerun)")
        return stage
    if int(os.environ.get("RANK", "0")) != 0:  # sampling is single-process: other ranks have nothing to do
        return stage
    if cfg.evaluate.seed is None:
        cfg.evaluate.seed = cfg.run.seed
    models = entries(cfg)
    stage.guard({f"model '{e.name}'": e.source for e in models}, force)
    stage.begin(to_yaml(cfg), {e.name: _weights_of(e.source) for e in models}, check_inputs=False)
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
            results[e.name] = evaluate_entry(e, cfg, out, features, device, hashes[e.name]["sha256"])
    ev = cfg.evaluate
    report = {"schema_version": SCHEMA_VERSION,
              "settings": {"run_dir": cfg.run.dir, "num_videos": ev.num_videos, "seed": ev.seed,
                           "frames": cfg.data.frames, "long_frames": cfg.data.frames * ev.long_factor,
                           "batch_size": ev.batch_size, "device": str(device), "threads": torch.get_num_threads(),
                           "dtype": "float32", "real_videos": ev.real_videos, "real_seed": ev.real_seed,
                           "features": list(FEATURES)},
              "models": results, "real": real}
    if ev.benchmarks:
        student = next((e.source for e in reversed(models) if e.name in ("student", "student_init")), None)
        report["benchmarks"] = run_benchmarks(ev.benchmarks, out, student)
    outputs = write_report(report, out)
    metrics = {name: {"lawful_transitions": r["frames"]["lawful_transitions"],
                      "valid_frames_long": r["long"]["valid_frames"], "frames_per_s": r["speed"]["frames_per_s"]}
               for name, r in results.items()}
    stage.finish(outputs, metrics)
    print(f"[evaluate] wrote {out / 'report.md'}")
    return stage


def main(argv=None) -> int:
    return stage_main("evaluate", run, argv)


if __name__ == "__main__":
    sys.exit(main())
