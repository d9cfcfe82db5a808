"""Serving load benchmark: concurrent clients against the real Ray Serve app on loopback.

Three configurations (1 replica without batching, 1 replica with batching, 2 replicas with batching) of each model
are deployed side by side on a private local Ray instance and warmed up; then `--clients` threads send real cells
(multipart, one or more per request) to each in turn, in 5 s slices, for `--seconds` in all per configuration, so
that load from other work on the machine falls on every configuration alike. Reported: cells per second, p50/p99
latency, and the mean batch size, from the `batch` field each response carries (requests sharing a replica and
batch id were one model call). Bounded: at most 64 clients and 120 s per configuration. `--write-docs` puts the
table into docs/benchmarks.md.

    python benchmarks/serve_load.py --data ../shared/data/cells --clients 16 --seconds 30 --trials 2 --write-docs

The model is the CNN baseline's default architecture with untrained weights unless `--model-dir` is given: speed
does not depend on the weights. Timings on a shared 2-core machine are noisy: read the ratios, not the numbers.
"""

from __future__ import annotations

import argparse
import itertools
import os
import platform
import shutil
import socket
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

import httpx
import numpy as np

from cytoloop.config import BaselineModelConfig, DataConfig, DiffusionModelConfig, ScoringConfig, load_settings
from cytoloop.data.records import load_records

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _docs import DOCS, replace_section  # noqa: E402

SLICE_S = 5.0  # configurations take turns in slices this long
CONFIGS = [  # (replicas, max batch size)
    (1, 1),
    (1, 16),
    (2, 16),
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/cells"))
    parser.add_argument("--model-dir", type=Path, default=None, help="model to serve (default: untrained --kinds)")
    parser.add_argument("--kinds", default="baseline,diffusion", help="untrained models to serve, in turn")
    parser.add_argument("--trials", type=int, default=10, help="diffusion: fixed scoring trials per cell")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--cells-per-request", type=int, default=1)
    parser.add_argument("--write-docs", action="store_true", help="write the table into docs/benchmarks.md")
    args = parser.parse_args(argv)
    if not 1 <= args.clients <= 64 or not 1 <= args.seconds <= 120:
        parser.error("--clients must be in [1, 64] and --seconds in [1, 120]")
    kinds = [k for k in args.kinds.split(",") if k]
    if not args.model_dir and (not kinds or set(kinds) - {"baseline", "diffusion"}):
        parser.error("--kinds takes baseline and/or diffusion")

    cells = [r.path.read_bytes() for r in load_records(args.data)[::7][:64]]
    work = Path(tempfile.mkdtemp(prefix="serve_load_"))
    ray_dir = tempfile.mkdtemp(prefix="ray_bench_", dir="/tmp")  # short: Ray's socket paths must stay < 107 chars
    models = (
        {"given": args.model_dir}
        if args.model_dir
        else {kind: _untrained(kind, args.trials, work / kind) for kind in kinds}
    )
    os.environ["RAY_AUTH_MODE"] = "disabled"
    os.environ["RAY_worker_niceness"] = "0"  # Ray starts workers at +15, which a busy machine starves
    import ray
    from ray import serve

    from services.app import build_app

    rows = []
    try:
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=ray_dir, log_to_driver=False)
        port = _free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for kind, model_dir in models.items():
            # every configuration of a model is deployed at once and measured in alternating slices, so the load
            # other work puts on the machine drifts over all of them alike
            urls = {}
            for replicas, batch in CONFIGS:
                name = f"{kind}-{replicas}x{batch}"
                settings = load_settings(
                    overrides={
                        "serve": {
                            "model_dir": str(model_dir),
                            "min_replicas": replicas,
                            "max_replicas": replicas,
                            "max_batch_size": batch,
                            "batch_wait_s": 0.01,
                            "max_ongoing_requests": max(64, 4 * batch),
                            "num_cpus": 0.1,
                            "torch_threads": 1,
                        },
                        "registry": {"cache_dir": str(work / "cache")},
                    }
                )
                serve.run(build_app(settings), name=name, route_prefix=f"/{name}", blocking=False)
                urls[(replicas, batch)] = f"http://127.0.0.1:{port}/{name}/v1/classify"
                _load(urls[(replicas, batch)], cells, args.clients, 3.0, args.cells_per_request)  # warm-up
            runs = {config: [] for config in CONFIGS}
            rounds = max(1, round(args.seconds / SLICE_S))
            for _, config in itertools.product(range(rounds), CONFIGS):
                runs[config].append(
                    _load(urls[config], cells, args.clients, args.seconds / rounds, args.cells_per_request)
                )
            for (replicas, batch), parts in runs.items():
                rows.append(
                    {"model": kind, "replicas": replicas, "max_batch": batch, **_summary(parts, args.cells_per_request)}
                )
                print(_row(rows[-1]), flush=True)
            for replicas, batch in CONFIGS:
                serve.delete(f"{kind}-{replicas}x{batch}")
    finally:
        serve.shutdown()
        ray.shutdown()
        shutil.rmtree(ray_dir, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    body = _markdown(rows, args, argv)
    print(body)
    if args.write_docs:
        replace_section(DOCS, "serve", body, "Serving load")
        print(f"wrote {DOCS}")
    return 0


def _untrained(kind: str, trials: int, directory: Path) -> Path:
    """A default-architecture model with random weights. The diffusion model scores a fixed number of trials per
    cell (no early stopping, which random weights would make arbitrary), so every cell costs the same."""
    from cytoloop.models.baseline import BaselineClassifier
    from cytoloop.models.diffusion import DiffusionClassifier

    classes = ["eosinophil", "lymphocyte", "monocyte", "neutrophil"]
    if kind == "baseline":
        return BaselineClassifier(classes, DataConfig(), BaselineModelConfig()).save(directory)
    scoring = ScoringConfig(min_trials=trials, max_trials=trials, check_every=trials)
    return DiffusionClassifier(classes, DataConfig(), DiffusionModelConfig(), scoring).save(directory)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _load(url: str, cells: list[bytes], clients: int, seconds: float, per_request: int) -> dict:
    """`clients` threads send requests back to back until `seconds` pass; returns the raw measurements."""
    latencies, errors, batches, lock = [], [], {}, threading.Lock()
    deadline = time.perf_counter() + seconds

    def client(seed: int) -> None:
        rng = np.random.default_rng(seed)
        with httpx.Client(timeout=60) as http:
            while time.perf_counter() < deadline:
                files = [("files", (f"c{i}.bmp", cells[int(rng.integers(len(cells)))])) for i in range(per_request)]
                began = time.perf_counter()
                response = http.post(url, files=files)
                elapsed = time.perf_counter() - began
                with lock:
                    if response.status_code != 200:
                        errors.append(response.status_code)
                        continue
                    latencies.append(elapsed)
                    batch = response.json()["batch"]
                    batches[(batch["replica"], batch["batch"])] = (batch["requests"], batch["cells"])

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"latencies": latencies, "errors": errors, "batches": batches, "wall": time.perf_counter() - began}


