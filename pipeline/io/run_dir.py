"""A stage's folder `<run.dir>/<stage>/`: resolved config, manifest, and content hashes of inputs."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from pipeline.io.jsonfile import read_json
from pipeline.io.guard import GuardError, check_inputs, write_text


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


def is_stage_folder(path: str | Path) -> bool:
    """Whether `path` is a stage's folder (it has a `manifest.json`): a source whose EMA weights, config and
    class table are its own, as opposed to a diffusers folder or a checkpoint file."""
    return (Path(path) / "manifest.json").is_file()


class StaleInputError(ValueError):
    """An input of a stage in progress changed since the stage started (e.g. the stage before was re-run)."""


def write_atomic(path: str | Path, text: str) -> None:
    """A text file written under a temporary name, then renamed (`pipeline.io.guard.replacing`)."""
    write_text(path, text)


class StageDir:
    """`<run_dir>/<stage>/` with its `manifest.json` (status running/done, inputs, outputs, metrics)."""

    def __init__(self, run_dir: str | Path, stage: str):
        self.stage = stage
        self.path = Path(run_dir) / stage
        self.manifest_path = self.path / "manifest.json"

    def manifest(self) -> dict:
        if not self.manifest_path.is_file():
            return {}
        return read_json(self.manifest_path)  # a malformed one: one line naming the file

    def guard(self, inputs: dict | None = None, force: bool = False) -> None:
        """The output rule for the stage folder, checked before the stage reads or writes anything:

        - it must not be, lie inside or contain one of the stage's `inputs` (`{config key: path}`), even
          with `force`;
        - an existing folder that is not a stage folder (no `manifest.json`, and holding more than a
          `config.yaml` a stage writes first) is written into only with `force`.

        Raises:
            GuardError naming the folder and the reason.
        """
        check_inputs(self.path, inputs, "the stage folder")
        if self.path.is_dir() and not self.manifest_path.is_file() and not force:
            foreign = [p.name for p in self.path.iterdir() if p.name != "config.yaml" and not p.name.startswith(".")]
            if foreign:
                raise GuardError(f"{self.path} exists and is not a stage folder (no manifest.json; it holds "
                                 f"{foreign[0]}); choose another run.dir or pass --force to write into it")

    @property
    def done(self) -> bool:
        return self.manifest().get("status") == "done"

    def check_inputs(self, inputs: dict[str, str | Path] | None) -> dict[str, str]:
        """The sha256 of each input (`{name: path}`), refusing one that differs from the hash recorded when
        this stage started (a stage in progress or done: it would mix two inputs, or be kept although its
        input changed).

        Returns:
            `{path: sha256}`.
        Raises:
            StaleInputError naming the input, its path and both hashes.
        """
        m = self.manifest()
        inputs = {k: str(v) for k, v in (inputs or {}).items()}
        hashes = {p: file_hash(p) for p in set(inputs.values())}  # a path read under two names is hashed once
        if m.get("status") in ("running", "done"):
            for name, rec in m.get("inputs", {}).items():
                now = hashes.get(inputs.get(name))
                if now is not None and now != rec["sha256"]:
                    raise StaleInputError(
                        f"{self.stage}: input '{name}' ({rec['path']}) changed since this stage started (sha256 "
                        f"{rec['sha256'][:12]} -> {now[:12]}); rerun it with --force to start over on the new input")
        return hashes

    def begin(self, config_yaml: str, inputs: dict[str, str | Path] | None = None, force: bool = False,
              check_inputs: bool = True) -> None:
        """Mark the stage running; save the resolved config; hash its inputs.

        A stage that already started (resuming, or extending a finished one) refuses inputs whose hash
        differs from the one recorded when it started, unless `force` (a rerun from scratch).

        Raises:
            StaleInputError: naming the input, its path and both hashes; nothing is written.
            OSError: the run directory cannot be written (one line naming it).
        """
        m = self.manifest()
        inputs = {k: str(v) for k, v in (inputs or {}).items()}
        if check_inputs and not force:
            hashes = self.check_inputs(inputs)
        else:
            hashes = {p: file_hash(p) for p in set(inputs.values())}
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path / "config.yaml", config_yaml)
        except OSError as e:
            raise OSError(f"cannot write the stage folder {self.path}: {e.strerror or e}") from None
        m.update(stage=self.stage, status="running", started=m.get("started", time.time()),
                 inputs={k: {"path": p, "sha256": hashes[p]} for k, p in inputs.items()})
        write_atomic(self.manifest_path, json.dumps(m, indent=1))

    def record(self, key: str, entry) -> None:
        """Append `entry` to the manifest's list `key` (e.g. the harmless setting changes of a resume)."""
        m = self.manifest()
        m.setdefault(key, []).append(entry)
        write_atomic(self.manifest_path, json.dumps(m, indent=1))

    def move_aside(self) -> Path:
        """Rename this stage's folder to the first free `<stage>.replaced-<k>` beside it (a rerun from
        scratch keeps what an earlier run made; nothing is deleted). Returns the new path."""
        k = 1
        while (aside := self.path.with_name(f"{self.path.name}.replaced-{k}")).exists():
            k += 1
        self.path.rename(aside)
        return aside

    def finish(self, outputs: dict[str, str], metrics: dict, **fields) -> None:
        """Mark the stage done with its outputs and metrics (and further manifest `fields`, e.g. `settings`)."""
        m = self.manifest()
        m.update(status="done", finished=time.time(), outputs=outputs, metrics=metrics, **fields)
        write_atomic(self.manifest_path, json.dumps(m, indent=1))
