"""Text in: calibration samples and recovery training data."""
