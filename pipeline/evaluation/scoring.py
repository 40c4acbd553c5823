"""Each model of an evaluation sampled, saved and scored (`evaluate_entry`; text models: `evaluate_text_entry`),
and the real-video reference every score is measured against (`real_reference`).

Every model draws the same noise (`evaluate.seed`) for the same balanced class labels and generates
`evaluate.long_factor` × `data.frames` frames. Training-length numbers are read off the first `data.frames`
frames of the long rollout: a causal sampler never looks ahead, so they are what a rollout of that length
gives (a non-causal sampler — synchronous or bidirectional — samples the short videos separately). A finished
model is not sampled again when the stage resumes (`samples/<model>.json` records its result and what it was
computed from).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from pipeline.config import Config
from pipeline.data.sprites import SpritesStream, balanced_labels, switch_schedule
from pipeline.evaluation.metrics import quality, video_features
from pipeline.evaluation.models import Entry, ModelSampler
from pipeline.evaluation.speed import SpeedMeter
from pipeline.evaluation.switching import SWITCH_KEYS, score_switched
from pipeline.io.media import save_samples
from pipeline.io.run_dir import write_atomic
from pipeline.training.checkpoint import read_safetensors


def score_file(path: Path, real_features: torch.Tensor) -> dict:
    """The metrics of a samples file: the one path by which every number of the report is computed."""
    data = read_safetensors(path)
    return quality(data["videos"], data["labels"], real_features)


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


def evaluate_entry(entry: Entry, cfg: Config, *, out: Path, real_features: dict, device: torch.device,
                   weights_sha256: str) -> dict:
    """Sample, save and score one model into `out/samples/`, or reuse its finished result (same
    `weights_sha256` and settings). `real_features`: `real_reference`'s. Returns its report entry."""
    samples = out / "samples"
    n, f = cfg.evaluate.num_videos, cfg.data.frames
    long_f = f * cfg.evaluate.long_factor
    fingerprint = {"sha256": weights_sha256, "few_step": entry.few_step,
                   "num_videos": n, "frames": f, "long_frames": long_f, "seed": cfg.evaluate.seed,
                   "batch_size": cfg.evaluate.batch_size, "student": repr(cfg.student), "device": str(device),
                   "real": [cfg.evaluate.real_videos, cfg.evaluate.real_seed], "switch_at": cfg.evaluate.switch_at}
    record = samples / f"{entry.name}.json"
    done = json.loads(record.read_text()) if record.is_file() else {}
    if done.get("fingerprint") == fingerprint:
        print(f"[evaluate] {entry.name}: done already ({record.name})")
        return done["result"]
    sampler = ModelSampler(entry, cfg, device)
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
    if cfg.evaluate.switch_at is not None:
        result["switch"] = switched(sampler, labels, long_f, cfg.evaluate.switch_at, cfg.data.frames_per_chunk)
    write_atomic(record, json.dumps({"fingerprint": fingerprint, "result": result}))
    return result


def switched(sampler: ModelSampler, labels: torch.Tensor, frames: int, at: int, fpc: int) -> dict | None:
    """The long rollouts again with every class c becoming (c + 1) mod 6 at frame `at`, the cache kept and
    re-cached (LongLive's): `{"kept": {SWITCH_KEYS...}, "recache": {...}}`; None for a model that is not
    causal (a synchronous or bidirectional sampler denoises every frame at once: no running video to steer)."""
    if not sampler.causal:
        return None
    schedule = switch_schedule(labels, frames, at)
    out = {}
    for name, recache in (("kept", False), ("recache", True)):
        s = score_switched(sampler(schedule, frames, recache=recache), schedule, fpc)
        out[name] = {k: s[k] for k in SWITCH_KEYS}
    return out


def evaluate_text_entry(entry: Entry, cfg: Config, *, folder: Path, prompts: list[str], context: torch.Tensor,
                        null: torch.Tensor, vae, seed: int, device: torch.device, weights_sha256: str,
                        force: bool = False) -> Path:
    """A text model's videos for `prompts` (`context [P, L, D]` their embeddings, `null [1, L, D]` the empty
    prompt's), decoded by `vae` chunk by chunk, in VBench's layout `<folder>/<model>/<prompt>-<i>.mp4`; skipped
    when `<folder>/<model>.json` records the same weights and settings (unless `force`). Returns the folder."""
    from pipeline.data.sources import latent_shape
    from pipeline.evaluation.vbench import ChunkDecodeSink, write_text_samples
    from pipeline.models.loading import for_inference, load_source
    from pipeline.training.distributed import mixed_precision

    e = cfg.evaluate
    fingerprint = {"sha256": weights_sha256, "prompts": prompts, "few_step": entry.few_step,
                   "per_prompt": e.videos_per_prompt, "seed": seed, "student": repr(cfg.student)}
    record = folder / f"{entry.name}.json"
    if not force and record.is_file() and json.loads(record.read_text()) == fingerprint:
        print(f"[evaluate] {entry.name}: done already ({record.name})")
        return folder / entry.name
    model, _, mcfg = load_source(entry.source)
    if not (entry.source / "manifest.json").is_file():  # a bare folder: the run's samplers
        mcfg = cfg
    few = entry.few_step and mcfg.pretrain_teacher.attention == "block_causal"  # else: no KV cache
    if few:
        mcfg = replace(mcfg, student=cfg.student)
    print(f"[evaluate] {entry.name}: {len(prompts)} prompts × {e.videos_per_prompt} videos from {entry.source}")
    sink = ChunkDecodeSink(vae)  # each chunk decoded as the sampler finishes it
    model = for_inference(model, device, mixed_precision(cfg))  # bf16 where the run computes in it
    write_text_samples(model, mcfg, prompts, context, null, vae, folder / entry.name,
                       e.videos_per_prompt, latent_shape(cfg), seed, e.batch_size,
                       few_step=True if few else None, sink=sink)
    print(f"[evaluate] {entry.name}: VAE decode per chunk: {sink.summary()}")
    write_atomic(record, json.dumps(fingerprint))
    return folder / entry.name
