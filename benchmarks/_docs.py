"""Writing benchmark tables into docs/benchmarks.md, one marked section per benchmark."""

from __future__ import annotations

from pathlib import Path

DOCS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"


def replace_section(path: Path, name: str, body: str, title: str | None = None) -> None:
    """Replace the text between `<!-- name:start -->` and `<!-- name:end -->`; if absent, append the section under
    a `## title` heading. Other sections are left as they are."""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    block = f"{start}\n{body}{end}"
    if start in text and end in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + f"\n\n## {title or name}\n\n{block}\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def environment_prefix() -> str:
    """The CYTOLOOP_* variables this run was given, as a command prefix (they are part of the command)."""
    import os

    return "".join(f"{k}={v} " for k, v in sorted(os.environ.items()) if k.startswith("CYTOLOOP_"))
