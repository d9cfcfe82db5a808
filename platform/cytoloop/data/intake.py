"""What a cell image from outside must be before any model sees it.

Serving takes files from other systems, so every image is checked in order of cost: its size in bytes, its format
and pixel count from the header alone (a 100-megapixel PNG is refused before it is decoded), then a full decode (a
truncated file fails here). Only BMP, JPEG, PNG and TIFF are opened: Pillow would otherwise also try formats such
as EPS, whose decoder runs Ghostscript. A rejection says which image, what was wrong and which limit applies, and
carries the HTTP status that fits it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image

from cytoloop.data.preprocess import FORMATS, BlankImageError, ImageError, decode_image


@dataclass(frozen=True)
class Limits:
    max_bytes: int
    max_pixels: int


class CellRejected(ImageError):
    """One image refused at intake. `reason` is a short code (not_an_image, truncated, too_large, too_many_pixels,
    empty, blank; the service adds bad_base64 and bad_name); `status` the HTTP status a request made only of such images
    gets."""

    def __init__(self, name: str, reason: str, detail: str, status: int):
        super().__init__(f"{name}: {detail}")
        self.name, self.reason, self.status = name, reason, status


def check_image(data: bytes, name: str, limits: Limits) -> Image.Image:
    """Validate and decode one image; returns it as RGB or raises CellRejected saying why."""
    if not data:
        raise CellRejected(name, "empty", "empty file (0 bytes)", 422)
    if len(data) > limits.max_bytes:
        raise CellRejected(name, "too_large", f"file of {len(data)} bytes is over the limit of {limits.max_bytes}", 413)
    try:
        with Image.open(io.BytesIO(data), formats=FORMATS) as header:
            width, height, kind = header.width, header.height, header.format
    except Image.DecompressionBombError as error:
        raise CellRejected(name, "too_many_pixels", f"too many pixels ({error})", 413) from None
    except MemoryError:
        raise
    except Exception:  # Pillow's parsers fail in their own ways on damaged headers; each is this cell's failure
        raise CellRejected(
            name, "not_an_image", f"not an image in an accepted format ({', '.join(FORMATS)})", 422
        ) from None
    if width * height > limits.max_pixels:
        raise CellRejected(
            name,
            "too_many_pixels",
            f"{width}x{height} = {width * height} pixels is over the limit of {limits.max_pixels}",
            413,
        )
    try:
        return decode_image(data, name)
    except BlankImageError as error:
        raise CellRejected(name, "blank", str(error).removeprefix(f"{name}: "), 422) from None
    except ImageError as error:
        detail = str(error).removeprefix(f"{name}: ")
        raise CellRejected(name, "truncated", f"truncated or corrupt {kind} data: {detail}", 422) from None
