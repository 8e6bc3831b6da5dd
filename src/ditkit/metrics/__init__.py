"""Evaluation metrics: the Fréchet distance, the digits classifier yardstick, Inception FID/sFID/IS/P&R."""

from ditkit.metrics.digits_classifier import digits_metrics, get_digits_classifier
from ditkit.metrics.frechet import feature_statistics, frechet_distance

__all__ = ["digits_metrics", "feature_statistics", "frechet_distance", "get_digits_classifier"]
