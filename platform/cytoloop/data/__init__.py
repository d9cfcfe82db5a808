"""Cells in: records and splits, public datasets, the one preprocessing path, intake checks."""
