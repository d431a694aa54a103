"""Aggregation of per-case metrics over cases, and the Markdown table printed by ``nnunet-ext evaluate``.

Per class and metric: ``mean``, ``std`` (population, ddof=0) and ``median`` over the cases whose value
is not NaN, ``n`` (cases) and ``n_nan`` (cases where the metric is undefined, see
:data:`nnunet_ext.evaluation.metrics.CONVENTIONS`); statistics of an all-NaN column are NaN. Per class
also the number of cases with an empty reference, an empty prediction, and both, so that a missed
object (distance NaN, not averaged) stays visible.
"""
from __future__ import annotations

import math
from typing import Dict, List, Mapping, Sequence

import numpy as np

from nnunet_ext.evaluation.metrics import METRICS

__all__ = ["TABLE_METRICS", "aggregate", "format_table", "nan_to_none"]

#: Columns of the printed table.
TABLE_METRICS = ("Dice", "IoU", "precision", "recall", "HD95", "ASD", "RVD")


def _statistics(values: Sequence[float]) -> Dict[str, float]:
    values = np.asarray(values, dtype=float)
    valid = values[~np.isnan(values)]
    nan = float('nan')
    return {"mean": float(valid.mean()) if valid.size else nan,
            "std": float(valid.std()) if valid.size else nan,
            "median": float(np.median(valid)) if valid.size else nan,
            "n": int(values.size), "n_nan": int(values.size - valid.size)}


def aggregate(per_case: Sequence[Mapping[str, Mapping[str, float]]], class_names: Sequence[str]
              ) -> Dict[str, dict]:
    """``{class: {metric: statistics, "counts": {...}}}`` from a list of ``{class: {metric: value}}``."""
    if not per_case:
        raise ValueError("no cases to aggregate")
    out = {}
    for name in class_names:
        rows = [case[name] for case in per_case]
        stats = {metric: _statistics([row[metric] for row in rows]) for metric in METRICS}
        stats["counts"] = {"cases": len(rows),
                           "reference_empty": sum(row["n_ref"] == 0 for row in rows),
                           "prediction_empty": sum(row["n_pred"] == 0 for row in rows),
                           "both_empty": sum(row["n_ref"] == 0 and row["n_pred"] == 0 for row in rows)}
        out[name] = stats
    return out


def nan_to_none(value):
    """A copy of nested dicts/lists with every float NaN replaced by None (JSON null)."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: nan_to_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [nan_to_none(v) for v in value]
    return value


def _cell(stats: Mapping[str, float], digits: int) -> str:
    if stats["n_nan"] == stats["n"]:
        return "n/a"
    text = f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"
    return text + (f" ({stats['n_nan']} NaN)" if stats["n_nan"] else "")


def format_table(per_class: Mapping[str, Mapping[str, dict]]) -> str:
    """Markdown table: one row per class, mean ± std over cases of :data:`TABLE_METRICS` (HD95 and ASD
    in mm); a cell notes how many cases were NaN (left out of mean and std)."""
    header = ["class", "cases", *[m + (" (mm)" if m in ("HD95", "ASD") else "") for m in TABLE_METRICS]]
    lines: List[str] = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, stats in per_class.items():
        cells = [name, str(stats["counts"]["cases"]),
                 *[_cell(stats[m], 2 if m in ("HD95", "ASD") else 4) for m in TABLE_METRICS]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
