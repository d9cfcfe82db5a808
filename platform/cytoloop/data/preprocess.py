"""The one preprocessing path shared by training, serving and pre-annotation.

A cell image becomes a model input here and nowhere else: decode to RGB, crop a square centred on the nucleus and
sized to it (`crop="cell"`, the default; the central square with `crop="center"`, or when no nucleus is found),
resize to the model's resolution, normalise the stain, scale to [-1, 1]. The settings travel inside every saved model
(`DataConfig`), so a served model preprocesses exactly as it was trained.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from cytoloop.config import AugmentConfig, DataConfig
from cytoloop.data.records import CellRecord
from cytoloop.errors import CytoLoopError

if TYPE_CHECKING:
    import torch

# Reinhard et al. (2001): RGB -> LMS -> log -> l-alpha-beta, where colour channels are nearly decorrelated.
_RGB_TO_LMS = np.array([[0.3811, 0.5783, 0.0402], [0.1967, 0.7244, 0.0782], [0.0241, 0.1288, 0.8444]])
_LMS_TO_RGB = np.linalg.inv(_RGB_TO_LMS)
_LOG_LMS_TO_LAB = np.diag([1 / np.sqrt(3), 1 / np.sqrt(6), 1 / np.sqrt(2)]) @ np.array(
    [[1, 1, 1], [1, 1, -2], [1, -1, 0]]
)
_LAB_TO_LOG_LMS = np.linalg.inv(_LOG_LMS_TO_LAB)
# A typical Romanowsky-stained smear (mean and std of l, alpha, beta), the target every cell is mapped to.
REINHARD_REFERENCE = (-0.30, 0.0, 0.01, 0.20, 0.08, 0.012)

# Ruifrok & Johnston stain vectors (haematoxylin, eosin, DAB), used for stain-space colour augmentation.
_RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
_RGB_FROM_HED = _RGB_FROM_HED / np.linalg.norm(_RGB_FROM_HED, axis=1, keepdims=True)
_HED_FROM_RGB = np.linalg.inv(_RGB_FROM_HED)


# the formats any path opens (training, serving, scoring, pre-annotation alike): Pillow would otherwise also open
# GIF, WebP or EPS (whose decoder runs Ghostscript), which serving refused and training and offline scoring took
FORMATS = ("BMP", "JPEG", "PNG", "TIFF")


class ImageError(CytoLoopError, ValueError):
    """An image that cannot be decoded or used; the message names the file (or request item) and why."""


class BlankImageError(ImageError):
    """An image of one colour: there is no cell in it to classify (stain normalisation would paint it as one)."""


ORIENTATION = 0x0112  # the EXIF tag a camera or phone records its turn in
BLANK_LEVELS = 2  # an image whose every channel spans at most this many of 255 levels holds nothing


def decode_image(source: Path | bytes, name: str | None = None) -> Image.Image:
    """Decode BMP/JPEG/PNG/TIFF (any mode) to RGB, turned as its EXIF orientation says (as a viewer, and so an
    annotator, sees it). A truncated or non-image input raises ImageError; a blank one (one colour, within
    `BLANK_LEVELS`) BlankImageError: stain normalisation turned it into a cell-coloured square, answered with
    confident-looking probabilities.

    A greyscale image of more than 8 bits (PNG, TIFF: mode I;16 or I) is scaled to 8 bits by the depth its values
    need (`_bit_depth`: 10, 12, 14 or 16 bits): converted as it was, every value above 255 became white, and a
    12-bit camera's image in a 16-bit file, scaled as 16 bits, came out in 16 grey levels. The depth is guessed
    per image (a file does not say it), so a dim image of a 16-bit camera is brightened like a 12-bit one: stain
    normalisation takes the brightness out again, but the drift monitor's colour statistics (taken before it) see
    it. A float image of 0-1 intensities is scaled to 0-255; an image with transparency is laid onto white."""
    name = name or (str(source) if isinstance(source, Path) else "<bytes>")
    try:
        with Image.open(source if isinstance(source, Path) else io.BytesIO(source), formats=FORMATS) as opened:
            opened.load()  # force the full decode: a truncated file fails here, not later
            rgb = _to_rgb(opened)
    except FileNotFoundError:
        raise ImageError(f"{name}: file not found") from None
    except UnidentifiedImageError:
        raise ImageError(f"{name}: not a readable image in an accepted format ({', '.join(FORMATS)})") from None
    except Image.DecompressionBombError as error:  # not an OSError: one such file stopped a whole dataset's load
        raise ImageError(f"{name}: too many pixels to decode ({error})") from None
    except MemoryError:
        raise
    except Exception as error:  # Pillow's decoders fail in their own ways on damaged files (a TIFF tag of the wrong
        # type: TypeError, OverflowError), and one such file failed a whole request or dataset
        raise ImageError(f"{name}: not a readable image ({type(error).__name__}: {error})") from None
    pixels = np.asarray(rgb)
    low, high = pixels.min(axis=(0, 1)), pixels.max(axis=(0, 1))
    if int((high - low).max()) <= BLANK_LEVELS:
        colour = tuple(int(v) for v in low)
        within = f"every pixel within {BLANK_LEVELS} levels of RGB {colour}"
        raise BlankImageError(f"{name}: a blank image ({within}): no cell")
    return rgb


def _bit_depth(largest: int) -> int:
    """The bits a greyscale image's values were recorded in, from its largest value: 8, or the smallest of the
    cameras' 10, 12, 14 and 16 that holds it."""
    return next(bits for bits in (8, 10, 12, 14, 16) if largest < 2**bits)


