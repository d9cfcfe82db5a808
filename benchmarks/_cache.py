"""A benchmark's expensive intermediate results kept under its --out folder: a rerun computes only what changed.

Each result is kept with a digest of what it was made from (`inputs`: the model folder, the cells, the scoring
settings), and used again only when a rerun's inputs give the same digest. Keyed by file name alone, a rerun after
retraining a model into the same folder, or on other cells of the same count, reused the old model's figures.
"""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pydantic import BaseModel


def fingerprint(*parts: object) -> str:
    """A digest of `parts`: arrays and tensors by their bytes; a model folder by what its answers depend on (its
    model.json and weights: `model_source.local_ref`, so a card, plots or an evaluation report written into it
    since leave its results valid); other files and folders by their contents; pydantic settings by their JSON;
    sequences and mappings part by part; anything else by its repr (a dataclass such as a cell record: its
    fields)."""
    digest = hashlib.sha256()
    for part in parts:
        _feed(digest, part)
    return digest.hexdigest()


def _feed(digest: Any, part: object) -> None:
    digest.update(type(part).__name__.encode())
    if isinstance(part, torch.Tensor):
        part = part.detach().cpu().contiguous()
        digest.update(f"{part.dtype}{tuple(part.shape)}".encode())
        digest.update(part.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(part, np.ndarray):
        digest.update(f"{part.dtype}{part.shape}".encode())
        digest.update(np.ascontiguousarray(part).tobytes())
    elif isinstance(part, Path) and (part / "model.json").is_file():
        from cytoloop.serving.model_source import local_ref

        digest.update(local_ref(part).version.encode())
    elif isinstance(part, Path):
        files = sorted(p for p in part.rglob("*") if p.is_file()) if part.is_dir() else [part]
        for file in files:
            digest.update(str(file.relative_to(part) if part.is_dir() else file).encode())
            digest.update(file.read_bytes() if file.is_file() else b"<missing>")
    elif isinstance(part, BaseModel):
        digest.update(part.model_dump_json().encode())
    elif isinstance(part, dict):
        for key in sorted(part, key=str):
            _feed(digest, str(key))
            _feed(digest, part[key])
    elif isinstance(part, list | tuple):
        for item in part:
            _feed(digest, item)
    else:
        digest.update(repr(part).encode())


def cached(path: Path, compute: Callable[[], Any], inputs: Sequence[object]) -> Any:
    """The result kept at `path` if an earlier run made it from the same `inputs` (see `fingerprint`), else
    `compute()`'s, kept there for the next run."""
    key = fingerprint(*inputs)
    if path.is_file():
        kept = pickle.loads(path.read_bytes())
        if isinstance(kept, dict) and kept.get("inputs") == key:
            return kept["value"]
        print(f"{path}: made from other inputs (another model, other cells or settings); computing it again")
    value = compute()
    path.write_bytes(pickle.dumps({"inputs": key, "value": value}))
    return value
