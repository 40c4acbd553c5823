"""Prompt files: one prompt per line (prepare_data's `data.prompts`, evaluate's and sample's `--prompts`)."""

from __future__ import annotations

from pathlib import Path


def read_prompts(path: str | Path) -> list[str]:
    """The non-empty lines of a prompt file, stripped."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data.prompts: local path not found: {path}")
    prompts = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"data.prompts: {path} has no prompts")
    return prompts
