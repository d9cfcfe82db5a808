"""The `cytoloop` command. One module per command group; each registers its commands on the one `app`.

Thin by design: every command parses and validates its input, calls the library (or a job), and prints what a
person needs. Bad input ends with a one-paragraph message and exit code 2, never a traceback. Heavy imports
(torch, Ray, MLflow, Label Studio) happen inside the commands, so `cytoloop --help` is quick.
"""

# importing a command group registers its commands; `cytoloop --help` lists them in this order
from ops.cli import data, demo, models, registry, review, serve  # noqa: E402, F401, I001
from ops.cli.common import app

__all__ = ["app"]