def _to_rgb(image: Image.Image) -> Image.Image:
    """A decoded image of any mode as 8-bit RGB (`decode_image`'s rules)."""
    if image.getexif().get(ORIENTATION, 1) != 1:
        image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I;16") or image.mode == "I":
        wide = np.clip(np.asarray(image, dtype=np.int64), 0, 65535)
        top = 2 ** _bit_depth(int(wide.max(initial=0))) - 1
        return Image.fromarray(np.rint(wide * (255 / top)).astype(np.uint8)).convert("RGB")
    if image.mode == "F":  # 32-bit float (TIFF): as 0-1 intensities when it holds them, else 0-255; it was cut
        # to integers, a 0-1 image to black, stain-normalised into a confident-looking cell
        values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        scaled = values * 255.0 if values.max(initial=0.0) <= 1.0 else values
        return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        # onto white, as a viewer shows it: with the alpha dropped, the colours under transparent pixels
        # (whatever the exporting tool left there) decided the model's input
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def center_square(image: Image.Image, crop_fraction: float) -> Image.Image:
    width, height = image.size
    side = max(1, int(round(min(width, height) * crop_fraction)))
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side))


def _otsu_threshold(values: np.ndarray, bins: int = 64) -> float:
    hist, edges = np.histogram(values, bins=bins)
    centers = (edges[:-1] + edges[1:]) / 2
    below = np.cumsum(hist)
    above = below[-1] - below
    mean_below = np.cumsum(hist * centers) / np.maximum(below, 1)
    mean_above = (np.sum(hist * centers) - np.cumsum(hist * centers)) / np.maximum(above, 1)
    return float(centers[np.argmax(below * above * (mean_below - mean_above) ** 2)])


FALLBACK_FRACTION = 0.8  # the 'cell' crop's central square when it finds no nucleus (platelets, erythroblasts)