def _summary(parts: list[dict], per_request: int) -> dict:
    latencies = [x for part in parts for x in part["latencies"]]
    batches = {key: value for part in parts for key, value in part["batches"].items()}
    lat = np.array(latencies) * 1000
    sizes = np.array(list(batches.values()) or [(0, 0)])
    return {
        "requests": len(latencies),
        "errors": sum(len(part["errors"]) for part in parts),
        "cells_per_s": len(latencies) * per_request / sum(part["wall"] for part in parts),
        "p50_ms": float(np.percentile(lat, 50)) if len(lat) else float("nan"),
        "p99_ms": float(np.percentile(lat, 99)) if len(lat) else float("nan"),
        "mean_batch_cells": float(sizes[:, 1].mean()),
        "mean_batch_requests": float(sizes[:, 0].mean()),
    }


def _row(r: dict) -> str:
    return (
        f"| {r['model']} | {r['replicas']} | {r['max_batch']} | {r['cells_per_s']:.1f} | {r['p50_ms']:.0f} | "
        f"{r['p99_ms']:.0f} | {r['mean_batch_cells']:.1f} | {r['requests']} | {r['errors']} |"
    )


def _markdown(rows: list[dict], args, argv) -> str:
    import ray
    import torch

    command = "python benchmarks/serve_load.py " + " ".join(argv if argv is not None else sys.argv[1:])
    ratios = []
    for kind in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == kind]
        ratios.append(
            f"{kind}: "
            + ", ".join(
                f"{r['replicas']} replica(s) batch {r['max_batch']} {r['cells_per_s'] / mine[0]['cells_per_s']:.2f}x"
                for r in mine[1:]
            )
        )
    model = (
        f"`{args.model_dir}`"
        if args.model_dir
        else (
            "untrained models of the default architectures at 32 px (speed does not depend on the weights): the CNN "
            f"baseline, and the diffusion classifier with a fixed {args.trials} scoring trials per cell "
            f"({5 * args.trials} denoiser evaluations with the null class)"
        )
    )
    return "\n".join(
        [
            f"Command: `{command.strip()}` ({date.today().isoformat()}).",
            f"Machine: {os.cpu_count()}-core CPU, no GPU, shared with other work while it ran; Python "
            f"{platform.python_version()}, torch {torch.__version__}, Ray {ray.__version__}. Model: {model}; "
            f"{args.clients} concurrent clients on loopback, {args.cells_per_request} cell(s) per request, "
            f"{args.seconds:g} s per configuration after a 3 s warm-up, in {SLICE_S:g} s slices taking turns (all "
            f"configurations of a model deployed at once). Classifier replicas: 1 torch thread each.",
            "",
            "| model | replicas | max batch | cells/s | p50 ms | p99 ms | mean batch (cells) | requests | errors |",
            "|---|---|---|---|---|---|---|---|---|",
            *(_row(r) for r in rows),
            "",
            f"Throughput relative to 1 replica without batching: {'; '.join(ratios)}. The mean batch is measured "
            "from the responses (cells per model call). The HTTP proxy, the gateway, the replicas and the clients "
            f"all share the machine's {os.cpu_count()} cores (and other work ran beside them): compare rows, not "
            "machines.",
            "",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
