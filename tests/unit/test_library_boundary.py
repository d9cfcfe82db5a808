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
    from cytoloop.models.train import fit
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


def test_the_library_has_no_import_cycles():
    """Modules import each other in one direction only, lazy (in-function) imports included: a cycle means two
    modules are one concern, or an interface depends on its implementations."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "platform"
    modules = {}
    for path in (root / "cytoloop").rglob("*.py"):
        name = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cytoloop"):
                targets = {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
                graph[name] |= {t for t in targets if t in modules and t != name}
    # a cycle exists iff some module reaches itself
    for start in graph:
        seen, frontier = set(), list(graph[start])
        while frontier:
            module = frontier.pop()
            assert module != start, f"import cycle through {start}"
            if module not in seen:
                seen.add(module)
                frontier.extend(graph[module])
