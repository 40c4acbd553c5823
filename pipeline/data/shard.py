"""One process's rows of a global batch, with random draws that do not depend on the process count.

With N processes (DDP or DeepSpeed) each process trains on its slice of a global batch of N·B
samples. Every process holds the *same* generator and draws the random numbers of the whole global
batch, keeping only its rows (`ShardedGenerator`): so

- N processes × batch B see exactly the samples, noise and levels that one process with batch N·B
  sees, and the gradient DDP averages equals the one-process gradient up to float rounding;
- draws that are not per sample (a rollout's exit steps) come out equal on every process without a
  broadcast;
- the generator state is the same on every process: one state in a checkpoint, which resumes with
  another process count at the same global batch.

The cost is drawing N× the numbers, negligible beside the network. The samplers and losses take a
plain `torch.Generator` or a `ShardedGenerator` and draw through `randn`/`rand`/`randint` here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ShardedGenerator:
    """A generator shared by all processes, drawing per-sample tensors for rows
    `[rank·B, (rank+1)·B)` of the global batch.

    Args:
        generator: the shared `torch.Generator` (same seed and state on every process).
        rank, world: this process's index and the number of processes.
    """

    generator: torch.Generator
    rank: int = 0
    world: int = 1

    def rows(self, t: torch.Tensor) -> torch.Tensor:
        """This process's rows of a global-batch tensor `[world·B, ...]` → `[B, ...]`."""
        if len(t) % self.world:
            raise ValueError(f"a global batch of {len(t)} does not split over {self.world} processes")
        b = len(t) // self.world
        return t[self.rank * b:(self.rank + 1) * b]

    def get_state(self) -> torch.Tensor:
        return self.generator.get_state()

    def set_state(self, state: torch.Tensor) -> None:
        self.generator.set_state(state)


def base(gen) -> torch.Generator | None:
    """The shared `torch.Generator` (for draws that are the same on every process)."""
    return gen.generator if isinstance(gen, ShardedGenerator) else gen


def _draw(fn, shape, gen, **kw) -> torch.Tensor:
    if not isinstance(gen, ShardedGenerator) or gen.world == 1:
        return fn(tuple(shape), generator=base(gen), **kw)
    return gen.rows(fn((shape[0] * gen.world, *shape[1:]), generator=gen.generator, **kw))


def randn(shape, gen, **kw) -> torch.Tensor:
    """`torch.randn(shape)`; `shape[0]` is this process's batch when `gen` is sharded."""
    return _draw(torch.randn, shape, gen, **kw)


def rand(shape, gen, **kw) -> torch.Tensor:
    """`torch.rand(shape)`, batch-sharded like `randn`."""
    return _draw(torch.rand, shape, gen, **kw)


def randint(low: int, high: int, shape, gen, **kw) -> torch.Tensor:
    """`torch.randint(low, high, shape)`, batch-sharded like `randn`."""
    return _draw(lambda s, **k: torch.randint(low, high, s, **k), shape, gen, **kw)
