"""Datasets of single-cell crops: reading them, selecting from them and splitting them reproducibly.

A dataset is either a manifest CSV (`path,label,domain[,source,license]`, paths relative to the CSV) or a folder
with one sub-folder per class. Records only point at images; `preprocess.load_cells` reads the pixels, so a
corrupt file costs one skipped cell, never a run.
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import posixpath
import random
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from cytoloop.errors import CytoLoopError
from cytoloop.files import write_text

logger = logging.getLogger(__name__)
IMAGE_SUFFIXES = {".bmp", ".jpg", ".jpeg", ".png", ".tif", ".tiff"}
REQUIRED_COLUMNS = ("path", "label", "domain")


class DatasetError(CytoLoopError, ValueError):
    """A dataset, selection or split that cannot be used as given; the message says what and where."""


def cell_id(data: bytes) -> str:
    """A stable identity of a cell image (its content), so the same image is routed, audited, labelled and counted
    the same way wherever its file lies. (Not `CellRecord.cell_id`, which names a file by its dataset path.)"""
    return _content_id(hashlib.sha256(data).hexdigest())


def file_cell_id(path: Path) -> str:
    """`cell_id` of an image file, read in chunks (a huge file is hashed, never held whole)."""
    with Path(path).open("rb") as handle:
        return _content_id(hashlib.file_digest(handle, "sha256").hexdigest())


def cell_identity(path: Path | str) -> str:
    """Which cell a file is, for telling the cells of two lists apart (frozen, trained on, judged on): its image's
    content (`file_cell_id`), so a copy under another path or mount (a lab's audited manifest, an export naming
    the pool's folder) is the same cell; a file that cannot be read is its resolved path. Compared by path alone,
    a copy of a gate's cell was trained on and then judged on."""
    try:
        return file_cell_id(Path(path))
    except (OSError, ValueError):  # missing or unreadable, or a path the OS refuses (a NUL in it)
        return f"path:{Path(path).resolve()}"


def _content_id(sha256_hex: str) -> str:
    return "sha256:" + sha256_hex[:24]


@dataclass(frozen=True)
class CellRecord:
    """One cell image. `cell_id` is the path relative to the dataset root: stable across machines.

    `label` is None for an unlabeled cell (it still trains the generative model's null class).
    """

    cell_id: str
    path: Path
    label: str | None
    domain: str
    source: str = ""
    license: str = ""


def load_records(data: Path | str) -> list[CellRecord]:
    """Read a manifest CSV, a folder holding `manifest.csv`, or a folder with one sub-folder per class."""
    data = Path(data)
    if data.is_file():
        return read_manifest(data)
    if (data / "manifest.csv").is_file():
        return read_manifest(data / "manifest.csv")
    if data.is_dir():
        return read_class_folders(data)
    raise DatasetError(f"dataset not found: {data} (give a manifest CSV or a folder with one sub-folder per class)")


def read_manifest(path: Path) -> list[CellRecord]:
    """A manifest's cells. A row's path is relative to the CSV (or absolute) and its id is that path written
    plainly (`./a.png`, `x/../a.png` and `a.png` are one cell), so a split names it the same way however it was
    written; a file listed twice, however its paths are written, is an error, since one cell in two rows could land
    in training and test at once."""
    root = path.parent.resolve()
    try:
        return _read_manifest(path, root)
    except UnicodeDecodeError as error:
        raise DatasetError(f"{path} is not UTF-8 text (byte {error.start}): save the manifest as CSV, UTF-8") from None


def _read_manifest(path: Path, root: Path) -> list[CellRecord]:
    with path.open(newline="", encoding="utf-8-sig") as handle:  # -sig: the byte-order mark Excel writes
        reader = csv.DictReader(handle)
        missing = [c for c in REQUIRED_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            found = ", ".join(repr(c) for c in reader.fieldnames or []) or "none"
            raise DatasetError(
                f"{path}: missing column(s) {', '.join(missing)}; expected {','.join(REQUIRED_COLUMNS)} "
                f"(comma-separated), found the columns {found}"
            )
        header = [c.strip() for c in reader.fieldnames or []]
        if twice := sorted({c for c in header if c and header.count(c) > 1}):  # the last one's values were read
            raise DatasetError(f"{path}: the header names column(s) {', '.join(twice)} more than once")
        records: list[CellRecord] = []
        first_line: dict[str, int] = {}
        for row in reader:
            line = reader.line_num  # the file's line (a blank line, or a quoted field over lines, counts)
            short = [c for c in REQUIRED_COLUMNS if row.get(c) is None]
            if short:
                raise DatasetError(f"{path}:{line}: the row has no {', '.join(short)} (fewer fields than the header)")
            if any(extra.strip() for extra in row.get(None) or []):  # (a trailing comma's empty field is fine)
                # an unquoted comma in a path shifted every field: 'a, b.png' read as path 'a'
                raise DatasetError(
                    f"{path}:{line}: the row has more fields than the header ({len(reader.fieldnames or [])}); "
                    "quote a path or label that holds a comma"
                )
            if not row["path"].strip():
                raise DatasetError(f"{path}:{line}: empty path")
            if [(row.get(c) or "").strip() for c in REQUIRED_COLUMNS] == list(REQUIRED_COLUMNS):
                # two manifests joined end to end: their second header was a cell 'path' of class 'label'
                raise DatasetError(f"{path}:{line}: the header again (two manifests joined?): remove the line")
            if "\\" in row["path"]:  # read as part of a file name: the cell was 'not found', the path never named
                raise DatasetError(f"{path}:{line}: {row['path'].strip()} uses '\\': write paths with '/'")
            cell_id = posixpath.normpath(PurePosixPath(row["path"].strip()).as_posix())
            file = os.path.normpath(root / cell_id)  # 'a/../b.png', 'b.png' and '/data/b.png' name one file
            if file in first_line:
                raise DatasetError(f"{path}:{line}: {cell_id} is listed again (first on line {first_line[file]})")
            first_line[file] = line
            records.append(
                CellRecord(
                    cell_id=cell_id,
                    path=Path(file),
                    label=row["label"].strip() or None,
                    domain=row["domain"].strip() or "default",
                    source=(row.get("source") or "").strip(),
                    license=(row.get("license") or "").strip(),
                )
            )
    if not records:
        raise DatasetError(f"{path}: the manifest lists no cells")
    return records


def read_class_folders(root: Path, domain: str | None = None) -> list[CellRecord]:
    """A folder per class; the domain defaults to the root folder's name."""
    root = root.resolve()
    domain = domain or root.name
    records = [
        CellRecord(cell_id=str(p.relative_to(root)), path=p, label=p.parent.name, domain=domain)
        for class_dir in sorted(d for d in root.iterdir() if d.is_dir())
        for p in sorted(class_dir.iterdir())
        if p.suffix.lower() in IMAGE_SUFFIXES
    ]
    if not records:
        raise DatasetError(f"{root}: no images found in per-class sub-folders ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return records


def select(
    records: Sequence[CellRecord],
    domains: Iterable[str] | None = None,
    classes: Iterable[str] | None = None,
) -> list[CellRecord]:
    """Keep the records of the given domains and classes. Naming one that the dataset lacks is an error that
    lists the valid choices (a typo must never silently select nothing)."""
    chosen = list(records)
    if domains:
        domains = list(domains)
        _check_known("domain", domains, {r.domain for r in records})
        chosen = [r for r in chosen if r.domain in domains]
    if classes:
        classes = list(classes)
        _check_known("class", classes, {r.label for r in records if r.label is not None})
        chosen = [r for r in chosen if r.label in classes]
    if not chosen:
        raise DatasetError(f"no cells left after selecting domains={domains} classes={classes}")
    return chosen


def _check_known(kind: str, asked: list[str], known: set[str]) -> None:
    unknown = [a for a in asked if a not in known]
    if unknown:
        raise DatasetError(f"no cells of {kind}(s) {', '.join(unknown)}; these cells have: {', '.join(sorted(known))}")


def stratified_split(
    records: Sequence[CellRecord],
    fractions: dict[str, float],
    seed: int = 0,
    together: Callable[[CellRecord], str] | None = None,
) -> dict[str, list[CellRecord]]:
    """Split each (label, domain) stratum by the given fractions, seeded.

    Fractions must sum to 1. Every stratum keeps at least one cell in the first part; small strata give their
    remaining cells to the later parts in order, so a rare class still appears in validation and test (a part
    of fraction 0 gets none; with `together`, unless its one cell there is a copy of an earlier part's).

    `together` (e.g. `cell_identity`: the image's content) names cells that must share a part: copies of one image
    under two names (PBC holds 16 such pairs) were split apart, a test cell then being a training cell's copy.
    Each such group goes to the earliest part (in `fractions`' order) any of its cells was drawn for, so the other
    cells' parts are the same as without it.
    """
    bad = {name: f for name, f in fractions.items() if not 0.0 <= f <= 1.0}  # NaN fails both comparisons
    if bad:
        raise DatasetError(f"split fractions must each lie in [0, 1], got {bad}")
    if abs(sum(fractions.values()) - 1.0) > 1e-6:
        raise DatasetError(f"split fractions must sum to 1, got {fractions}")
    strata: dict[tuple, list[CellRecord]] = defaultdict(list)
    for record in records:
        strata[(record.label or "", record.domain)].append(record)
    rng = random.Random(seed)
    parts: dict[str, list[CellRecord]] = {name: [] for name in fractions}
    names = list(fractions)
    for key in sorted(strata):
        members = sorted(strata[key], key=lambda r: r.cell_id)
        rng.shuffle(members)
        counts = [int(round(fractions[n] * len(members))) for n in names[1:]]
        while sum(counts) >= len(members) and any(counts):  # keep one for the first part
            counts[counts.index(max(counts))] -= 1
        for i, count in enumerate(counts):  # a rare class still gets a cell in each later part, while it can
            if count == 0 and fractions[names[i + 1]] > 0 and len(members) - sum(counts) > 1:
                counts[i] = 1
        start = len(members) - sum(counts)
        parts[names[0]].extend(members[:start])
        for name, count in zip(names[1:], counts):
            parts[name].extend(members[start : start + count])
            start += count
    if together is not None:
        parts = _keep_together(parts, names, together)
    return parts


def _keep_together(
    parts: dict[str, list[CellRecord]], names: list[str], together: Callable[[CellRecord], str]
) -> dict[str, list[CellRecord]]:
    """Move each group of `together` to the earliest part holding one of its cells (see `stratified_split`)."""
    drawn = [(index, record) for index, name in enumerate(names) for record in parts[name]]
    keys = [together(record) for _, record in drawn]  # once per cell: it may read the image
    earliest: dict[str, int] = {}
    groups: dict[str, set[str | None]] = defaultdict(set)
    for (index, record), key in zip(drawn, keys):
        earliest.setdefault(key, index)
        groups[key].add(record.label)
    moved: dict[str, list[CellRecord]] = {name: [] for name in names}
    for (_, record), key in zip(drawn, keys):
        moved[names[earliest[key]]].append(record)
    conflicting = sum(len(labels) > 1 for labels in groups.values())
    if conflicting:
        logger.warning(f"{conflicting} image(s) listed under several names carry different labels; kept together")
    return moved


def write_split(parts: Mapping[str, Sequence[CellRecord]], path: Path, **meta: object) -> Path:
    """Write a split as cell ids per part, so every later evaluation can use exactly the same cells."""
    payload = {"meta": meta, "parts": {name: sorted(r.cell_id for r in recs) for name, recs in parts.items()}}
    write_text(path, json.dumps(payload, indent=1))
    return path


def read_split_file(path: Path) -> dict:
    """A split file as `write_split` wrote it (`{"meta": {...}, "parts": {part: [cell ids]}}`); a file cut short,
    not JSON or of another shape is a DatasetError naming it, never a KeyError in whatever reads it next."""
    try:
        split = json.loads(Path(path).read_text())
    except ValueError as error:  # cut short, or not text
        raise DatasetError(f"{path}: not a split file ({error}); the file is damaged or was cut short") from None
    parts = split.get("parts") if isinstance(split, dict) else None
    if (
        not isinstance(parts, dict)
        or not isinstance(split.get("meta", {}), dict)
        or not all(isinstance(ids, list) and all(isinstance(i, str) for i in ids) for ids in parts.values())
    ):
        raise DatasetError(
            f'{path}: not a split file (expected {{"meta": {{...}}, "parts": {{part: [cell ids]}}}}); it is damaged'
        )
    return split


def read_split(path: Path, records: Sequence[CellRecord]) -> dict[str, list[CellRecord]]:
    """Resolve a split written by `write_split` against a dataset's records; missing ids are an error."""
    named = read_split_file(path)["parts"].items()
    by_id = {r.cell_id: r for r in records}
    parts = {}
    for name, ids in named:
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise DatasetError(
                f"{path}: {len(missing)} cell(s) of part '{name}' are not in the dataset, e.g. {missing[0]}"
            )
        parts[name] = [by_id[i] for i in ids]
    return parts


def records_fingerprint(records: Iterable[CellRecord]) -> str:
    """A short hash of which cells (and labels) a model saw: a data snapshot id for provenance."""
    digest = hashlib.sha256()
    for record in sorted(records, key=lambda r: r.cell_id):
        digest.update(f"{record.cell_id}\t{record.label}\t{record.domain}\n".encode())
    return digest.hexdigest()[:16]


def class_interleaved_subset(records: Sequence[CellRecord], n: int | None) -> list[CellRecord]:
    """The first `n` records in a fixed order that interleaves the classes (sorted by id within each class), so a
    subset keeps the class mix and every run, on any machine, takes the same cells. All of them when n is None or
    not smaller than their number."""
    if n is not None and n < 1:
        raise DatasetError(f"a subset of {n} cells: ask for at least 1 (None: all of them)")
    if n is None or n >= len(records):
        return list(records)
    by_class: dict[str, list[CellRecord]] = {}
    for record in sorted(records, key=lambda r: r.cell_id):
        by_class.setdefault(record.label or "", []).append(record)
    order = sorted(
        ((i / len(group), label, record) for label, group in by_class.items() for i, record in enumerate(group)),
        key=lambda x: (x[0], x[1]),
    )
    return [record for _, _, record in order[:n]]


def data_sources(records: Iterable[CellRecord]) -> list[dict]:
    """Where cells come from, for provenance and attribution: one entry per (domain, source, licence) with its
    number of cells, as the manifest's `source` and `license` columns give them."""
    counts: dict[tuple[str, str, str], int] = defaultdict(int)
    for record in records:
        counts[(record.domain, record.source, record.license)] += 1
    return [{"domain": d, "source": s, "license": lic, "cells": n} for (d, s, lic), n in sorted(counts.items())]
