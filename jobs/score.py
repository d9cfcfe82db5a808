"""Batch scoring with Ray Data through the served classifier: a pool of cells in, one prediction per cell out.

Ray Data reads the pool in batches and a small actor pool posts each batch to the classifier service's
`/v1/classify`, so a batch job scores with exactly the model version that serves the lab (and its replicas batch
the requests), and every cell lands in the service's prediction log that the drift monitor reads. Rows are matched
back to cells by path: Ray Data does not keep row order across batches.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cytoloop.data.records import CellRecord
from cytoloop.errors import UsageError
from cytoloop.models.base import Predictions


class ServedScorer:
    """Ray Data callable class: one HTTP client per actor, one request per batch of cells."""

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 600.0):
        import httpx

        headers = {"X-API-Key": api_key} if api_key else {}
        self.client = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One request per site of the batch: Ray Data cuts batches by size, not by site, and each site's cells
        must reach that site's champion (a batch straddling two sites used to go to the global model)."""
        paths = [str(p) for p in batch["path"]]
        sites = [str(s) for s in batch["site"]]
        answered: list[tuple[str, dict]] = []
        for site in dict.fromkeys(sites):
            mine = [p for p, s in zip(paths, sites) if s == site]
            cells = [{"name": p, "image_b64": base64.b64encode(Path(p).read_bytes()).decode()} for p in mine]
            response = self.client.post("/v1/classify", json={"cells": cells, "site": site or None})
            if response.status_code != 200:
                raise RuntimeError(f"the classifier answered HTTP {response.status_code}: {response.text[:300]}")
            answered += list(zip(mine, response.json()["cells"]))
        out: dict[str, list] = {"path": [], "ok": [], "probabilities": [], "anomaly": [], "version": [], "error": []}
        for path, answer in answered:
            ok = answer["status"] == "ok"
            out["path"].append(path)
            out["ok"].append(ok)
            out["probabilities"].append(answer["probabilities"] if ok else {})
            out["anomaly"].append(answer["anomaly"] if ok and answer["anomaly"] is not None else float("nan"))
            out["version"].append(answer["model"]["version"] if ok else "")
            out["error"].append("" if ok else f"{answer['reason']}: {answer['message']}")
        return {key: np.array(values, dtype=object) for key, values in out.items()}


@dataclass
class PoolScores:
    """Predictions for the cells that were scored, in the order of `records`; `failed` names the others."""

    records: list[CellRecord]
    predictions: Predictions
    versions: list[str]
    failed: dict[str, str]


def score_served(
    records: Sequence[CellRecord],
    url: str,
    classes: Sequence[str],
    api_key: str | None = None,
    batch_size: int = 32,
    concurrency: int = 1,
    site_of=lambda record: record.domain,
) -> PoolScores:
    """Score `records` through the service at `url` with Ray Data (joins the running Ray cluster).

    Probabilities are put in the order of `classes` (the model's). A cell the service rejects (say, a corrupt
    image) is left out of the predictions and named in `failed` with the reason; the others are scored.
    """
    import ray

    if not records:
        return PoolScores([], Predictions(np.zeros((0, len(classes))), np.zeros(0), np.zeros(0)), [], {})
    rows = [{"path": str(Path(r.path).resolve()), "site": site_of(r)} for r in records]
    rows.sort(key=lambda row: row["site"])  # fewer requests: most batches hold one site
    dataset = ray.data.from_items(rows).map_batches(
        ServedScorer,
        fn_constructor_kwargs={"url": url, "api_key": api_key},
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=concurrency),
        num_cpus=0.1,  # it waits on HTTP; the classifier replicas do the work
    )
    by_path = {row["path"]: row for row in dataset.take_all()}
    kept, probs, anomaly, versions, failed = [], [], [], [], {}
    for record in records:
        row = by_path[str(Path(record.path).resolve())]
        if not row["ok"]:
            failed[str(record.path)] = row["error"]
            continue
        missing = set(classes) - set(row["probabilities"])
        if missing:
            raise UsageError(
                f"the served model does not know {sorted(missing)}: it answers {sorted(row['probabilities'])}"
            )
        kept.append(record)
        probs.append([row["probabilities"][c] for c in classes])
        anomaly.append(row["anomaly"])
        versions.append(row["version"])
    predictions = Predictions(
        np.array(probs, dtype=float).reshape(-1, len(classes)), np.array(anomaly, float), np.zeros(len(kept))
    )
    return PoolScores(kept, predictions, versions, failed)
