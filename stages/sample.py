"""`./launch.sh sample SOURCE --out FILE.safetensors [--n N] [--frames F] [--steps K] [--seed S] [--guidance G]`

SOURCE is a stage folder (e.g. `runs/tiny/init_student`: its EMA weights, class-embedding table and
config) or a diffusers model folder (then the sampler and conditioning come from the default config and
its `sampling.json`). Teachers sample with their many-step sampler; students (the role in their
`sampling.json`) with the few-step chunk-wise sampler, `--steps K` replacing their step list by K evenly
spaced steps. Any `--frames` (a multiple of the chunk): past the window, the KV cache rolls.

Writes `videos` float32 `[N, F, 3, S, S]` in [-1, 1] and `labels` int64 `[N]` (balanced over the
classes) to FILE and a GIF preview grid next to it; prints frames/s and the first chunk's latency.

`--rolling` (students): rolling-window joint denoising (`sampling.sample_rolling`): the window of chunks at
staggered levels, one chunk finished per network call after warm-up.

Prompt switching (SPRITES.md "Switched videos"): `--switch-at K [K2 ...]` switches every video's class at
frame K (it takes effect from the first chunk starting at or after K); `--switch-to shift` (default: class c
becomes (c + 1) mod 6) or a class id 0..5. `--recache` rebuilds the KV window under the new class at the switch
(LongLive's re-cache); without it the cache is kept. FILE then also holds `schedule` int64 `[N, F]`, the class
of every frame (`labels` stays the first class), and the switch metrics are printed
(`pipeline/evaluation/switching.py`).
`--kv-cache static|dynamic|auto` picks the streaming cache (default: the run's; auto = static on CUDA) and
`--compile` compiles the calls a static cache repeats (`CausalWanTransformer.compile_steady_state`).
`--n`, `--frames`, `--steps` must be positive, `--guidance` finite and >= 0, `--seed` in 0 .. 2**32-1;
weights holding NaN or inf are refused; a source whose head count cannot be read off it needs `--model-config`.
An existing FILE or GIF is replaced only with `--force`; FILE must not be SOURCE, lie inside it or contain
it (refused even with `--force`); one command at a time per FILE (`pipeline/io/guard.py`).

Text-conditioned latent models (data.kind latents / prompts):

    ./launch.sh sample SOURCE --prompts FILE --vbench-dir DIR [--per-prompt 5] [--vae PATH]
                       [--text-encoder PATH] [--tokenizer PATH] [--frames F] [--steps K] [--seed S]

(a line `a cat walks || 6: the cat sits` switches the prompt at latent frame 6, `--recache` choosing the cache
policy; each such line is sampled alone) encode every prompt of FILE with the text encoder (cached in
DIR/.cache), sample `--per-prompt` videos
each, decode them with the VAE chunk by chunk as the sampler finishes them (the mean decode time per chunk is
printed) and write `DIR/<prompt>-<i>.mp4` (VBench's layout, `pipeline/evaluation/vbench.py`).
`--vae` / `--text-encoder` / `--tokenizer` default to the model's config (`components.*`).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from pipeline.cli import run_command
from pipeline.config import MAX_SEED, Config, Range, SamplerConfig
from pipeline.data.sprites import balanced_labels
from pipeline.diffusion.sampling import uniform_denoising_steps
from pipeline.diffusion.videos import sample_videos
from pipeline.evaluation.speed import ChunkClock
from pipeline.io.guard import Lock, check_output
from pipeline.io.media import save_samples
from pipeline.models.kv_cache import CACHE_KINDS
from pipeline.models.loading import for_inference, is_student, load_source
from pipeline.training.distributed import mixed_precision, run_device


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="./launch.sh sample")
    ap.add_argument("source")
    ap.add_argument("--out", help="samples file (sprites models)")
    ap.add_argument("--n", type=int, default=96)
    ap.add_argument("--frames", type=int)
    ap.add_argument("--steps", type=int, help="teacher: Euler steps; student: K evenly spaced denoising steps "
                                              "(default: the student's own list)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--guidance", type=float, help="teacher only (students are distilled without guidance)")
    ap.add_argument("--sampler", choices=["autoregressive", "synchronous"], help="teacher only")
    ap.add_argument("--lag", type=int, help="teacher only: frame j of a chunk starts lag*j Euler steps late (0: "
                                            "every frame of a chunk at one level, as teacher forcing trains)")
    ap.add_argument("--raw", action="store_true", help="use the raw weights instead of the EMA")
    ap.add_argument("--precision", choices=["auto", "no", "bf16"],
                    help="the transformer's compute: bf16 (matmul weights in bf16, calls under autocast) or no (fp32); "
                         "default: the source run's run.mixed_precision (auto: bf16 on a GPU that supports it)")
    ap.add_argument("--kv-cache", choices=CACHE_KINDS,
                    help="the streaming KV cache: static (preallocated, written in place), dynamic (the reference) or "
                         "auto (static on CUDA); default: the source run's student.kv_cache / sampler.kv_cache")
    ap.add_argument("--compile", action="store_true",
                    help="compile the network calls a static cache repeats with the same shapes (the first chunk's, "
                         "then every call once the window is full): regional torch.compile, CUDA graphs on CUDA")
    ap.add_argument("--overlap-decode", action="store_true",
                    help="text models, CUDA VAE: decode each chunk on the VAE's own CUDA stream while the sampler goes "
                         "on (the same videos)")
    ap.add_argument("--switch-at", type=int, nargs="+", metavar="K",
                    help="sprites: switch every video's class at these frames (prompt switching)")
    ap.add_argument("--switch-to", default="shift", help="sprites: 'shift' ((c + 1) mod 6) or a class id 0..5")
    ap.add_argument("--recache", action="store_true", help="rebuild the KV window under the new prompt at a switch")
    ap.add_argument("--rolling", action="store_true", help="student: rolling-window joint denoising (one chunk "
                                                          "finished per network call after warm-up)")
    ap.add_argument("--model-config", help="a diffusers config.json for a source without one whose head count cannot "
                                           "be read off its weights (as convert's)")
    ap.add_argument("--prompts", help="text models: prompt file, one per line")
    ap.add_argument("--vbench-dir", help="text models: folder for <prompt>-<i>.mp4")
    ap.add_argument("--per-prompt", type=int, default=5, help="text models: videos per prompt (VBench: 5)")
    ap.add_argument("--vae", help="text models: VAE folder (default: the config's components.vae)")
    ap.add_argument("--text-encoder", help="text models: UMT5 or pipeline folder (default: components.text_encoder)")
    ap.add_argument("--tokenizer", help="text models: tokenizer folder (default: components.tokenizer)")
    ap.add_argument("--force", action="store_true", help="replace an existing --out and its .gif (or existing videos "
                                                         "in --vbench-dir); never SOURCE or anything inside it")
    args = ap.parse_args(argv)
    command = f"{ap.prog} {shlex.join(sys.argv[1:] if argv is None else [str(a) for a in argv])}"
    if args.prompts or args.vbench_dir:
        return sample_text(args, command)
    if args.out is None:
        ap.error("--out is required (or --prompts and --vbench-dir for a text model)")
    return run_command(lambda: sample_sprites(args, command))


def sample_sprites(args, command: str = "") -> int:
    """`sample SOURCE --out FILE`: videos of a class-conditioned (sprites) model and their preview."""
    out = Path(args.out)
    lock = None
    try:
        check_numbers(args)
        if out.suffix != ".safetensors":
            raise ValueError(f"--out must end in .safetensors, got {out}")
        model, table, cfg = load_source(args.source, args.raw, model_config=args.model_config)
        cfg: Config
        kv_cache_option(args, cfg)
        if table is None:
            raise ValueError(f"{args.source}: sampling needs class prompts (a sprites model); latent models are "
                             "evaluated by the evaluate stage")
        frames = args.frames or cfg.data.frames
        fpc = cfg.data.frames_per_chunk
        if frames % fpc:
            raise ValueError(f"--frames ({frames}) must be a multiple of frames_per_chunk ({fpc})")
        labels = balanced_labels(args.n)
        schedule = switch_labels(args, labels, frames, fpc)
        lock = guard_outputs(out, {"SOURCE": args.source}, args.force, command)
        clock = ChunkClock()
        steps, sampler = None, None
        if is_student(model):  # its few-step sampler (the sampler follows the model's role, `sample_videos`)
            if args.guidance is not None or args.sampler or args.lag is not None:
                raise ValueError("--guidance, --sampler and --lag apply to teachers; a student samples with its "
                                 "few-step sampler (--steps K)")
            if args.rolling and schedule is not None:
                raise ValueError("--rolling does not take prompt switches (--switch-at)")
            steps = uniform_denoising_steps(args.steps) if args.steps else None
            what = f"{len(steps or cfg.student.denoising_steps)}-step student"
        else:
            sampler = replace(cfg.pretrain_teacher.sampler, **{k: v for k, v in dict(
                steps=args.steps, guidance=args.guidance, kind=args.sampler, lag=args.lag).items() if v is not None})
            what = f"teacher ({sampler.kind}, {sampler.steps} steps)"
            if args.rolling:
                raise ValueError("--rolling is a student's sampler (few-step levels); this SOURCE is a teacher")
        device = next(model.parameters()).device  # (sprites models sample where they were loaded)
        model = for_inference(model, device, inference_precision(cfg, args.precision, device))
        compile_option(args, cfg, model)
        videos = sample_videos(model, table, labels if schedule is None else schedule, frames=frames,
                               size=cfg.data.size, frames_per_chunk=fpc, prediction=cfg.model.prediction,
                               student=cfg.student, sampler=sampler, attention=cfg.pretrain_teacher.attention,
                               seed=args.seed, denoising_steps=steps, on_chunk=clock, recache=args.recache,
                               rolling=args.rolling)
        elapsed = time.perf_counter() - clock.start
        preview = save_samples(out, videos, labels, force=args.force, schedule=schedule)
    finally:
        if lock is not None:
            lock.release()
    print(f"wrote {out} ({len(videos)} videos × {frames} frames) and {preview}")
    if schedule is not None:
        from pipeline.evaluation.switching import score_switched

        s = {k: "-" if v is None else f"{v:.3f}" for k, v in score_switched(videos, schedule, fpc).items()
             if k in ("post_switch_valid", "first_chunk_valid", "lawful_across_switch", "valid_frames",
                      "lawful_transitions")}  # None: no frame after the switch (it fell in the last chunk)
        print(f"switches at {args.switch_at} ({'re-cached' if args.recache else 'cache kept'}): "
              f"new class after the switch {s['post_switch_valid']}, first chunk {s['first_chunk_valid']}, "
              f"lawful across the switch {s['lawful_across_switch']}, valid frames {s['valid_frames']}, "
              f"lawful {s['lawful_transitions']}")
    speed = f"{what}: {len(videos) * frames / elapsed:.1f} frames/s ({elapsed:.2f} s)"
    if clock.times:
        speed += f", first chunk after {clock.times[0] * 1000:.0f} ms (batch of {min(len(videos), 64)})"
    print(speed)
    return 0


def kv_cache_option(args, cfg: Config) -> None:
    """`--kv-cache` into `cfg`'s student and teacher-sampler sections (what the samplers read)."""
    if args.kv_cache:
        cfg.student = replace(cfg.student, kv_cache=args.kv_cache)
        cfg.pretrain_teacher.sampler = replace(cfg.pretrain_teacher.sampler, kv_cache=args.kv_cache)


