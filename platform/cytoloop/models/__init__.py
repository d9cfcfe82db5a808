"""Classifiers and how they are made: the diffusion classifier, the CNN baseline, the cascade, the interface they
share, the one training loop, fine-tuning and the named recipes of shipped models."""
