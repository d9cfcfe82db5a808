"""Every registered version as a real MLflow model: a pyfunc flavour around the library's classifier.

So the tools ML-ops teams already use work on CytoLoop's versions: `mlflow.pyfunc.load_model(
"models:/cytoloop-cells@champion").predict(frame)`, `mlflow models serve -m models:/cytoloop-cells/3`, the
MLflow UI's signature and input example. The CytoLoop model directory itself travels inside, as the pyfunc's
artifact `cytoloop` (`artifacts/cytoloop/` in the version's files); Ray Serve keeps loading that directory through
the library (`registry.Registry.load`), never through pyfunc.

Input: a table with one column `image`, each row one cell image (BMP, JPEG, PNG or TIFF) as base64 text, checked
at intake as the service checks an upload (`data.intake`, the default `serve.*` limits): only those four formats are
opened (Pillow would run Ghostscript on EPS), and a file or image too large is refused before it is decoded. Output:
one row per cell, `label`, `confidence`, `anomaly` and one `p_<class>` column per class. Preprocessing is the
service's (`data.preprocess`), scoring the model's own on all its classes to the end: what `POST /v1/classify`
answers for a site without `sites.<site>.classes`, except for the cells the service stops early on a route exit
(marked `provisional` there), which are scored in full here. MLflow is imported only when a model is logged or
loaded, so the library keeps working without it.
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path

import numpy as np

from cytoloop.config import ServeConfig
from cytoloop.data.intake import CellRejected, Limits, check_image
from cytoloop.data.preprocess import to_model_input
from cytoloop.models.base import Classifier
from cytoloop.models.loading import load_model

ARTIFACT = "cytoloop"  # the pyfunc artifact that holds the CytoLoop model directory
IMAGE_COLUMN = "image"


def predict_frame(model: Classifier, frame):
    """The pyfunc answer for a table of base64 cell images (see the module docstring); raises `ImageError` naming
    the first row that is not an accepted image (`CellRejected`: which row and why, as the service says it)."""
    import pandas as pd

    if IMAGE_COLUMN not in frame.columns:
        raise ValueError(f"the input needs a column {IMAGE_COLUMN!r} of base64 images; got {list(frame.columns)}")
    if len(frame) == 0:
        raise ValueError(f"the input has no rows: give one base64 image per row in column {IMAGE_COLUMN!r}")
    defaults = ServeConfig()
    limits = Limits(defaults.max_image_bytes, defaults.max_image_pixels)
    images = np.stack([_cell(text, f"row {i}", model, limits) for i, text in enumerate(frame[IMAGE_COLUMN])])
    predictions = model.predict(images)
    out = pd.DataFrame(
        {
            "label": [model.classes[int(i)] for i in predictions.labels],
            "confidence": predictions.confidence.astype(float),
            "anomaly": predictions.anomaly.astype(float),
        }
    )
    for j, name in enumerate(model.classes):
        out[f"p_{name}"] = predictions.probs[:, j].astype(float)
    return out


def _cell(text, name: str, model: Classifier, limits: Limits) -> np.ndarray:
    """One row's image, checked at intake and prepared as the service prepares it."""
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError, TypeError) as error:
        raise CellRejected(name, "bad_base64", f"not valid base64 text ({error})", 422) from None
    return to_model_input(check_image(data, name, limits), model.data_config)


def output_example(classes: list[str]):
    """One row of the answer's shape (for the signature): built from the classes, not by running the model, so a
    version made for another device (a GPU model registered from a CPU machine) registers all the same."""
    import pandas as pd

    row = {"label": [classes[0]], "confidence": [1.0], "anomaly": [0.0]}
    row |= {f"p_{name}": [1.0 if i == 0 else 0.0] for i, name in enumerate(classes)}
    return pd.DataFrame(row)


def example_frame(model: Classifier):
    """A one-cell input example (a purple disc on a pale square of the model's input size, as PNG: a blank image
    is refused): what the signature is read from and what the MLflow UI shows."""
    import pandas as pd
    from PIL import Image, ImageDraw

    buffer = io.BytesIO()
    side = model.data_config.image_size
    image = Image.new("RGB", (side, side), (230, 215, 225))
    ImageDraw.Draw(image).ellipse((side // 4, side // 4, 3 * side // 4, 3 * side // 4), fill=(150, 80, 170))
    image.save(buffer, format="PNG")
    return pd.DataFrame({IMAGE_COLUMN: [base64.b64encode(buffer.getvalue()).decode()]})


def python_model():
    """The `mlflow.pyfunc.PythonModel` that wraps a CytoLoop model directory (built here, so that importing this
    module needs no MLflow)."""
    import mlflow.pyfunc

    class CytoLoopModel(mlflow.pyfunc.PythonModel):
        def load_context(self, context) -> None:
            self.model = load_model(Path(context.artifacts[ARTIFACT]))

        def predict(self, context, model_input, params=None):
            return predict_frame(self.model, model_input)

    return CytoLoopModel()


def cytoloop_directory(downloaded: Path) -> Path:
    """The CytoLoop model directory inside a downloaded version: the pyfunc's artifact, or (versions registered
    before the pyfunc flavour) the folder itself."""
    inner = Path(downloaded) / "artifacts" / ARTIFACT
    return inner if inner.is_dir() else Path(downloaded)
