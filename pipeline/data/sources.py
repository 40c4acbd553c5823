"""Training data sources behind one interface, so every trainer works on sprites or real latents.

A source yields batches `{"x0": [B, C, F, H, W] latents, "context": [B, L, D] prompt embeddings,
"labels": [B] int64 (or -1 when there are none)}` and gives the null prompt `null_context(B)` for
label dropout and guidance. Its `state_dict()` makes the stream resumable.

- `SpritesSource`: the procedural `sprites` videos (pixels are the latents, C = 3), class ids as
  prompts through the fixed class-embedding table.
- `LatentSource`: pre-encoded latents and prompt embeddings in safetensors shards (the real-scale
  path: a VAE and a text encoder run once, offline), each shard holding `latents [N, C, F, H, W]`,
  `prompt_embeds [N, L, D]`; `null_embeds.safetensors` holds `prompt_embeds [1, L, D]` of the empty
  prompt.
- `PromptSource`: prompt embeddings only (`data.kind=prompts`; Self-Forcing's SF+DMD needs no videos):
  shards holding `prompt_embeds [N, L, D]` (a latent folder works too), read row by row from disk.
  Its batches have no "x0": stages that need videos refuse it.

`stages/prepare_data.py` writes both kinds of folders.
"""

from __future__ import annotations

from pathlib import Path

import torch

from safetensors import SafetensorError, safe_open

from pipeline.training.checkpoint import read_safetensors
from pipeline.models.conditioning import embed_labels, make_class_table
from pipeline.data.sprites import NULL_CLASS, SpritesStream


def shard_files(path: Path, kind: str) -> list[Path]:
    """The shards of a `prepare_data` folder, sorted; hidden names are a writer's temporaries (a killed run)."""
    shards = sorted(p for p in path.glob("*.safetensors") if p.name != "null_embeds.safetensors"
                    and not p.name.startswith("."))
    if not shards:
        raise FileNotFoundError(f"no {kind} shards (*.safetensors) in {path}")
    return shards

class SpritesSource:
    """Sprites videos as latents `[B, 3, F, S, S]` with class-embedding prompts."""

    def __init__(self, size: int, frames: int, seed: int, table: torch.Tensor):
        self.stream = SpritesStream(size=size, frames=frames, seed=seed)
        self.table = table

    def next_batch(self, n: int, device="cpu") -> dict[str, torch.Tensor]:
        b = self.stream.next_batch(n)
        x0 = b["videos"].permute(0, 2, 1, 3, 4).contiguous()  # [N, F, 3, S, S] -> [N, 3, F, S, S]
        return {"x0": x0.to(device), "context": self.cond(b["labels"]).to(device), "labels": b["labels"]}

    def cond(self, labels: torch.Tensor) -> torch.Tensor:
        return embed_labels(self.table, labels)

    def null_context(self, n: int) -> torch.Tensor:
        return embed_labels(self.table, torch.full((n,), NULL_CLASS, dtype=torch.long))

    def state_dict(self) -> dict:
        return self.stream.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.stream.load_state_dict(state)


