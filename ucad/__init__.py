"""ucad: unsupervised continual anomaly detection with contrastively-learned prompts."""

__version__ = "0.2.0"
