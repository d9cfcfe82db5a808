"""Ray Serve applications: thin deployments around library objects (see docs/architecture.md)."""
