"""Fault injection for crash tests: `CVD_FAULT=<point>:<step>` kills the process (SIGKILL, no cleanup,
as a preemption or the OOM killer would) when it reaches that point of that training step.

Points: `step` (right after the optimizer step, before any checkpoint of that step), `checkpoint`
(in the middle of writing the checkpoint of that step: weights written, the rest not), `oom` (torch's
`OutOfMemoryError` raised at the start of that step's first update, as a device allocator raises it).
"""

from __future__ import annotations

import os
import signal

import torch

POINTS = ("step", "checkpoint", "oom")


def maybe_kill(point: str, step: int) -> None:
    """Kill this process now if `CVD_FAULT` names this point and step."""
    spec = os.environ.get("CVD_FAULT")
    if spec and spec == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_out_of_memory(step: int) -> None:
    """Raise `torch.OutOfMemoryError` if `CVD_FAULT` is `oom:<step>` (`step`: 1-based, the one being taken)."""
    if os.environ.get("CVD_FAULT") == f"oom:{step}":
        raise torch.OutOfMemoryError(f"out of memory (injected: CVD_FAULT=oom:{step})")
