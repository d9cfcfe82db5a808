"""Public blood-cell datasets: a small catalogue, a verified download, and where a command finds its cells.

A command that may run without `--data` takes its cells from the path given, else the configured
`datasets.root`, else a public dataset that `cytoloop data fetch` downloaded (`resolve_data`). A download is
checked against the checksum its publisher gives, so a truncated or altered file never becomes training data,
and is converted once into CytoLoop's own layout (one folder per class plus `manifest.csv`), so the rest of the
library reads it like any lab's cells. Only `fetch` needs the network; without it, it fails with one message
saying how to use local images instead.
"""

from __future__ import annotations

import csv
import hashlib
import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
from PIL import Image
from tqdm import tqdm

from cytoloop.data.records import DatasetError

MARKER = "fetched.json"  # written last into a converted dataset: its presence means the dataset is complete
MEDMNIST_SPLITS = ("train", "val", "test")
TIMEOUT = httpx.Timeout(60.0, connect=10.0)

LOCAL_DATA = (
    "give --data PATH (a manifest CSV with columns path,label,domain[,source,license] and paths relative to the "
    "CSV, or a folder with one sub-folder per class), or set it once with CYTOLOOP_DATASETS__ROOT=PATH "
    '(or "datasets": {"root": PATH} in a --config file)'
)


class DownloadError(DatasetError):
    """A public dataset that could not be downloaded or failed its checksum; the message says how to go on."""


class NoDataError(DatasetError):
    """No cells given, configured or fetched; the message names the places looked at and how to fix it."""


@dataclass(frozen=True)
class PublicDataset:
    """One catalogue entry.

    A downloadable entry (`url` and `md5` set) is a MedMNIST archive: `.npz` with `<split>_images` and
    `<split>_labels` for train, val and test, whose label index i is CytoLoop class `classes[i]`. An entry
    without a stable URL and published checksum is never downloaded blindly: `manual` says how to get it by hand.
    """

    name: str
    description: str
    license: str
    homepage: str
    url: str | None = None
    md5: str | None = None
    checksum_source: str = ""
    classes: tuple[str, ...] = ()
    domain: str = ""
    source: str = ""
    manual: str = ""


# BloodMNIST's label indices in MedMNIST's order, as CytoLoop class names: lowercase single words like those of the
# shared cells, so that they work as folder names and in --classes lists.
BLOODMNIST_CLASSES = (
    "basophil",
    "eosinophil",
    "erythroblast",
    "immature_granulocyte",
    "lymphocyte",
    "monocyte",
    "neutrophil",
    "platelet",
)


def _bloodmnist(name: str, pixels: int, url: str, md5: str, md5_key: str) -> PublicDataset:
    return PublicDataset(
        name=name,
        description=f"17,092 normal peripheral blood cells, {pixels}x{pixels} px, 8 classes (train/val/test)",
        license="CC BY 4.0",
        homepage="https://medmnist.com/",
        url=url,
        md5=md5,
        checksum_source=f"INFO['bloodmnist']['{md5_key}'] in medmnist 3.0.2 (github.com/MedMNIST/MedMNIST, "
        "medmnist/info.py)",
        classes=BLOODMNIST_CLASSES,
        domain="bloodmnist",
        source="BloodMNIST (MedMNIST v3, Yang et al. 2023) of the PBC dataset (Acevedo et al. 2020)",
    )


CATALOGUE: dict[str, PublicDataset] = {
    entry.name: entry
    for entry in (
        _bloodmnist(
            "bloodmnist",
            28,
            "https://zenodo.org/records/10519652/files/bloodmnist.npz?download=1",
            "7053d0359d879ad8a5505303e11de1dc",
            "MD5",
        ),
        _bloodmnist(
            "bloodmnist_64",
            64,
            "https://zenodo.org/records/10519652/files/bloodmnist_64.npz?download=1",
            "2b94928a2ae4916078ca51e05b6b800b",
            "MD5_64",
        ),
        _bloodmnist(
            "bloodmnist_128",
            128,
            "https://zenodo.org/records/10519652/files/bloodmnist_128.npz?download=1",
            "adace1e0ed228fccda1f39692059dd4c",
            "MD5_128",
        ),
        _bloodmnist(
            "bloodmnist_224",
            224,
            "https://zenodo.org/records/10519652/files/bloodmnist_224.npz?download=1",
            "b718ff6835fcbdb22ba9eacccd7b2601",
            "MD5_224",
        ),
        PublicDataset(
            name="pbc",
            description="17,092 normal peripheral blood cells, 360x363 px JPEG, 8 classes (Acevedo et al. 2020, "
            "Hospital Clinic of Barcelona, CellaVision DM96)",
            license="CC BY 4.0",
            homepage="https://data.mendeley.com/datasets/snkd93bnjr/1",
            manual="Mendeley Data gives it no stable direct link and no published checksum, so CytoLoop does not "
            "download it: download the archive from https://data.mendeley.com/datasets/snkd93bnjr/1 "
            "(doi:10.17632/snkd93bnjr.1), unzip it, and give its folder of per-class sub-folders as --data PATH "
            "or CYTOLOOP_DATASETS__ROOT=PATH.",
        ),
    )
}


