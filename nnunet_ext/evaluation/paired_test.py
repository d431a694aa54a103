"""Paired comparison of two trainers on the same cases: the Wilcoxon signed-rank test.

Per class, the pairs are the (fold, case) keys that both trainers evaluated and where both values
are defined (not NaN; Dice is NaN when prediction and reference are both empty). With differences
``d = other - reference`` the test is ``scipy.stats.wilcoxon(other, reference)`` with scipy's
defaults: two-sided, ``zero_method='wilcox'`` (zero differences are dropped before ranking),
``method='auto'`` (exact null distribution without ties or zeros, a permutation test with them up to
13 pairs, the normal approximation beyond). Where no test is possible the result says why instead of
a p-value: no pair at all, or every difference zero (identical values on every case). With ``n``
non-zero differences the smallest attainable two-sided p is ``2 / 2**n``, so fewer than 6 can never
reach p < 0.05; the result notes that (the test is still run).
"""
from __future__ import annotations

import math
import warnings
from typing import Hashable, Mapping

import numpy as np

__all__ = ["WILCOXON_CONVENTION", "paired_wilcoxon"]

WILCOXON_CONVENTION = ("scipy.stats.wilcoxon(other, reference), two-sided, zero_method='wilcox' (zero "
                       "differences dropped), method='auto'; pairs: the (fold, case) keys evaluated for both "
                       "trainers with a defined (non-NaN) value for both; differences: other - reference")


def paired_wilcoxon(reference: Mapping[Hashable, float], other: Mapping[Hashable, float]) -> dict:
    """Wilcoxon signed-rank test of ``other`` against ``reference`` over their common keys.

    Returns ``n_pairs``, ``n_nonzero``, ``mean_difference``, ``median_difference`` (other - reference),
    ``statistic`` and ``p`` (None when no test is possible), and ``note``: why there is no test, or a
    caveat about it (None otherwise).
    """
    keys = sorted((k for k in reference.keys() & other.keys()
                   if not math.isnan(reference[k]) and not math.isnan(other[k])), key=repr)
    x = np.array([other[k] for k in keys], dtype=float)
    y = np.array([reference[k] for k in keys], dtype=float)
    d = x - y
    n_nonzero = int(np.count_nonzero(d))
    result = {"n_pairs": len(keys), "n_nonzero": n_nonzero,
              "mean_difference": float(d.mean()) if keys else None,
              "median_difference": float(np.median(d)) if keys else None,
              "statistic": None, "p": None, "note": None}
    if not keys:
        result["note"] = "no test: no case with a value for both trainers"
        return result
    if n_nonzero == 0:
        result["note"] = f"no test: all {len(keys)} paired differences are zero"
        return result
    from scipy.stats import wilcoxon
    with warnings.catch_warnings():
        # scipy warns about a normal approximation with few samples; the note below says it plainly
        warnings.simplefilter("ignore", category=UserWarning)
        test = wilcoxon(x, y, zero_method="wilcox", alternative="two-sided", method="auto")
    result["statistic"], result["p"] = float(test.statistic), float(test.pvalue)
    if n_nonzero < 6:
        result["note"] = (f"only {n_nonzero} non-zero difference{'s' if n_nonzero > 1 else ''}: "
                          f"p cannot be below {2 / 2 ** n_nonzero:.3g}")
    return result
