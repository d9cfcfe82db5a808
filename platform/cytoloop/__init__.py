"""CytoLoop: a diffusion-based (generative) blood-cell classifier and the active-learning loop around it.

The library works without Ray, Label Studio or MLflow; `services/`, `jobs/` and `labelstudio/` compose it.
Importing it is cheap: torch and friends are imported by the modules that need them.
"""

__version__ = "0.1.0"
