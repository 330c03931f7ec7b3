"""Confidence intervals by the bootstrap: one home, so every figure LexAlign reports (win rates, IFEval
accuracies, KL estimates) draws its resamples the same way and two runs' intervals can be compared."""
from __future__ import annotations

BOOTSTRAP_SAMPLES = 2000


def bootstrap_interval(scores: list[float], seed: int, samples: int = BOOTSTRAP_SAMPLES) -> tuple:
    """The 95% percentile interval of the mean of `scores`, resampling prompts with replacement (seeded)."""
    import numpy as np

    if not scores:
        return None, None
    values = np.asarray(scores, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(samples, len(values)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)