def lookup(name: str, catalogue: Mapping[str, PublicDataset] = CATALOGUE) -> PublicDataset:
    """The catalogue entry called `name`; an unknown name is an error listing the known ones."""
    if name not in catalogue:
        raise DatasetError(f"unknown dataset {name!r}; known: {', '.join(catalogue)}")
    return catalogue[name]


def fetched(name: str, dest_dir: Path, catalogue: Mapping[str, PublicDataset] = CATALOGUE) -> Path | None:
    """The folder of `name` under `dest_dir` if it was fetched and converted completely from the archive the
    catalogue names now (a changed checksum means a new release: it is fetched again); else None."""
    entry = lookup(name, catalogue)
    marker = Path(dest_dir) / entry.name / MARKER
    try:
        recorded = json.loads(marker.read_text()) if marker.is_file() else {}
    except (ValueError, OSError):  # a marker cut short (a full disk): not known to be complete, so fetched again
        recorded = {}
    if entry.md5 and isinstance(recorded, dict) and recorded.get("md5") == entry.md5:
        return marker.parent
    return None


def fetch(name: str, dest_dir: Path, progress: bool = True, catalogue: Mapping[str, PublicDataset] = CATALOGUE) -> Path:
    """Download `name` into `dest_dir`, verify its checksum and convert it to `dest_dir/<name>/` (class folders of
    PNGs plus `manifest.csv`); returns that folder, which `data.load_records` reads.

    Idempotent: a dataset already fetched is returned without touching the network. An interrupted download
    leaves `<name>.npz.part`, which the next call resumes; a file failing its checksum is removed.
    """
    entry = lookup(name, catalogue)
    done = fetched(name, dest_dir, catalogue)
    if done is not None:
        return done
    if entry.url is None or entry.md5 is None:
        raise DatasetError(f"{name} cannot be fetched automatically. {entry.manual}")
    dest_dir = Path(dest_dir)
    dest_dir.mkdir(parents=True, exist_ok=True)
    archive = dest_dir / f"{entry.name}.npz"
    if not archive.is_file():
        _download(entry.url, archive, progress)
    _verify(archive, entry.md5)
    folder = _convert_medmnist(archive, dest_dir / entry.name, entry, progress)
    archive.unlink()  # the PNGs hold the same cells
    return folder


def resolve_data(
    given: Path | None, configured: Path | None, cache_dir: Path, catalogue: Mapping[str, PublicDataset] = CATALOGUE
) -> Path:
    """Where a command's cells come from: the path given, else the configured path if it exists, else the first
    catalogue dataset fetched into `cache_dir`.

    A path given on the command line that does not exist is an error, never replaced by other data (a typo must
    not silently train on something else); a configured path is a standing default that may be missing on this
    machine, so the search goes on. Finding nothing raises one `NoDataError` naming every place looked at.
    """
    if given is not None:
        if Path(given).exists():
            return Path(given)
        raise NoDataError(f"--data {given} does not exist; {LOCAL_DATA}.")
    if configured is not None and Path(configured).exists():
        return Path(configured)
    for name in catalogue:
        folder = fetched(name, cache_dir, catalogue)
        if folder is not None:
            return folder
    configured_place = f"{configured} (does not exist)" if configured is not None else "not set"
    downloadable = [entry.name for entry in catalogue.values() if entry.url]
    fetch_hint = ""
    if downloadable:
        fetch_hint = f", or, when online, run `cytoloop data fetch {downloadable[0]}` to download one into {cache_dir}"
    raise NoDataError(
        f"no cell images found. Looked at: --data (not given); datasets.root ({configured_place}); {cache_dir} "
        f"(no dataset fetched by `cytoloop data fetch`). To fix it, {LOCAL_DATA}{fetch_hint}."
    )