def compile_option(args, cfg: Config, model) -> None:
    """`--compile`: `CausalWanTransformer.compile_steady_state` (on the device the model computes on), used by the
    calls of a static cache; said when the cache here is the reference one."""
    if args.compile:
        model.compile_steady_state()
        section = cfg.student if is_student(model) else cfg.pretrain_teacher.sampler
        device = next(model.parameters()).device
        if section.kv_cache == "dynamic" or (section.kv_cache == "auto" and device.type != "cuda"):
            print(f"sample: --compile does nothing here: the KV cache is the reference one ({section.kv_cache} on "
                  f"{device.type}); --kv-cache static uses the compiled calls", file=sys.stderr)


def inference_precision(cfg: Config, choice: str | None, device: torch.device) -> str:
    """`--precision` (None: the source run's `run.mixed_precision`), `auto` resolved for the `device` the model
    computes on (bf16 on a GPU that supports it)."""
    run = replace(cfg.run, mixed_precision=choice or cfg.run.mixed_precision, device=device.type)
    return mixed_precision(replace(cfg, run=run))


def switch_labels(args, labels: torch.Tensor, frames: int, fpc: int) -> torch.Tensor | None:
    """`--switch-at` / `--switch-to` as a class schedule `[N, frames]` (None without switches)."""
    from pipeline.data.sprites import switch_schedule

    if not args.switch_at:
        if args.recache or args.switch_to != "shift":
            raise ValueError("--recache and --switch-to need --switch-at K")
        return None
    to = args.switch_to
    if to != "shift":
        if not to.isdigit():
            raise ValueError(f"--switch-to must be 'shift' or a class id 0..5, got {to!r}")
        to = int(to)
    try:
        return switch_schedule(labels, frames, args.switch_at, to)
    except ValueError as e:
        raise ValueError(f"--switch-at / --switch-to: {e}") from None


