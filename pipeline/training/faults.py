"""Fault injection for crash tests: `CVD_FAULT=<point>:<step>` kills the process (SIGKILL, no cleanup,
as a preemption or the OOM killer would) when it reaches that point of that training step.

Points: `step` (right after the optimizer step, before any checkpoint of that step), `checkpoint`
(in the middle of writing the checkpoint of that step: weights written, the rest not).
"""

from __future__ import annotations

import os
import signal

POINTS = ("step", "checkpoint")


def maybe_kill(point: str, step: int) -> None:
    """Kill this process now if `CVD_FAULT` names this point and step."""
    spec = os.environ.get("CVD_FAULT")
    if spec and spec == f"{point}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
