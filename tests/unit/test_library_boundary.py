"""The library (`platform/cytoloop`) works without the platform's services: every module imports, and a model
trains and predicts, in a Python where Ray, MLflow, Label Studio's SDK and FastAPI cannot be imported; and it
holds no command line or process manager (those are `ops/`)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

BLOCKED = ("ray", "mlflow", "label_studio_sdk", "fastapi", "uvicorn")

SCRIPT = textwrap.dedent(
    """
    import importlib, pkgutil, sys

    class Block:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"{name} is blocked for this test", name=name)

    sys.meta_path.insert(0, Block())
    import cytoloop
    for module in pkgutil.walk_packages(cytoloop.__path__, "cytoloop."):
        importlib.import_module(module.name)

    import numpy as np
    from cytoloop.config import load_settings
    from cytoloop.train import fit
    from cytoloop.workflows import build_model

    settings = load_settings(overrides={"data": {"image_size": 16}, "baseline": {"channels": (8, 16)},
                                        "train": {"steps": 3, "batch_size": 8, "threads": 1}})
    model = build_model("baseline", ["a", "b"], settings)
    images = np.random.default_rng(0).uniform(-1, 1, (8, 3, 16, 16)).astype(np.float32)
    network, loss = model.objective(settings.train)
    trained, _ = fit(network, loss, images, np.array([0, 1] * 4), settings.train, settings.augment)
    model.use_trained(trained)
    assert model.predict(images).probs.shape == (8, 2)
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    assert not leaked, leaked
    print("library ok")
    """
)


def test_the_library_holds_no_command_line_or_stack_manager():
    import importlib.util

    assert importlib.util.find_spec("cytoloop.cli") is None and importlib.util.find_spec("cytoloop.stack") is None
    assert importlib.util.find_spec("ops.cli") is not None and importlib.util.find_spec("ops.stack") is not None


def test_the_library_needs_no_platform_service():
    result = subprocess.run(
        [sys.executable, "-c", f"BLOCKED = {BLOCKED!r}\n{SCRIPT}"], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0 and "library ok" in result.stdout, result.stderr[-3000:]
