"""The diffusion classifier's decision: trials with elimination, and their calibration and tuning."""