def check_numbers(args) -> None:
    """The numeric options, before anything is read or written: each against the range the config declares
    for the value it replaces (`--steps`, `--guidance`: the teacher sampler's; `--seed`: a random seed's),
    counts positive. Nothing falls back to a default silently (`--frames 0` was the config's frames)."""
    sampler = SamplerConfig.__dataclass_fields__
    positive = Range(lo=0, lo_open=True)
    for flag, value, rng in (("--n", args.n, positive), ("--frames", args.frames, positive),
                             ("--per-prompt", args.per_prompt, positive),
                             ("--steps", args.steps, sampler["steps"].metadata["range"]),
                             ("--guidance", args.guidance, sampler["guidance"].metadata["range"]),
                             ("--lag", args.lag, sampler["lag"].metadata["range"]),
                             ("--seed", args.seed, Range(lo=0, hi=MAX_SEED))):
        bad = rng.problem(flag, value)
        if bad:
            raise ValueError(bad)


def guard_outputs(out: Path, inputs: dict, force: bool, command: str) -> Lock:
    """The output rule for `--out` and its `.gif` (`pipeline/io/guard.py`): not SOURCE, inside it or
    containing it; not existing unless `--force`. Returns the lock of `--out`, taken (checked again under it)."""
    paths = {"--out": out, "--out's preview": out.with_suffix(".gif")}
    for what, p in paths.items():
        check_output(p, inputs, force, what)
    lock = Lock(out, command).acquire()
    try:
        for what, p in paths.items():
            check_output(p, inputs, force, what)
    except BaseException:
        lock.release()
        raise
    return lock


