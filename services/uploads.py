"""Reading cell images out of an HTTP request, within the configured limits, and checking each one.

Two forms are accepted on the same path: multipart (`files` parts, plus `site` and `sample_id` fields) and JSON
(`ClassifyRequest`, images base64-encoded). The body is read with a byte cap before anything is parsed, the cell
count is checked before any image is decoded, and then every image goes through `intake.check_image`. Request-level
problems are an HTTPException with a message saying what and which limit; a bad image only fails its own cell.
Nothing given is dropped: a query string (`?site=` would have been answered by the global model), or a multipart
body cut before its closing boundary (its last part, a cell or the site, was lost), is refused.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
from dataclasses import dataclass

from fastapi import HTTPException
from pydantic import ValidationError
from python_multipart.multipart import parse_options_header
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request

from cytoloop.config import ServeConfig
from cytoloop.data.intake import CellRejected, Limits, check_image
from cytoloop.errors import describe_validation_error
from services.schemas import ClassifyRequest

MULTIPART_OVERHEAD = 64 * 1024  # headers and boundaries of a multipart body, beyond its images
CONFIG_HINT = "CYTOLOOP_SERVE__"


@dataclass(frozen=True)
class Upload:
    """A parsed request: its (name, bytes) cells that passed intake, at their positions; rejections by position."""

    site: str | None
    sample_id: str | None
    n_cells: int
    accepted: list[tuple[int, str, bytes]]
    rejected: list[tuple[int, CellRejected]]


def max_body_bytes(config: ServeConfig) -> int:
    """The byte cap of one request: `max_request_bytes`, or less when that many cells at the largest image size
    (base64 makes a file 4/3 as long; JSON and multipart framing add a little) cannot reach it."""
    per_cells = config.max_cells_per_request * (config.max_image_bytes * 4 // 3 + 1024) + MULTIPART_OVERHEAD
    return min(config.max_request_bytes, per_cells)


def _body_limit_hint(config: ServeConfig) -> str:
    """The setting(s) that made `max_body_bytes`, for a 413: raising the other one changes nothing."""
    if max_body_bytes(config) == config.max_request_bytes:
        return f"{CONFIG_HINT}MAX_REQUEST_BYTES"
    return f"{CONFIG_HINT}MAX_CELLS_PER_REQUEST x {CONFIG_HINT}MAX_IMAGE_BYTES"


async def read_upload(request: Request, config: ServeConfig) -> Upload:
    content_type = request.headers.get("content-type", "")
    media_type = content_type.split(";", 1)[0].strip().lower()  # media types are case-insensitive (RFC 9110)
    if media_type not in ("multipart/form-data", "application/json"):  # refused before the body is read
        raise HTTPException(
            415,
            f"unsupported content type {content_type or '(none)'!r}: send multipart/form-data "
            "with 'files' parts, or application/json with base64 'cells'",
        )
    if request.query_params:  # `?site=x` was ignored: the cells were answered by the global model, on all classes
        names = ", ".join(sorted({repr(name) for name in request.query_params}))
        raise HTTPException(
            422, f"unknown query parameter(s) {names}: give site and sample_id in the body (form fields or JSON)"
        )
    body = await _read_capped(request, max_body_bytes(config), _body_limit_hint(config))
    if media_type == "multipart/form-data":
        site, sample_id, named = await _multipart(request, body, config)
    else:  # parsing and base64-decoding up to tens of MB is CPU work: off the event loop
        site, sample_id, named = await asyncio.to_thread(_json, body, config.max_cells_per_request)
    if not named:
        raise HTTPException(400, "empty request: no cell images (send multipart 'files' parts or JSON 'cells')")
    if len(named) > config.max_cells_per_request:
        raise _too_many(len(named), config.max_cells_per_request)
    # decoding images is CPU work: off the event loop, so one large request does not stall every other
    accepted, rejected = await asyncio.to_thread(
        _intake, named, Limits(config.max_image_bytes, config.max_image_pixels)
    )
    return Upload(site, sample_id, len(named), accepted, rejected)


def _intake(named: list, limits: Limits) -> tuple[list[tuple[int, str, bytes]], list[tuple[int, CellRejected]]]:
    accepted, rejected = [], []
    for index, (name, data) in enumerate(named):
        if isinstance(data, CellRejected):
            rejected.append((index, data))
            continue
        try:
            check_image(data, name, limits)
            accepted.append((index, name, data))
        except CellRejected as error:
            rejected.append((index, error))
    return accepted, rejected


def reject_if_nothing_usable(upload: Upload) -> None:
    """A request none of whose cells can be classified is a 4xx naming every cell's problem."""
    if upload.accepted:
        return
    statuses = {error.status for _, error in upload.rejected}
    status = statuses.pop() if len(statuses) == 1 else 422
    problems = "; ".join(f"cell {index}: {error}" for index, error in upload.rejected)
    raise HTTPException(status, f"no usable cell image in the request: {problems}")


def _too_many(n: int, limit: int) -> HTTPException:
    return HTTPException(
        413, f"too many cells: {n} in one request, the limit is {limit} ({CONFIG_HINT}MAX_CELLS_PER_REQUEST)"
    )