def cell_square(image: Image.Image, scale: float) -> Image.Image:
    """Crop a square centred on the nucleus nearest the centre, sized to it (`scale` x its radius).

    Labs image cells at different magnifications and framings; cropping by the nucleus puts every cell at about
    the same scale. The nucleus is where green light is absorbed much more than red (purple, unlike pink red
    cells), split from the rest by Otsu's threshold on a 64-px thumbnail, weighted towards the image centre.
    Falls back to the central square of 0.8 of the shorter side when no nucleus is found (`FALLBACK_FRACTION`,
    fixed: not `data.crop_fraction`, which sizes the 'center' crop; every model so far was trained with it).
    """
    side = 64
    thumb = np.asarray(image.resize((side, side), Image.Resampling.BILINEAR), dtype=np.float32) / 255.0
    od = -np.log(np.clip(thumb, 1e-3, 1.0))
    purple = od[..., 1] - 0.5 * od[..., 0]
    mask = purple > _otsu_threshold(purple.ravel())
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32)
    centre = (side - 1) / 2
    weight = mask * np.exp(-((yy - centre) ** 2 + (xx - centre) ** 2) / (2 * (side / 4) ** 2))
    if weight.sum() < 1.0:
        return center_square(image, FALLBACK_FRACTION)
    cy, cx = (weight * yy).sum() / weight.sum(), (weight * xx).sum() / weight.sum()
    nucleus = mask & ((yy - cy) ** 2 + (xx - cx) ** 2 < (side * 0.3) ** 2)
    width, height = image.size
    # the thumbnail squeezes each axis on its own: an area in it is (64 / width) x (64 / height) of the image's, so
    # the radius scales back by the geometric mean of the sides (by the shorter side, a 200 x 100 upload's cell was
    # cropped 1.4x tighter than the same cell in a square image; square images are cropped as before)
    radius = np.sqrt(nucleus.sum() / np.pi) * np.sqrt(width * height) / side
    half = float(np.clip(scale * radius, 0.15 * min(width, height), 0.5 * min(width, height)))
    x0 = float(np.clip(cx * width / side - half, 0, max(0.0, width - 2 * half)))
    y0 = float(np.clip(cy * height / side - half, 0, max(0.0, height - 2 * half)))
    return image.crop((int(x0), int(y0), int(x0 + 2 * half), int(y0 + 2 * half)))


def reinhard_normalize(rgb: np.ndarray, reference: Sequence[float] = REINHARD_REFERENCE) -> np.ndarray:
    """Map an RGB image in [0, 1] (H, W, 3) onto the reference colour moments in l-alpha-beta space."""
    lab = np.log10(np.clip(rgb.reshape(-1, 3) @ _RGB_TO_LMS.T, 1e-4, None)) @ _LOG_LMS_TO_LAB.T
    mean, std = lab.mean(axis=0), lab.std(axis=0) + 1e-6
    target_mean, target_std = np.asarray(reference[:3]), np.asarray(reference[3:])
    lab = (lab - mean) / std * target_std + target_mean
    out = (10 ** (lab @ _LAB_TO_LOG_LMS.T)) @ _LMS_TO_RGB.T
    return np.clip(out, 0.0, 1.0).reshape(rgb.shape)


def colour_moments(rgb: np.ndarray) -> np.ndarray:
    """Mean and std of l, alpha, beta of an RGB image in [0, 1]: the stain statistics drift is measured on."""
    lab = np.log10(np.clip(rgb.reshape(-1, 3) @ _RGB_TO_LMS.T, 1e-4, None)) @ _LOG_LMS_TO_LAB.T
    return np.concatenate([lab.mean(axis=0), lab.std(axis=0)])


def to_model_input(image: Image.Image, config: DataConfig) -> np.ndarray:
    """RGB PIL image -> float32 array (3, S, S) in [-1, 1]: crop, resize, stain-normalise."""
    if config.crop == "cell":
        crop = cell_square(image, config.cell_scale)
    else:
        crop = center_square(image, config.crop_fraction)
    crop = crop.resize((config.image_size, config.image_size), Image.Resampling.BICUBIC, reducing_gap=None)
    rgb = np.asarray(crop, dtype=np.float32) / 255.0
    if config.stain_normalization == "reinhard":
        rgb = reinhard_normalize(rgb, config.stain_reference or REINHARD_REFERENCE)
    return (rgb.transpose(2, 0, 1) * 2.0 - 1.0).astype(np.float32)


