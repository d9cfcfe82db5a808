"""A benchmark's expensive intermediate results kept under its --out folder: a rerun computes only what changed."""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any


def cached(path: Path, compute: Callable[[], Any]) -> Any:
    """Load a pickled result if an earlier run of this benchmark left one, else compute and keep it."""
    if path.is_file():
        return pickle.loads(path.read_bytes())
    value = compute()
    path.write_bytes(pickle.dumps(value))
    return value