def sample_text(args, command: str = "") -> int:
    """`sample --prompts FILE --vbench-dir DIR`: decoded videos of a text-conditioned latent model."""
    return run_command(lambda: _sample_text(args, command))


def _sample_text(args, command: str) -> int:
    from pipeline.data.prompts import parse_schedule, read_prompts
    from pipeline.data.sources import latent_shape
    from pipeline.evaluation.vbench import ChunkDecodeSink, vbench_name, write_text_samples
    from pipeline.models.text_encoder import prompt_embeds
    from pipeline.models.vae import WanVAE

    lock = None
    try:
        if not (args.prompts and args.vbench_dir):
            raise ValueError("text models need both --prompts FILE and --vbench-dir DIR")
        if args.guidance is not None or args.sampler or args.lag is not None:
            raise ValueError("--guidance, --sampler and --lag are not options of text sampling (the config's sampler "
                             "is used)")
        check_numbers(args)
        if args.switch_at or args.rolling:
            raise ValueError("--switch-at and --rolling are sprites options; text prompts switch inside the prompt "
                             "file ('a cat walks || 6: the cat sits')")
        prompts = read_prompts(args.prompts)
        model, _, cfg = load_source(args.source, args.raw,  # a bare folder: default config + --vae etc.
                                    model_config=args.model_config)
        kv_cache_option(args, cfg)
        c = cfg.components
        for key, val in (("text_encoder", args.text_encoder), ("tokenizer", args.tokenizer), ("vae", args.vae)):
            if val is not None:
                setattr(c, key, val)
        c.text_encoder_offload = True  # the encoder runs once, before the transformer
        frames = args.frames or cfg.data.frames
        if frames % cfg.data.frames_per_chunk:
            raise ValueError(f"--frames ({frames}) must be a multiple of frames_per_chunk ({cfg.data.frames_per_chunk})")
        out = Path(args.vbench_dir)
        # The output rule (pipeline/io/guard.py): the folder may exist (its .cache is reused), but must not be
        # or hold an input; the videos it gets must not exist unless --force.
        inputs = {"SOURCE": args.source, "--prompts": args.prompts, "components.vae (--vae)": c.vae,
                  "components.text_encoder (--text-encoder)": c.text_encoder,
                  "components.tokenizer (--tokenizer)": c.tokenizer}
        check_output(out, inputs, what="--vbench-dir", exists_ok=True)
        videos = [out / vbench_name(p, i) for p in prompts for i in range(args.per_prompt)]
        for v in videos:
            check_output(v, None, args.force, "--vbench-dir video")
        lock = Lock(out, command).acquire()
        for v in videos:
            check_output(v, None, args.force, "--vbench-dir video")
        vae = WanVAE.from_config(cfg)
        lines = [parse_schedule(p) for p in prompts]  # `first || K: next ...`: prompt switches
        texts = list(dict.fromkeys(t for line in lines for _, t in line))
        rows, null = prompt_embeds(cfg, texts, out / ".cache")
        context = rows[[texts.index(line[0][1]) for line in lines]]
        schedules = [[(k, texts.index(t)) for k, t in line[1:]] for line in lines]
        bad = [k for line in lines for k, _ in line if k >= frames]
        if bad:
            raise ValueError(f"--prompts: a switch at latent frame {bad[0]} lies past the video ({frames} latent frames)")
        shape = (*latent_shape(cfg)[:1], frames, *latent_shape(cfg)[2:])
        device = run_device(cfg)
        steps = uniform_denoising_steps(args.steps) if args.steps and is_student(model) else None
        clock = ChunkClock()
        # decodes each chunk as the sampler finishes it (--overlap-decode: beside the sampling); times each decode
        sink = ChunkDecodeSink(vae, overlap=args.overlap_decode)
        model = for_inference(model, device, inference_precision(cfg, args.precision, device))
        compile_option(args, cfg, model)
        paths = write_text_samples(model, cfg, prompts, context, null, vae, out, args.per_prompt, shape,
                                   args.seed, denoising_steps=steps,
                                   steps=args.steps if not is_student(model) else None, on_chunk=clock, sink=sink,
                                   force=args.force, schedules=[[(k, rows[j]) for k, j in sc] for sc in schedules],
                                   recache=args.recache)
    finally:
        if lock is not None:
            lock.release()
    print(f"wrote {len(paths)} videos ({len(prompts)} prompts × {args.per_prompt}) to {out} "
          f"({time.perf_counter() - clock.start:.1f} s with decoding)")
    how = "on the VAE's own CUDA stream beside the sampling" if sink.decoder.side is not None else "as each finished"
    print(f"VAE decode per chunk (decoded {how}): {sink.summary()}")
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