async def _read_capped(request: Request, limit: int, hint: str) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"request body of {declared} bytes is over the limit of {limit} ({hint})")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise HTTPException(413, f"request body over the limit of {limit} bytes ({hint})")
        chunks.append(chunk)
    return b"".join(chunks)


async def _multipart(request: Request, body: bytes, config: ServeConfig):
    async def replay():
        return {"type": "http.request", "body": body, "more_body": False}

    boundary = parse_options_header(request.headers.get("content-type", ""))[1].get(b"boundary")
    if boundary and b"--" + boundary + b"--" not in body:  # the parser answered the parts before the cut, silently
        raise HTTPException(
            400, "malformed multipart body: no closing boundary (cut short?); its last part would be lost"
        )
    try:
        form = await Request(request.scope, replay).form(max_files=config.max_cells_per_request + 1, max_fields=16)
    except UnicodeError as error:  # a charset parameter Python has a codec for that cannot decode (a 500 before)
        raise HTTPException(400, f"malformed multipart body: its charset cannot be decoded ({error})") from None
    except (StarletteHTTPException, MultiPartException) as error:  # starlette turns parse errors into a 400
        message = getattr(error, "detail", None) or getattr(error, "message", str(error))
        if "Too many files" in message:
            raise HTTPException(
                413,
                f"too many cells: more than {config.max_cells_per_request} in one request "
                f"({CONFIG_HINT}MAX_CELLS_PER_REQUEST)",
            ) from None
        raise HTTPException(400, f"malformed multipart body: {message}") from None
    unknown = sorted(set(form.keys()) - {"files", "site", "sample_id"})
    if unknown:  # repr: a name decoded with the body's own charset may not be printable, or even UTF-8
        raise HTTPException(
            422, f"unknown form field(s) {', '.join(map(repr, unknown))}; expected files, site, sample_id"
        )
    named = []
    for i, part in enumerate(form.getlist("files")):
        if isinstance(part, str):
            raise HTTPException(422, f"form field 'files' #{i} is text, not a file upload")
        named.append(_named_part(part.filename, await part.read(), i))
    fields = {}
    for field in ("site", "sample_id"):
        given = form.getlist(field)
        if len(given) > 1:  # the last one won: which site's model, or which sample, was then a guess
            raise HTTPException(422, f"form field {field!r} given {len(given)} times; give it once")
        if given and not isinstance(given[0], str):
            raise HTTPException(422, f"form field {field!r} is a file upload, not text")
        # an empty one is refused as JSON's "" is: taken for no site, a lab's cells got the global model silently
        fields[field] = given[0] if given else None
    try:
        parsed = ClassifyRequest(cells=[], **fields)
    except ValidationError as error:
        raise HTTPException(422, _validation_message(error)) from None
    return parsed.site, parsed.sample_id, named


def _named_part(name: str | None, data: bytes, index: int) -> tuple[str, bytes | CellRejected]:
    """A part's file name as the answer echoes it, checked as the JSON form's `name` is (at most 256 characters)
    and for valid UTF-8: a multipart charset such as unicode_escape can make a name the JSON answer cannot hold,
    which failed the whole request with a 500 after its cells were classified. A bad name fails its cell only."""
    fallback = f"cell-{index}"
    if not name:
        return fallback, data
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return fallback, CellRejected(fallback, "bad_name", f"the file name is not valid UTF-8 ({name!r})", 422)
    if len(name) > 256:
        return fallback, CellRejected(
            fallback, "bad_name", f"the file name is {len(name)} characters, at most 256", 422
        )
    return name, data


def _refuse_repeated_keys(pairs: list[tuple[str, object]]) -> dict:
    """A JSON object's members, refusing a name given twice: JSON parsers keep the last, so a body naming `site`
    (or `cells`) twice was answered for whichever came last, the other's cells dropped without a word; the
    multipart form refuses a repeated field for the same reason."""
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise HTTPException(422, f"invalid request: member {key!r} given twice in one JSON object; give it once")
        seen[key] = value
    return seen


def _json(body: bytes, max_cells: int):
    try:
        raw = json.loads(body, object_pairs_hook=_refuse_repeated_keys)
    except (ValueError, RecursionError):  # not JSON (UnicodeDecodeError too), or nested past Python's stack: the
        # validation below names what is wrong
        raw = None
    cells = raw.get("cells") if isinstance(raw, dict) else None
    if isinstance(cells, list) and len(cells) > max_cells:  # before validating and decoding a million cells
        raise _too_many(len(cells), max_cells)
    try:
        parsed = ClassifyRequest.model_validate_json(body)
    except ValidationError as error:
        raise HTTPException(422, _validation_message(error)) from None
    named = []
    for i, cell in enumerate(parsed.cells):
        name = cell.name or f"cell-{i}"
        try:
            named.append((name, base64.b64decode(cell.image_b64, validate=True)))
        except (binascii.Error, ValueError) as error:
            named.append((name, CellRejected(name, "bad_base64", f"image_b64 is not valid base64 ({error})", 422)))
    return parsed.site, parsed.sample_id, named


def _validation_message(error: ValidationError) -> str:
    return "invalid request: " + describe_validation_error(error, whole="body")
