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


SWITCH = "||"


def parse_schedule(line: str) -> list[tuple[int, str]]:
    """A prompt-file line as a prompt schedule `[(0, prompt), (K1, prompt1), ...]`: a plain line is one prompt;
    `a cat walks || 6: the cat sits || 12: the cat sleeps` switches the prompt at latent frames 6 and 12 (in
    force from the first chunk starting there, as `sampling.prompt_at`). Frames must increase from 1 on."""
    parts = [p.strip() for p in line.split(SWITCH)]
    out = [(0, parts[0])]
    for part in parts[1:]:
        frame, sep, text = part.partition(":")
        if not sep or not frame.strip().isdigit() or not text.strip():
            raise ValueError(f"prompt schedule {line!r}: expected 'prompt || K: prompt ...', got {part!r}")
        out.append((int(frame), text.strip()))
    frames = [k for k, _ in out]
    if not parts[0] or frames != sorted(set(frames)):
        raise ValueError(f"prompt schedule {line!r}: a first prompt, then switch frames increasing from 1")
    return out