def preprocess(source: Path | bytes, config: DataConfig, name: str | None = None) -> np.ndarray:
    """Decode and prepare one cell; raises ImageError for anything that is not a usable image."""
    return to_model_input(decode_image(source, name), config)


@dataclass
class LoadedCells:
    """Cells that decoded, their records, and those that did not (path, reason) — reported, never fatal."""

    images: np.ndarray  # (N, 3, S, S) float32 in [-1, 1]
    records: list[CellRecord]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def skipped_note(self) -> str:
        """For an error about too few cells: how many could not be read, and the first one's path and reason."""
        if not self.skipped:
            return ""
        _, reason = self.skipped[0]  # the reason begins with the file's path
        return f" ({len(self.skipped)} could not be read; the first: {reason})"


def load_cells(records: Sequence[CellRecord], config: DataConfig, progress: bool = False) -> LoadedCells:
    """Preprocess many cells. A corrupt or missing image is skipped with its path and reason; never raises for one."""
    from tqdm.auto import tqdm

    images, kept, skipped = [], [], []
    for record in tqdm(records, desc="loading cells", disable=not progress, unit="cell"):
        try:
            images.append(preprocess(record.path, config))
            kept.append(record)
        except ImageError as error:
            skipped.append((str(record.path), str(error)))
    size = config.image_size
    array = np.stack(images) if images else np.zeros((0, 3, size, size), np.float32)
    return LoadedCells(array, kept, skipped)


def augment(images: torch.Tensor, config: AugmentConfig, generator: torch.Generator) -> torch.Tensor:
    """Random flips, 90-degree rotations and stain/colour jitter on a batch in [-1, 1] (B, 3, H, W).

    Cells have no orientation, so flips and rotations are free; the colour part imitates other labs' stains.
    """
    import torch

    batch = images.shape[0]
    out = images
    if config.flips:
        flip = torch.rand(batch, generator=generator) < 0.5
        out = torch.where(flip[:, None, None, None], out.flip(-1), out)
    if config.rot90:
        turns = torch.randint(0, 4, (batch,), generator=generator)
        out = torch.stack([torch.rot90(img, int(k), dims=(-2, -1)) for img, k in zip(out, turns)])
    rgb = (out + 1.0) / 2.0
    if config.hed_sigma or config.hed_bias:
        od = -torch.log(rgb.clamp(1e-3, 1.0))
        hed = torch.einsum("bchw,cd->bdhw", od, torch.as_tensor(_HED_FROM_RGB, dtype=od.dtype))
        scale = 1 + config.hed_sigma * torch.randn(batch, 3, 1, 1, generator=generator)
        shift = config.hed_bias * torch.randn(batch, 3, 1, 1, generator=generator)
        od = torch.einsum("bdhw,dc->bchw", hed * scale + shift, torch.as_tensor(_RGB_FROM_HED, dtype=od.dtype))
        rgb = torch.exp(-od).clamp(0.0, 1.0)
    if config.brightness:
        rgb = rgb * (1 + config.brightness * (2 * torch.rand(batch, 1, 1, 1, generator=generator) - 1))
    if config.contrast:
        mean = rgb.mean(dim=(1, 2, 3), keepdim=True)
        rgb = (rgb - mean) * (1 + config.contrast * (2 * torch.rand(batch, 1, 1, 1, generator=generator) - 1)) + mean
    if config.saturation:
        grey = rgb.mean(dim=1, keepdim=True)
        rgb = (rgb - grey) * (1 + config.saturation * (2 * torch.rand(batch, 1, 1, 1, generator=generator) - 1)) + grey
    return (rgb.clamp(0.0, 1.0) * 2.0 - 1.0).contiguous()
