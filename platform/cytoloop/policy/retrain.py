"""When to retrain: the policy (a pure function) and the little state it needs between runs.

A retrain is due when at least N new consensus labels arrived since the last one, or when T hours passed and at
least M did, or when drift was flagged and at least M did (retraining on unchanged labels would not help).
"New" means a (cell, label) pair the last retrain did not train on, so a relabelled cell counts again.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from cytoloop.config import RetrainConfig
from cytoloop.data.records import CellRecord, file_cell_id
from cytoloop.errors import UsageError
from cytoloop.files import write_text
from cytoloop.times import as_utc


@dataclass(frozen=True)
class RetrainDecision:
    due: bool
    reason: str


def retrain_due(
    new_labels: int, hours_since_last: float | None, drift_flagged: bool, config: RetrainConfig
) -> RetrainDecision:
    """Decide whether a retrain is due. `hours_since_last` is None when no retrain ever ran."""
    if new_labels < 0:
        raise ValueError(f"new_labels must be >= 0, got {new_labels}")
    enough = new_labels >= config.min_labels_after_hours
    if new_labels >= config.min_new_labels:
        return RetrainDecision(True, f"{new_labels} new consensus labels >= {config.min_new_labels}")
    if enough and (hours_since_last is None or hours_since_last >= config.max_hours):
        since = "no retrain yet" if hours_since_last is None else f"{hours_since_last:.1f} h since the last retrain"
        return RetrainDecision(True, f"{since} and {new_labels} new labels >= {config.min_labels_after_hours}")
    if config.on_drift and drift_flagged and enough:
        return RetrainDecision(True, f"drift flagged and {new_labels} new labels >= {config.min_labels_after_hours}")
    waited = "never retrained" if hours_since_last is None else f"{hours_since_last:.1f} h of {config.max_hours:g}"
    or_drift = " or drift" if config.on_drift else ""
    flagged = ""
    if drift_flagged:  # said either way: an operator seeing drift flagged must see why it decided nothing
        flagged = "; drift flagged" if config.on_drift else "; drift flagged (ignored: retrain.on_drift is off)"
    return RetrainDecision(
        False,
        f"{new_labels} new labels (need {config.min_new_labels}, or "
        f"{config.min_labels_after_hours} after {config.max_hours:g} h{or_drift}); {waited}{flagged}",
    )


@dataclass
class RetrainState:
    """What the last retrain of a scope (global or a site) trained on, and when it finished."""

    last_time: datetime | None = None
    trained: set[str] = field(default_factory=set)

    def hours_since_last(self, now: datetime | None = None) -> float | None:
        if self.last_time is None:
            return None
        return ((now or datetime.now(UTC)) - self.last_time).total_seconds() / 3600.0


def label_key(record: CellRecord) -> str:
    """A (cell, label) as the state names it: the cell by its image's content (`records.cell_id`, as tasks and
    labels name cells), so an export whose images moved (another mount, another folder) names the same cells and
    its labels do not all count as new; anything but a readable file is named by its path."""
    path = Path(record.path)
    try:
        if path.is_file():
            return f"{file_cell_id(path)}\t{record.label}"
    except (OSError, ValueError):  # unreadable, or a path the OS refuses (a NUL in it)
        pass
    return _path_key(record)


def _path_key(record: CellRecord) -> str:
    """How states written before content keys name a (cell, label): still read, so no label counts new again."""
    return f"{Path(record.path).resolve()}\t{record.label}"


def new_labels(records: Sequence[CellRecord], state: RetrainState) -> list[CellRecord]:
    """Labelled records whose (cell, label) the last retrain did not see."""
    return [
        r
        for r in records
        if r.label is not None and label_key(r) not in state.trained and _path_key(r) not in state.trained
    ]


def state_path(home: Path) -> Path:
    """Where a home keeps its global retrain state."""
    return Path(home) / "retrain" / "state.json"


def load_state(path: Path) -> RetrainState:
    """The last retrain's state (none yet: an empty state). A file that is not one is refused, naming it."""
    path = Path(path)
    if not path.is_file():
        return RetrainState()
    try:
        payload = json.loads(path.read_text())
        last = payload.get("last_time")
        return RetrainState(as_utc(datetime.fromisoformat(last)) if last else None, set(payload.get("trained", [])))
    except (ValueError, TypeError, AttributeError) as error:
        raise UsageError(f"{path} is not a retrain state file ({error}); move it aside to start afresh") from None


def save_state(path: Path, records: Sequence[CellRecord], when: datetime | None = None) -> RetrainState:
    """Record a finished retrain on `records` (written atomically); a `when` without a zone is UTC."""
    last_time = as_utc(when or datetime.now(UTC))
    state = RetrainState(last_time, {label_key(r) for r in records if r.label is not None})
    payload = {"last_time": last_time.isoformat(), "trained": sorted(state.trained)}
    write_text(Path(path), json.dumps(payload))
    return state
