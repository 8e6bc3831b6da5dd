"""Evaluation metrics: the Fréchet distance, the digits classifier yardstick, Inception FID/sFID/IS/P&R.

The submodules `precision_recall` and `inception_score` keep their names (their functions are not re-exported
here, where they would shadow the modules).
"""

from ditkit.metrics.digits_classifier import digits_metrics, get_digits_classifier, real_digits_frechet
from ditkit.metrics.evaluate import evaluate_samples
from ditkit.metrics.frechet import feature_statistics, frechet_distance

__all__ = [
    "digits_metrics",
    "evaluate_samples",
    "feature_statistics",
    "frechet_distance",
    "get_digits_classifier",
    "real_digits_frechet",
]
