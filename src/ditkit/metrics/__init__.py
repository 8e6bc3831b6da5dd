"""Evaluation metrics: the Fréchet distance, the digits classifier yardstick, Inception FID/sFID/IS/P&R."""

from ditkit.metrics.digits_classifier import digits_metrics, get_digits_classifier, real_digits_frechet
from ditkit.metrics.evaluate import evaluate_samples
from ditkit.metrics.frechet import feature_statistics, frechet_distance
from ditkit.metrics.inception_score import inception_score
from ditkit.metrics.precision_recall import precision_recall

__all__ = [
    "digits_metrics",
    "evaluate_samples",
    "feature_statistics",
    "frechet_distance",
    "get_digits_classifier",
    "inception_score",
    "precision_recall",
    "real_digits_frechet",
]
