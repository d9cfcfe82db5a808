"""Image intake: each kind of bad image is refused with its reason, status and a message naming it."""

from __future__ import annotations

import io

import pytest
from PIL import Image, ImageDraw

from cytoloop.data.intake import CellRejected, Limits, check_image

LIMITS = Limits(max_bytes=200_000, max_pixels=300 * 300)


def _encode(size=(64, 48), fmt="PNG", mode="RGB", blank=False) -> bytes:
    """An image of grey 128 with, unless `blank`, a black corner (something in it)."""
    image = Image.new(mode, size, 128)
    if not blank:
        black = (0, 0, 0, 255) if mode == "RGBA" else 0  # opaque: a transparent image is laid onto white
        ImageDraw.Draw(image).rectangle((0, 0, size[0] // 4, size[1] // 4), fill=black)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize(
    "fmt, mode",
    [
        ("PNG", "RGB"),
        ("JPEG", "L"),
        ("BMP", "RGB"),
        ("TIFF", "RGBA"),
        ("PNG", "I;16"),
    ],
)
def test_accepted_formats_decode_to_rgb(fmt, mode):
    image = check_image(_encode(fmt=fmt, mode=mode), "a", LIMITS)
    assert image.mode == "RGB" and image.size == (64, 48)


def test_real_cell_passes(cells_dir):
    path = next((cells_dir / "jtsc").glob("*.bmp"))
    assert check_image(path.read_bytes(), path.name, LIMITS).size == (120, 120)


def _damaged_tiff() -> bytes:
    """A TIFF whose tag of the resolution unit says another type (RATIONAL): Pillow's decoder raises TypeError."""
    data = bytearray(_encode(size=(24, 24), fmt="TIFF"))
    assert data[72] == 4  # the type field this test damages, where Pillow writes it
    data[72] = 5
    return bytes(data)


@pytest.mark.parametrize(
    "data, reason, status, words",
    [
        (b"", "empty", 422, ["x.png", "empty"]),
        (b"GIF89a" + bytes(100), "not_an_image", 422, ["not an image", "BMP, JPEG, PNG, TIFF"]),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n", "not_an_image", 422, ["not an image"]),  # never handed to Ghostscript
        (bytes(300_000), "too_large", 413, ["300000 bytes", "200000"]),
        (_encode(size=(400, 300)), "too_many_pixels", 413, ["400x300", "90000"]),
        (_encode(size=(200, 200), fmt="BMP")[:5000], "truncated", 422, ["truncated or corrupt BMP"]),
        (_damaged_tiff(), "truncated", 422, ["truncated or corrupt TIFF", "TypeError"]),  # was a 500 for the request
        # one colour: stain normalisation made it a cell-coloured square, answered with confident probabilities
        (_encode(fmt="JPEG", blank=True), "blank", 422, ["blank image", "within 2 levels of RGB (", "no cell"]),
    ],
)
def test_rejections_say_which_and_why(data, reason, status, words):
    with pytest.raises(CellRejected) as caught:
        check_image(data, "x.png", LIMITS)
    error = caught.value
    assert (error.reason, error.status, error.name) == (reason, status, "x.png")
    assert str(error).startswith("x.png: ")
    for word in words:
        assert word in str(error)


def test_the_batch_path_names_a_blank_image_as_such(tiny_settings):
    """Batch scoring and pre-annotation read cells without the HTTP intake (`CellService.classify`): a blank image
    there is the cell's failure, reason `blank`, beside answered cells."""
    from cytoloop.config import RoutingConfig
    from cytoloop.models.baseline import BaselineClassifier
    from cytoloop.serving.inference import CellFailure, CellResult, CellService
    from cytoloop.serving.model_source import ModelRef

    model = BaselineClassifier(["a", "b"], tiny_settings.data, tiny_settings.baseline)
    service = CellService(model, ModelRef("cells", "1", "champion"), RoutingConfig())
    answers = service.classify([("blank.png", _encode(blank=True)), ("cell.png", _encode()), ("x.txt", b"text")])
    assert isinstance(answers[1], CellResult)
    assert [(a.name, a.reason) for a in answers if isinstance(a, CellFailure)] == [
        ("blank.png", "blank"),
        ("x.txt", "not_an_image"),
    ]
