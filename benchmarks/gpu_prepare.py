"""Pack, on this machine, what `benchmarks/gpu.sh` needs on a lent GPU machine, which starts bare and reaches nothing.

A device machine gets the repository's tracked files and the folders a call carries, 64 MiB in all; it has PyTorch
but not pydantic, pydantic-settings or diffusers, and none of the shared cells. This writes `.gpu/` (git-ignored):

  whl/       the missing pure-Python packages and pydantic-core, as wheels for the device's Python 3.12
  data/      copies of the cells the GPU run reads, under their paths relative to the shared data folder (so the
             base model's split still names them) and a manifest.csv: the base model's first `--test-cells` test
             cells and `--val-cells` validation cells (classes interleaved, as `fast_paths.py` takes them), the
             first `--blasts` ALL-IDB2 blasts, and `--train-cells` of its training cells for the 32 against 64 px
             comparison (which splits the packed PBC cells again, seeded)
  scorer/    the cheap scorer (the CNN baseline trained on the same PBC cells: `cytoloop train --recipe
             base-pbc-cnn`), which the cascade and the candidate classes need

The copies are never committed (`.gpu/` is ignored) and go only to the lent machine. Then, in one device call:

    python benchmarks/gpu_prepare.py --data ../shared/data/manifest.csv --model models/base-pbc \\
        --scorer runs/reference/cnn-seed0
    device run, carry [".gpu"]:  benchmarks/gpu.sh all      (results under $OUT; see gpu.sh)
"""

from __future__ import annotations

import argparse
import csv
import shutil
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

from cytoloop.data.records import class_interleaved_subset, load_records, select
from cytoloop.models.loading import load_model
from cytoloop.workflows import held_out

# what the device's image lacks (its package list: docs of the device tool); typing-extensions too, as pydantic
# needs a newer one than an image may hold. diffusers' other needs (huggingface-hub, safetensors, regex, requests,
# numpy, Pillow, filelock) are in the image.
WHEELS = ["pydantic", "pydantic-core", "pydantic-settings", "annotated-types", "typing-inspection", "python-dotenv"]
WHEELS += ["typing-extensions", "diffusers", "importlib-metadata"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
LIMIT_MB = 64 * 1.048576  # the device call's working tree, tracked files and carried folders together


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True, help="the combined manifest of all labs")
    parser.add_argument("--model", type=Path, default=Path("models/base-pbc"))
    parser.add_argument("--scorer", type=Path, required=True, help="the CNN baseline trained on the same PBC cells")
    parser.add_argument("--out", type=Path, default=Path(".gpu"))
    parser.add_argument("--test-cells", type=int, default=1600)
    parser.add_argument("--val-cells", type=int, default=200)
    parser.add_argument("--blasts", type=int, default=30)
    parser.add_argument("--train-cells", type=int, default=2400)
    args = parser.parse_args()

    scorer = load_model(args.scorer)  # a damaged scorer is named here, not on the lent machine
    base = load_model(args.model)
    if scorer.classes != base.classes:
        parser.error(f"--scorer classes {scorer.classes} differ from the model's {base.classes}")
    records = load_records(args.data)
    labelled = select([r for r in records if r.label], ["pbc"], base.classes)
    chosen = [
        *class_interleaved_subset(held_out(labelled, args.model, "test")[0], args.test_cells),
        *class_interleaved_subset(held_out(labelled, args.model, "val")[0], args.val_cells),
        *class_interleaved_subset(held_out(labelled, args.model, "train")[0], args.train_cells),
        *[r for r in select(records, ["allidb2"]) if r.label == "blast"][: args.blasts],
    ]
    if args.out.exists():
        shutil.rmtree(args.out)
    data = args.out / "data"
    data.mkdir(parents=True)
    with open(data / "manifest.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "label", "domain", "source"])
        for record in chosen:
            target = data / record.cell_id
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(record.path, target)
            writer.writerow([record.cell_id, record.label or "", record.domain, record.source])
    shutil.copytree(args.scorer, args.out / "scorer", ignore=shutil.ignore_patterns("checkpoints", "*.ckpt"))

    pins = [f"{name}=={version(name)}" for name in WHEELS]
    platforms = [flag for p in PLATFORMS for flag in ("--platform", p)]
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
        + ["--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(args.out / "whl"), *pins],
        check=True,
    )

    tracked = subprocess.run(["git", "ls-files", "-z"], capture_output=True, check=True).stdout.split(b"\0")
    repo_mb = sum(Path(p.decode()).stat().st_size for p in tracked if p and Path(p.decode()).is_file()) / 1e6
    packed_mb = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file()) / 1e6
    print(
        f"{args.out}: {len(chosen)} cells, the scorer and {len(pins)} wheels, {packed_mb:.1f} MB; with the "
        f"repository's {repo_mb:.1f} MB, {packed_mb + repo_mb:.1f} of the device call's {LIMIT_MB:.1f} MB"
    )
    if packed_mb + repo_mb > LIMIT_MB:
        sys.exit("too large for one device call: ask for fewer cells (--train-cells, --test-cells, --blasts)")


if __name__ == "__main__":
    main()
