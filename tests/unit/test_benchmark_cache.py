"""The benchmarks' result cache (`benchmarks/_cache.py`): a kept result is used again only for the same inputs."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from _cache import cached  # noqa: E402


def test_a_kept_result_is_used_again_only_when_its_inputs_are_the_same(tmp_path):
    """Keyed by file name alone, a rerun after retraining a model into the same folder (or on other cells of the
    same count) reused the old model's figures."""
    model = tmp_path / "model"
    model.mkdir()
    (model / "model.json").write_text('{"kind": "baseline"}')
    (model / "weights.pt").write_bytes(b"first training")
    (model / "MODEL_CARD.md").write_text("first card")
    cells = torch.zeros(2, 3, 4, 4)
    calls: list[int] = []

    def compute() -> int:
        calls.append(1)
        return len(calls)

    kept = tmp_path / "row.pkl"
    assert cached(kept, compute, inputs=(model, cells)) == 1
    assert cached(kept, compute, inputs=(model, cells.clone())) == 1  # same model, same cells: kept
    (model / "MODEL_CARD.md").write_text("card written again")
    (model / "in_domain.json").write_text('{"seconds": 12.5}')  # an evaluation report written into the folder
    assert cached(kept, compute, inputs=(model, cells)) == 1  # neither is an input of a figure
    (model / "weights.pt").write_bytes(b"trained again")
    assert cached(kept, compute, inputs=(model, cells)) == 2  # retrained into the same folder
    assert cached(kept, compute, inputs=(model, cells + 1)) == 3  # other cells, same count
    assert cached(kept, compute, inputs=(model, cells + 1, np.arange(3))) == 4
    kept.write_bytes(pickle.dumps(99))  # a result kept by the earlier cache, with nothing saying what it is of
    assert cached(kept, compute, inputs=(model, cells)) == 5
