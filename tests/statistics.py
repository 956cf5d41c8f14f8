"""Goodness-of-fit helpers for tests that check a sampler against the distribution it claims.

Tests draw from fixed seeds, so a check either always passes or always fails; the p-value
thresholds only say how unlucky a correct sampler would have to be for the chosen seed.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import chi2

# A correct sampler fails a check with this probability for a random seed; a wrong one at the
# sample sizes used (>= 5,000 draws) gives p-values many orders of magnitude lower.
MIN_P_VALUE = 1e-4


def chi_square(
    counts: np.ndarray, probs: np.ndarray, min_expected: float = 5.0
) -> tuple[float, int]:
    """Pearson statistic and degrees of freedom of counts [N] against probabilities [N].

    Cells expected below ``min_expected`` are pooled (the chi-square approximation needs a few
    per cell). A draw where ``probs`` is exactly 0 fails outright: that is not a fluctuation.
    """
    counts = np.asarray(counts, np.float64)
    probs = np.asarray(probs, np.float64)
    impossible = np.flatnonzero((probs == 0) & (counts > 0))
    assert impossible.size == 0, f"drew tokens of probability 0: {impossible.tolist()}"
    expected = counts.sum() * probs / probs.sum()
    small = expected < min_expected
    obs, exp = counts[~small], expected[~small]
    if expected[small].sum() > 0:
        obs = np.append(obs, counts[small].sum())
        exp = np.append(exp, expected[small].sum())
    return float(np.sum((obs - exp) ** 2 / exp)), max(len(obs) - 1, 0)


def p_value(*tests: tuple[float, int]) -> float:
    """P-value of independent chi-square tests pooled (statistics and dof add up)."""
    stat = sum(s for s, _ in tests)
    dof = sum(d for _, d in tests)
    return 1.0 if dof == 0 else float(chi2.sf(stat, dof))


def fits(counts: np.ndarray, probs: np.ndarray) -> float:
    """P-value of counts [N] drawn from probs [N]."""
    return p_value(chi_square(counts, probs))