class _ShuffledRows:
    """A seeded random order over the rows of a source (one shuffled pass after another), resumable by
    `drawn`; subclasses set `seed`, `drawn`, `null [1, L, D]` and `__len__`."""

    def _order(self, epoch: int) -> torch.Tensor:
        return torch.randperm(len(self), generator=torch.Generator().manual_seed(self.seed + epoch))

    def _next_indices(self, n: int) -> torch.Tensor:
        size = len(self)
        idx = torch.stack([self._order(i // size)[i % size] for i in range(self.drawn, self.drawn + n)])
        self.drawn += n
        return idx

    def null_context(self, n: int) -> torch.Tensor:
        return self.null.float().expand(n, *self.null.shape[1:])

    def state_dict(self) -> dict:
        return {"drawn": self.drawn, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.drawn, self.seed = state["drawn"], state["seed"]


class LatentSource(_ShuffledRows):
    """Pre-encoded latents and prompt embeddings from `*.safetensors` shards in a folder, in a seeded
    random order (one shuffled pass after another).

    With `cfg` (what `build_source` passes), every shard is checked against the model and data settings it
    meets: latents `[N, *latent_shape(cfg)]`, prompt rows `model.text_dim` wide; without, against each other.
    Every mismatch is one line naming the shard, the tensor and both shapes."""

    def __init__(self, path: str | Path, seed: int, *, cfg=None):
        path = Path(path)
        shards = shard_files(path, "latent")
        parts = [read_safetensors(p) for p in shards]
        for p, part in zip(shards, parts):
            if "latents" not in part or "prompt_embeds" not in part:
                raise ValueError(f"{p}: a latent shard needs 'latents' and 'prompt_embeds' tensors")
        want = _expected_latents(cfg) if cfg is not None else None
        text_dim = cfg.model.text_dim if cfg is not None else None
        for p, part in zip(shards, parts):
            lat, emb = part["latents"], part["prompt_embeds"]
            if lat.ndim != 5:
                raise ValueError(f"{p}: latents must be [N, C, F, H, W], got {list(lat.shape)}")
            want = want or {f"the first shard's {d}": n for d, n in zip("CFHW", lat.shape[1:])}  # no cfg: shard 1 rules
            wrong = [f"{d} = {n} but {key} = {w}" for (key, w), d, n in zip(want.items(), "CFHW", lat.shape[1:])
                     if n != w]
            if wrong:
                raise ValueError(f"{p}: latents {list(lat.shape)} do not fit the model and data settings: "
                                 f"{'; '.join(wrong)}")
            _check_embeds(p, emb, rows=len(lat), text_dim=text_dim)
            text_dim = emb.shape[-1]  # later shards match this one
            if lat.is_floating_point() and not bool(torch.isfinite(lat).all()):
                raise ValueError(f"{p}: latents hold NaN or inf (row {_first_nonfinite_row(lat)})")
        self.latents = torch.cat([p["latents"] for p in parts])
        try:
            self.embeds = torch.cat([p["prompt_embeds"] for p in parts])
        except RuntimeError:
            raise ValueError(f"{path}: the shards' prompt_embeds differ in length "
                             f"{sorted({tuple(p['prompt_embeds'].shape[1:]) for p in parts})}") from None
        self.null = _read_null(path, self.embeds.shape[1:])
        self.seed, self.drawn = seed, 0

    def __len__(self) -> int:
        return len(self.latents)

    def next_batch(self, n: int, device="cpu") -> dict[str, torch.Tensor]:
        idx = self._next_indices(n)
        return {"x0": self.latents[idx].float().to(device), "context": self.embeds[idx].float().to(device),
                "labels": torch.full((n,), -1, dtype=torch.long)}


def _expected_latents(cfg) -> dict:
    """`{config key: size}` for the C, F, H, W of one latent video (`latent_shape(cfg)`)."""
    c, f, h, w = latent_shape(cfg)
    hw = "data.latent_size" if cfg.data.latent_size else "data.size"
    return {"model.in_channels": c, "data.frames": f, f"{hw} (H)": h, f"{hw} (W)": w}


def _first_nonfinite_row(x: torch.Tensor) -> int:
    return int((~torch.isfinite(x.flatten(1))).any(1).nonzero()[0])


def _check_embeds(path: Path, emb: torch.Tensor, *, rows: int | None, text_dim: int | None) -> None:
    """`prompt_embeds` of shard `path`: `[N, L, D]`, one row per video (`rows`), `D = text_dim`."""
    if emb.ndim != 3:
        raise ValueError(f"{path}: prompt_embeds must be [N, L, D], got {list(emb.shape)}")
    if rows is not None and len(emb) != rows:
        raise ValueError(f"{path}: {rows} latents but {len(emb)} prompt_embeds rows (one each)")
    if text_dim is not None and emb.shape[-1] != text_dim:
        raise ValueError(f"{path}: prompt_embeds {list(emb.shape)} are {emb.shape[-1]} wide, but model.text_dim = "
                         f"{text_dim}")


def _read_null(path: Path, row_shape) -> torch.Tensor:
    """`null_embeds.safetensors` of a shard folder: `prompt_embeds [1, L, D]` matching the rows' `[L, D]`."""
    file = path / "null_embeds.safetensors"
    null = read_safetensors(file).get("prompt_embeds")
    if null is None:
        raise ValueError(f"{file}: no 'prompt_embeds' tensor (the empty prompt's embeddings)")
    if null.ndim != 3 or len(null) != 1 or tuple(null.shape[1:]) != tuple(row_shape):
        raise ValueError(f"{file}: prompt_embeds {list(null.shape)} do not match the prompt rows "
                         f"[1, {', '.join(map(str, row_shape))}]")
    return null


class PromptBatch(dict):
    """A prompts-only batch: asking it for videos ("x0") is a one-line error, not a KeyError deep inside a
    trainer (`"x0" in batch` stays False, which is how sf_dmd tells it has no videos)."""

    def __missing__(self, key):
        if key == "x0":
            raise ValueError("data.kind=prompts has prompt embeddings only; this stage needs videos "
                             "(pretrain_teacher, distill.method=df_dmd): use data.kind=latents")
        raise KeyError(key)


class EmbeddingRows:
    """The `prompt_embeds` rows of several shards as one table, read from disk on demand (Wan's are
    512 x 4096 per prompt: a large prompt set does not fit in memory). `rows[idx]` → `[n, L, D]`."""

    def __init__(self, shards: list[Path], *, text_dim: int | None = None):
        self.shards, counts = shards, []
        self.row_shape = None
        for p in shards:
            try:
                with safe_open(str(p), "pt") as f:
                    if "prompt_embeds" not in f.keys():
                        raise ValueError(f"{p}: a prompt shard needs a 'prompt_embeds' tensor")
                    shape = f.get_slice("prompt_embeds").get_shape()
            except (SafetensorError, OSError) as e:
                raise ValueError(f"corrupt safetensors file {p}: {str(e).splitlines()[0]}") from None
            if len(shape) != 3:
                raise ValueError(f"{p}: prompt_embeds must be [N, L, D], got {shape}")
            if text_dim is not None and shape[-1] != text_dim:
                raise ValueError(f"{p}: prompt_embeds {shape} are {shape[-1]} wide, but model.text_dim = {text_dim}")
            if self.row_shape is not None and tuple(shape[1:]) != self.row_shape:
                raise ValueError(f"{p}: prompt_embeds {shape} differ from the earlier shards' [N, "
                                 f"{', '.join(map(str, self.row_shape))}]")
            counts.append(shape[0])
            self.row_shape = tuple(shape[1:])
        self.starts = torch.tensor([0, *counts]).cumsum(0)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def __getitem__(self, idx) -> torch.Tensor:
        idx = torch.as_tensor(idx).reshape(-1)
        shard = torch.searchsorted(self.starts, idx, right=True) - 1
        out = [None] * len(idx)
        for s in shard.unique().tolist():
            where = (shard == s).nonzero().flatten().tolist()
            with safe_open(str(self.shards[s]), "pt") as f:
                sl = f.get_slice("prompt_embeds")
                for w in where:
                    r = int(idx[w] - self.starts[s])
                    out[w] = sl[r:r + 1]
        return torch.cat(out)


class PromptSource(_ShuffledRows):
    """Prompt embeddings from `*.safetensors` shards in a folder (`prompt_embeds [N, L, D]` each, plus
    `null_embeds.safetensors`), in a seeded random order (one shuffled pass after another).

    Batches: `{"context": [B, L, D] float32, "labels": [B] of -1}` — no "x0" (see `PromptBatch`)."""

    def __init__(self, path: str | Path, seed: int, *, cfg=None):
        path = Path(path)
        shards = shard_files(path, "prompt")
        if not (path / "null_embeds.safetensors").is_file():
            raise FileNotFoundError(f"{path}: null_embeds.safetensors (the empty prompt's embeddings) is missing")
        # also what init_student's ODE pairs index; with `cfg`, rows are checked against model.text_dim
        self.embeds = EmbeddingRows(shards, text_dim=cfg.model.text_dim if cfg is not None else None)
        self.null = _read_null(path, self.embeds.row_shape)
        self.seed, self.drawn = seed, 0

    def __len__(self) -> int:
        return len(self.embeds)

    def next_batch(self, n: int, device="cpu") -> dict[str, torch.Tensor]:
        idx = self._next_indices(n)
        return PromptBatch(context=self.embeds[idx].float().to(device), labels=torch.full((n,), -1, dtype=torch.long))


def latent_shape(cfg) -> tuple[int, int, int, int]:
    """`(C, F, H, W)` of one training video in the model's space: sprites are `(3, frames, size, size)`;
    latents `(model.in_channels, data.frames, *data.latent_size)` (`latent_size` None: `[size, size]`)."""
    h, w = cfg.data.latent_size or (cfg.data.size, cfg.data.size)
    return (cfg.model.in_channels, cfg.data.frames, h, w)


def class_table(cfg) -> torch.Tensor:
    """The fixed class-embedding table `[num_classes + 1, cond_tokens, model.text_dim]` of a config."""
    return make_class_table(cfg.data.num_classes, cfg.data.cond_tokens, cfg.model.text_dim, cfg.data.cond_seed)


def build_source(cfg, seed: int):
    """The configured data source (`data.kind`: sprites, latents or prompts)."""
    if cfg.data.kind == "sprites":
        return SpritesSource(cfg.data.size, cfg.data.frames, seed, class_table(cfg))
    if cfg.data.path is None:
        raise ValueError(f"data.path must name a folder of {cfg.data.kind} shards when data.kind={cfg.data.kind} "
                         "(stages.prepare_data writes it)")
    if not Path(cfg.data.path).is_dir():
        raise FileNotFoundError(f"data.path: local path not found: {cfg.data.path} (run prepare_data first)")
    if cfg.data.kind == "prompts":
        return PromptSource(cfg.data.path, seed, cfg=cfg)
    return LatentSource(cfg.data.path, seed, cfg=cfg)
