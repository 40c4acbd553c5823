"""Names of the files in a shard folder, shared by every writer and reader of one (prepare_data's latent and
prompt shards, init_student's ODE pairs): `shard_00000.safetensors`, `shard_00001.safetensors`, ..."""

from __future__ import annotations

from pathlib import Path

SHARD_GLOB = "shard_*.safetensors"  # every shard of a folder (temporaries never match: see the writers)


def shard_path(folder: str | Path, index: int) -> Path:
    """The path of shard `index` in `folder`: `<folder>/shard_<index, 5 digits>.safetensors`."""
    return Path(folder) / f"shard_{index:05d}.safetensors"
