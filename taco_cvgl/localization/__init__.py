"""Image -> fix: retrieval, heading prior, verification, estimate, track, settings, calibration."""
