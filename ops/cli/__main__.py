"""`python -m ops.cli`."""

from ops.cli import app

app()
