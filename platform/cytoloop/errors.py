"""The project's own error types: what a user can cause and fix, as opposed to bugs.

Every error a person can cause (bad input, missing data, a model that does not fit the request, an unreachable
service) derives from `CytoLoopError`; the CLI prints its message and exits with code 2, a service answers it
with a 4xx/5xx body. Anything else (a plain ValueError from a violated internal contract, a TypeError) is a bug:
the CLI lets its traceback show. The concrete errors keep a familiar built-in base too (ValueError, LookupError,
RuntimeError, ConnectionError), so callers may catch them either way.
"""

from __future__ import annotations


class CytoLoopError(Exception):
    """Base of the errors a user can cause and fix."""


def describe_validation_error(error, whole: str | None = None, section: str | None = None) -> str:
    """A pydantic ValidationError as one line a person can act on: each problem as `field.path: message`, joined
    by '; '. A problem with the whole object (a model validator's, no field) is named `whole`, by default the
    model's name (`error.title`), instead of an empty field. `section`: where the object sits in its file, put in
    front of every path (a model.json's `data.image_size`)."""
    name = whole or section or error.title
    return "; ".join(
        f"{'.'.join(map(str, [*([section] if section else []), *e['loc']])) or name}: {_message(e)}"
        for e in error.errors(include_url=False)
    )


def _message(problem: dict) -> str:
    """A validator's own message as it raised it, without pydantic's 'Value error, ' in front."""
    if problem["type"] == "value_error" and "error" in problem.get("ctx", {}):
        return str(problem["ctx"]["error"])
    return problem["msg"]


class UsageError(CytoLoopError, ValueError):
    """A request the input or the model cannot satisfy: an unknown class, recipe or model kind, a device that is
    not there, a move without a reason. The message says what was wrong and what is valid."""