def _download(url: str, archive: Path, progress: bool) -> None:
    """Stream `url` into `<archive>.part` (resuming what an interrupted call left), then rename it to `archive`,
    so that `archive` only ever exists complete."""
    part = archive.with_name(archive.name + ".part")
    have = part.stat().st_size if part.is_file() else 0
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        with httpx.stream("GET", url, headers=headers, follow_redirects=True, timeout=TIMEOUT) as response:
            if response.status_code != 416:  # 416: the part already holds the whole file; the checksum decides
                response.raise_for_status()
                _write(response, part, have if response.status_code == 206 else 0, progress)
    except httpx.HTTPStatusError as error:
        raise DownloadError(
            f"cannot download {url}: the server answered {error.response.status_code}. "
            f"To use local images instead, {LOCAL_DATA}."
        ) from None
    except httpx.TransportError as error:
        kept = " The part downloaded is kept; the next fetch resumes it." if part.is_file() else ""
        raise DownloadError(
            f"cannot download {url}: the network is unreachable or the connection dropped "
            f"({type(error).__name__}: {error}).{kept} To use local images instead, {LOCAL_DATA}."
        ) from None
    part.replace(archive)


def _write(response: httpx.Response, part: Path, offset: int, progress: bool) -> None:
    """Append the response body to `part` from byte `offset` (0 starts it afresh), with a progress bar."""
    remaining = int(response.headers.get("content-length", 0))
    with (
        part.open("ab" if offset else "wb") as out,
        tqdm(
            total=offset + remaining or None,
            initial=offset,
            unit="B",
            unit_scale=True,
            desc=part.stem,
            disable=not progress,
        ) as bar,
    ):
        for chunk in response.iter_bytes(1 << 20):
            out.write(chunk)
            bar.update(len(chunk))


def _verify(archive: Path, expected: str) -> None:
    digest = hashlib.md5(usedforsecurity=False)
    with archive.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    got = digest.hexdigest()
    if got != expected:
        archive.unlink()
        raise DownloadError(
            f"{archive.name} failed its checksum: expected MD5 {expected}, got {got}; the file was removed "
            "(run the fetch again to download it afresh)"
        )


def _convert_medmnist(archive: Path, target: Path, entry: PublicDataset, progress: bool) -> Path:
    """Write a MedMNIST archive as `<class>/<split>_<index>.png` plus `manifest.csv`.

    The conversion goes into a hidden sibling folder renamed to `target` only when complete, so an interrupted
    conversion never looks like a dataset.
    """
    if target.exists() and not (target / MARKER).is_file():
        raise DatasetError(f"{target} exists and is not a dataset fetched by CytoLoop; choose another --dest")
    partial = target.with_name(f".{target.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        with np.load(archive) as arrays:
            expected = [f"{split}_{kind}" for split in MEDMNIST_SPLITS for kind in ("images", "labels")]
            missing = [key for key in expected if key not in arrays.files]
            if missing:
                raise DatasetError(f"{archive}: not a MedMNIST archive (missing {', '.join(missing)})")
            rows = []
            for class_name in entry.classes:
                (partial / class_name).mkdir(parents=True)
            for split in MEDMNIST_SPLITS:
                images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"].reshape(-1)
                if len(labels) and (labels.min() < 0 or labels.max() >= len(entry.classes)):
                    raise DatasetError(f"{archive}: {split} labels outside 0..{len(entry.classes) - 1}")
                for i in tqdm(range(len(images)), desc=f"{entry.name} {split}", unit="cell", disable=not progress):
                    label = entry.classes[labels[i]]
                    path = f"{label}/{split}_{i:05d}.png"
                    Image.fromarray(images[i]).save(partial / path)
                    rows.append((path, label, entry.domain, entry.source, entry.license))
        with (partial / "manifest.csv").open("w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(("path", "label", "domain", "source", "license"))
            writer.writerows(rows)
        (partial / MARKER).write_text(
            json.dumps({"name": entry.name, "url": entry.url, "md5": entry.md5, "cells": len(rows)}, indent=1)
        )
        shutil.rmtree(target, ignore_errors=True)  # an older release of this dataset (its marker said so)
        partial.replace(target)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return target
