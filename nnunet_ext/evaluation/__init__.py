"""Evaluation of segmentations: the papers' metrics per case and class (``metrics``), their
aggregation over cases (``summary``) and the folder driver behind ``nnunet-ext evaluate`` (``evaluate``)."""
from nnunet_ext.evaluation.metrics import CONVENTIONS, HD95_DEFINITIONS, METRICS, EvaluatedClass, case_metrics, \
    conventions, mask_metrics, surface_distances
from nnunet_ext.evaluation.summary import aggregate, format_table

__all__ = ["CONVENTIONS", "HD95_DEFINITIONS", "METRICS", "EvaluatedClass", "case_metrics", "conventions",
           "mask_metrics", "surface_distances",
           "aggregate", "format_table"]
