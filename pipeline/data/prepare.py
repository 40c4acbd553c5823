"""Data preparation for the real-scale path: videos or prompts -> safetensors shards in `data.path`
(`prepare_shards`; the command is `stages/prepare_data.py`).

- `data.kind=latents`: every `.mp4` / `.gif` in `data.videos` (sorted by name), captioned by the
  same-named `.txt` file beside it (`clip.mp4` -> `clip.txt`, whole file = one prompt; a video without
  one is an error), is read with imageio, its first `data.pixel_frames` frames resized (short side,
  bilinear with antialiasing) and centre-cropped to `data.pixel_size`, scaled to [-1, 1]
  (`pipeline/data/video_files.py`), encoded by the VAE (`pipeline/models/vae.py`: normalised posterior mode)
  and its caption by the text encoder (`pipeline/models/text_encoder.py`). Shards `shard_XXXXX.safetensors`
  hold `latents [N, C, F, H, W]` and `prompt_embeds [N, L, D]` — what `pipeline/data/sources.py: LatentSource`
  reads.
- `data.kind=prompts`: every non-empty line of `data.prompts` -> shards holding `prompt_embeds [N, L, D]`
  (`PromptSource`): Self-Forcing's SF+DMD trains on prompts alone.

Both write `null_embeds.safetensors` (`prompt_embeds [1, L, D]` of the empty prompt) and `prepare.json`
(what was encoded, with which components). Each shard is written through `pipeline.io.guard.replacing`
(a temporary name, then renamed); a re-run keeps every finished shard (its metadata lists the inputs it
holds; a shard written for other inputs is an error unless `force`, which deletes the shards prepare_data
wrote, and only those, first) and only loads the encoders when something is left to encode. `data.path`
must not be, lie inside or contain an input (refused even with `force`); an existing folder prepare_data did
not write needs `force`; one command at a time per `data.path` (`pipeline/io/guard.py`). Prompts in the
shards' metadata (`prompts`, JSON) keep them readable.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm

from pipeline.config import Config, ConfigError, to_yaml
from pipeline.data.prompts import read_prompts
from pipeline.data.shard_files import SHARD_GLOB, shard_path
from pipeline.data.sources import latent_shape
from pipeline.data.video_files import list_videos, load_video
from pipeline.io.guard import GuardError, Lock, check_output, replacing
from pipeline.io.run_dir import write_atomic

NULL_EMBEDS = "null_embeds.safetensors"


def shard_items(path: Path) -> tuple[list[str], list[str]] | None:
    """The inputs (video names or prompts) and the prompts a finished shard holds (its metadata), or None
    if it is not a readable shard."""
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        return json.loads(meta.get("items", "null")), json.loads(meta.get("prompts", "null"))
    except Exception:  # a truncated or foreign file
        return None


def ours(path: Path) -> bool:
    """A shard (or null_embeds file) prepare_data wrote: its metadata lists its inputs."""
    found = shard_items(path)
    return found is not None and found[0] is not None


def _write(path: Path, tensors: dict, metadata: dict) -> None:
    """A shard file through the one writer (a temporary beside it, renamed when whole)."""
    with replacing(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


class Encoders:
    """The text encoder and VAE, loaded on first use (a finished folder loads neither)."""

    def __init__(self, cfg: Config):
        self.cfg, self._text, self._vae = cfg, None, None

    @property
    def text(self):
        if self._text is None:
            from pipeline.models.text_encoder import TextEncoder
            self._text = TextEncoder.from_config(self.cfg)
        return self._text

    @property
    def vae(self):
        if self._vae is None:
            from pipeline.models.vae import WanVAE
            self._vae = WanVAE.from_config(self.cfg)
        return self._vae


def check_components(cfg: Config, videos: bool) -> None:
    """Fail in one line naming a missing local component path before any work."""
    from pipeline.models.text_encoder import resolve_component, resolve_tokenizer

    c = cfg.components
    resolve_component(c.text_encoder, "text_encoder", "components.text_encoder")
    resolve_tokenizer(c.text_encoder, c.tokenizer)
    if videos:
        resolve_component(c.vae, "vae", "components.vae")


def prepare_shards(cfg: Config, *, force: bool = False, command: str = "prepare_data") -> Path:
    """Write (or finish writing) the shards of `data.path`; returns the folder. `command` names the holder
    of the folder's lock (shown to a second command)."""
    d = cfg.data
    if d.kind not in ("latents", "prompts"):
        raise ConfigError(f"prepare_data: data.kind must be latents (videos) or prompts, got '{d.kind}'")
    if d.path is None:
        raise ConfigError("prepare_data: data.path must name the output folder of the shards")
    videos = d.kind == "latents"
    if videos:
        if d.videos is None or d.pixel_size is None or d.pixel_frames is None:
            raise ConfigError("prepare_data with data.kind=latents needs data.videos, data.pixel_size and "
                              "data.pixel_frames")
        items = list_videos(d.videos)
        names, prompts = [v.name for v, _ in items], [p for _, p in items]
    else:
        if d.prompts is None:
            raise ConfigError("prepare_data with data.kind=prompts needs data.prompts (a file, one prompt per line)")
        prompts = read_prompts(d.prompts)
        names = prompts
    out = Path(d.path)
    # The output rule (pipeline/io/guard.py): data.path must not be, lie inside or contain what is read; an
    # existing folder prepare_data did not write is written into only with force.
    c = cfg.components
    check_output(out, {"data.videos": d.videos if videos else None, "data.prompts": None if videos else d.prompts,
                       "components.text_encoder": c.text_encoder, "components.tokenizer": c.tokenizer,
                       "components.vae": c.vae if videos else None}, what="data.path", exists_ok=True)
    if out.is_dir() and not force:
        others = [p.name for p in out.iterdir() if not p.name.startswith(".")]
        mine = ("prepare.json", NULL_EMBEDS)
        if others and not any(n in mine or n.startswith("shard_") for n in others):
            raise GuardError(f"data.path {out} exists and was not written by prepare_data (it holds {others[0]}); "
                             "choose another folder or pass --force to write into it")
    check_components(cfg, videos)
    with Lock(out, command):  # one command at a time per data.path
        return write_shards(cfg, out, names=names, prompts=prompts, videos=videos, force=force)


