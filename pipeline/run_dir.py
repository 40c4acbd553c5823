"""A stage's folder `<run.dir>/<stage>/`: resolved config, manifest, and content hashes of inputs."""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path


def file_hash(path: str | Path) -> str:
    """sha256 of a file, or of every file under a folder (sorted by relative path)."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for p in files:
        if path.is_dir():
            h.update(str(p.relative_to(path)).encode())
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def write_atomic(path: str | Path, text: str) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class StageDir:
    """`<run_dir>/<stage>/` with its `manifest.json` (status running/done, inputs, outputs, metrics)."""

    def __init__(self, run_dir: str | Path, stage: str):
        self.stage = stage
        self.path = Path(run_dir) / stage
        self.manifest_path = self.path / "manifest.json"

    def manifest(self) -> dict:
        if not self.manifest_path.is_file():
            return {}
        return json.loads(self.manifest_path.read_text())

    @property
    def done(self) -> bool:
        return self.manifest().get("status") == "done"

    def begin(self, config_yaml: str, inputs: dict[str, str | Path] | None = None) -> None:
        """Mark the stage running; save the resolved config; hash its inputs."""
        self.path.mkdir(parents=True, exist_ok=True)
        write_atomic(self.path / "config.yaml", config_yaml)
        m = self.manifest()
        inputs = {k: str(v) for k, v in (inputs or {}).items()}
        hashes = {p: file_hash(p) for p in set(inputs.values())}  # a path read under two names is hashed once
        m.update(stage=self.stage, status="running", started=m.get("started", time.time()),
                 inputs={k: {"path": p, "sha256": hashes[p]} for k, p in inputs.items()})
        write_atomic(self.manifest_path, json.dumps(m, indent=1))

    def finish(self, outputs: dict[str, str], metrics: dict) -> None:
        m = self.manifest()
        m.update(status="done", finished=time.time(), outputs=outputs, metrics=metrics)
        write_atomic(self.manifest_path, json.dumps(m, indent=1))
