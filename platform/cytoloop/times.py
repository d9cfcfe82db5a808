"""Times as CytoLoop compares them: aware, and UTC where they did not say.

Times arrive as text (Label Studio's `updated_at`, a saved drift flag's window, a retrain state) and as naive
datetimes (a caller's `when`); compared as text they sort wrongly ('…:00.25Z' before '…:00Z'), and a naive one
cannot be compared with an aware one at all.
"""

from __future__ import annotations

from datetime import UTC, datetime

EARLIEST = datetime.min.replace(tzinfo=UTC)


def as_utc(when: datetime) -> datetime:
    """`when`, read as UTC if it carries no zone."""
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def parse_time(text: str | None) -> datetime:
    """An ISO 8601 time for ordering: without a zone it is UTC; empty, missing or unreadable, the earliest."""
    try:
        return as_utc(datetime.fromisoformat(text or ""))
    except ValueError:
        return EARLIEST