def write_shards(cfg: Config, out: Path, *, names: list[str], prompts: list[str], videos: bool,
                 force: bool = False) -> Path:
    """`prepare_shards` once the inputs are read and the output folder is guarded and locked: `names` (video
    file names, or the prompts) and their `prompts`, in order; `videos`: encode videos too (data.kind latents)."""
    d, pc = cfg.data, cfg.prepare_data
    if force:  # a rebuild: the shards prepare_data wrote go; anything else stays
        for p in [*out.glob(SHARD_GLOB), out / NULL_EMBEDS]:
            if p.is_file() and ours(p):
                p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    cache = Path(pc.cache_dir) if pc.cache_dir else out / ".cache"
    enc = Encoders(cfg)

    starts = list(range(0, len(names), pc.shard_size))
    todo = []
    for i, s in enumerate(starts):
        path = shard_path(out, i)
        if path.is_file() and not force:
            if shard_items(path) == (names[s:s + pc.shard_size], prompts[s:s + pc.shard_size]):
                continue
            raise ValueError(f"{path} holds other inputs than the current {'videos' if videos else 'prompts'} "
                             "(the input list or a caption changed); rerun with --force to rebuild the folder")
        todo.append(i)
    extra = sorted(set(out.glob(SHARD_GLOB)) - {shard_path(out, i) for i in range(len(starts))})
    if extra:
        if not ours(extra[0]):
            raise ValueError(f"{extra[0]} is beyond the {len(starts)} shards of the current inputs and was not "
                             "written by prepare_data; move it out of data.path")
        raise ValueError(f"{extra[0]} is beyond the {len(starts)} shards of the current inputs; rerun with --force")

    null_path = out / NULL_EMBEDS
    if force or not null_path.is_file():
        _write(null_path, {"prompt_embeds": enc.text.encode_cached([""], cache)}, {"items": json.dumps([""])})
    expect = latent_shape(cfg)
    for i in tqdm(todo, desc=f"prepare_data ({d.kind} shards)", disable=not todo):
        s = starts[i]
        want, texts = names[s:s + pc.shard_size], prompts[s:s + pc.shard_size]
        tensors = {}
        if videos:
            lat = []
            for b in range(0, len(want), pc.batch_size):
                clip = torch.stack([load_video(Path(d.videos) / n, tuple(d.pixel_size), d.pixel_frames)
                                    for n in want[b:b + pc.batch_size]])
                z = enc.vae.encode(clip)
                if tuple(z.shape[1:]) != expect:
                    raise ConfigError(
                        f"the VAE gives latents {list(z.shape[1:])} for data.pixel_size {d.pixel_size} x "
                        f"data.pixel_frames {d.pixel_frames}, but the config expects {list(expect)} "
                        "(model.in_channels, data.frames, data.latent_size)")
                lat.append(z)
            tensors["latents"] = torch.cat(lat).to(torch.bfloat16 if cfg.components.vae_dtype == "bf16"
                                                   else torch.float32)
            # Captions of a video shard go through the cache: a shard redone after a VAE failure re-encodes nothing.
            tensors["prompt_embeds"] = enc.text.encode_cached(texts, cache, pc.batch_size)
        else:  # the shard is its own cache: caching 512 x 4096 rows again would double the disk used
            tensors["prompt_embeds"] = enc.text.encode_prompts(texts, pc.batch_size)
        _write(shard_path(out, i), tensors, {"items": json.dumps(want), "prompts": json.dumps(texts)})
    info = {"kind": d.kind, "count": len(names), "shards": len(starts), "shard_size": pc.shard_size,
            "source": d.videos if videos else d.prompts,
            "components": {"text_encoder": cfg.components.text_encoder, "tokenizer": cfg.components.tokenizer,
                           "vae": cfg.components.vae if videos else None,
                           "max_sequence_length": cfg.components.max_sequence_length},
            "latent_shape": list(expect) if videos else None}
    write_atomic(out / "prepare.json", json.dumps(info, indent=1))
    write_atomic(out / "config.yaml", to_yaml(cfg))
    print(f"[prepare_data] {len(names)} {'videos' if videos else 'prompts'} in {len(starts)} shards in {out} "
          f"({len(todo)} written now)")
    return out
