"""`python -m cytoloop.cli`."""

from cytoloop.cli import app

app()
