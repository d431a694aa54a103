"""Multi-view 2D planning: one plans file per slicing axis (axial, coronal, sagittal).

The multi-level structural loss paper (Section 4.1.2, Tables 8-9) trains one 2D network per view of
a CT volume and fuses the three predictions by majority voting. In nnU-Net the slicing axis of the
``2d`` configuration is the first axis after ``transpose_forward``, a plans-level key shared by all
configurations of a plans file, so each view needs its own plans file (and its own preprocessed
data, which nnU-Net stores transposed).

Views are named after the array axes as nnU-Net's readers return them, ``(z, y, x)`` for
SimpleITK/NIfTI images: axial slices along axis 0, coronal along axis 1, sagittal along axis 2. The
anatomical names hold for the usual axis-aligned CT orientation (rows anterior-posterior, columns
left-right); for other direction cosines read them as "axis 0/1/2".
"""
from __future__ import annotations

from typing import Dict, List, Tuple, Union

import numpy as np
from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner

from nnunet_ext.errors import UserInputError
from nnunet_ext.inference.fuse_views import VIEW_AXES


def view_transpose(slicing_axis: int) -> Tuple[List[int], List[int]]:
    """``(transpose_forward, transpose_backward)`` that put ``slicing_axis`` first, the other two axes
    keeping their order (nnU-Net's ``determine_transpose`` convention); backward inverts forward."""
    if slicing_axis not in (0, 1, 2):
        raise ValueError(f"slicing axis must be 0, 1 or 2, got {slicing_axis}")
    forward = [slicing_axis] + [a for a in range(3) if a != slicing_axis]
    backward = [forward.index(a) for a in range(3)]
    return forward, backward


class MultiView2DPlanner(ExperimentPlanner):
    """Three 2d plans, one per view (nnUNetPlansAxial/Coronal/Sagittal), for majority-vote fusion.

    ``plan_experiment`` runs nnU-Net's default planning once per view of ``VIEW_AXES`` with that view's
    transpose, and writes ``<plans_name><View>.json`` (``plans_name`` defaults to ``nnUNetPlans``)
    holding only the ``2d`` configuration, whose ``data_identifier`` is ``<plans_name><View>_2d``: the
    three views preprocess into separate folders. 3d configurations are dropped (they would be the
    stock 3d configurations with permuted axes; plan those with the stock planner). Train each view
    with the stock ``nnUNetv2_train ID 2d FOLD -p nnUNetPlansCoronal``, predict with
    ``--save_probabilities`` and fuse with ``nnunet-ext fuse-views``.
    """

    def __init__(self, dataset_name_or_id: Union[str, int], gpu_memory_target_in_gb: float = 8,
                 preprocessor_name: str = 'DefaultPreprocessor', plans_name: str = 'nnUNetPlans',
                 overwrite_target_spacing: Union[List[float], Tuple[float, ...]] = None,
                 suppress_transpose: bool = False):
        if suppress_transpose:
            raise ValueError("MultiView2DPlanner chooses the transpose of each view; suppress_transpose=True "
                             "contradicts it")
        super().__init__(dataset_name_or_id, gpu_memory_target_in_gb, preprocessor_name, plans_name,
                         overwrite_target_spacing, suppress_transpose)
        self.base_plans_identifier = plans_name
        self.slicing_axis: int | None = None

    @classmethod
    def written_plans_identifiers(cls, base_plans_identifier: str) -> List[str]:
        """The plans files ``plan_experiment`` writes (read by ``nnunet-ext plan`` to preprocess each)."""
        return [base_plans_identifier + view for view in VIEW_AXES]

    def determine_transpose(self):
        if self.slicing_axis is None:
            raise RuntimeError("MultiView2DPlanner: the view is set by plan_experiment; call that")
        return view_transpose(self.slicing_axis)

    def _refuse_2d_datasets(self) -> None:
        median_shape = np.median(np.vstack(self.dataset_fingerprint['shapes_after_crop']), 0)
        if len(median_shape) != 3 or min(median_shape) <= 1:
            raise UserInputError(f"{self.dataset_name} has median image shape {tuple(median_shape.tolist())}: "
                                 f"multi-view planning needs 3D images (three axes longer than 1 voxel)")

    def plan_experiment(self) -> Dict[str, dict]:
        """Plans every view; returns ``{plans_identifier: plans}``."""
        self._refuse_2d_datasets()
        written = {}
        try:
            for view, axis in VIEW_AXES.items():
                self.plans_identifier, self.slicing_axis = self.base_plans_identifier + view, axis
                plans = super().plan_experiment()
                written[self.plans_identifier] = plans
                print(f"{view} view: 2d slices along array axis {axis}, transpose_forward "
                      f"{plans['transpose_forward']}, 2d patch size {plans['configurations']['2d']['patch_size']}; "
                      f"plans {self.plans_identifier} (2d configuration only)")
        finally:
            self.plans_identifier, self.slicing_axis = self.base_plans_identifier, None
        return written

    def save_plans(self, plans):
        """nnU-Net's ``save_plans`` for the ``2d`` configuration alone."""
        plans['configurations'] = {'2d': plans['configurations']['2d']}
        super().save_plans(plans)
