"""Torch's CPU thread count for one block of work, restored afterwards.

Scoring and training take a `threads` setting (one thread on a machine shared with other work, where
oversubscribed threads spin and wait). It applies to their own work only: a library call must not leave the
caller's process with another thread count than it had.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with `n` torch CPU threads, then restore the previous count; None leaves it as it is."""
    import torch

    if not n:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
