"""JSON that comes from files (a folder's `config.json`, `sampling.json`, a sharded index, `--model-config`,
safetensors metadata): read in one place, so every malformed one is a one-line error naming the file and,
where it matters, the key, instead of a bare `JSONDecodeError` or an `AttributeError` on a list."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


class JSONFileError(ValueError):
    """A JSON input that is unreadable or of the wrong shape (a user error: one line, exit 2)."""


_KINDS = {dict: "a JSON object {...}", list: "a JSON list [...]", str: "a string", int: "an integer"}


def _kind(obj) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(obj), "a number")


def parse_json(text: str, *, where: str, expect: type | None = dict) -> Any:
    """`text` parsed; `where` names its origin in messages (`FILE`, `FILE: metadata 'config'`).

    Raises:
        JSONFileError: not JSON, or (with `expect`) not of that type.
    """
    try:
        obj = json.loads(text)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise JSONFileError(f"{where}: not valid JSON ({e})") from None
    if expect is not None and not isinstance(obj, expect):
        raise JSONFileError(f"{where}: expected {_KINDS.get(expect, expect.__name__)}, got {_kind(obj)}")
    return obj


def read_json(path: str | Path, *, expect: type | None = dict, what: str | None = None) -> Any:
    """The JSON file `path` (`what`: how the user named it, e.g. `--model-config`, for messages).

    Raises:
        FileNotFoundError: no such file; JSONFileError: unreadable or not of type `expect`.
    """
    path = Path(path)
    label = f"{what} {path}" if what else str(path)
    if not path.is_file():
        raise FileNotFoundError(f"{label}: file not found")
    try:
        text = path.read_bytes().decode()
    except UnicodeDecodeError as e:
        raise JSONFileError(f"{label}: not valid JSON (not UTF-8 text: {e.reason})") from None
    return parse_json(text, where=label, expect=expect)


def get_key(obj: dict, key: str, *, where: str, expect: type | tuple | None = None) -> Any:
    """`obj[key]` of a JSON object read from `where`, a one-line error naming both when it is missing or
    (with `expect`) of another type."""
    if key not in obj:
        raise JSONFileError(f"{where}: missing key '{key}'")
    value = obj[key]
    if expect is not None and not isinstance(value, expect):
        want = expect if isinstance(expect, tuple) else (expect,)
        raise JSONFileError(f"{where}: key '{key}' must be {' or '.join(_KINDS.get(t, t.__name__) for t in want)}, "
                            f"got {_kind(value)}")
    return value
