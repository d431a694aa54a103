"""``nnunet-ext plan``: fingerprint, plan with one of our planners, preprocess.

nnU-Net's ``-pl`` only finds planners inside its own package, so this drives its planning API
(``plan_experiment_dataset``) with the class itself; fingerprinting and preprocessing are
nnU-Net's own.
"""
from __future__ import annotations

from typing import Optional, Sequence

DEFAULT_PROCESSES = {'2d': 8, '3d_fullres': 4, '3d_lowres': 8}


def plan_and_preprocess(dataset_id: int, planner_name: str, configurations: Sequence[str] = ('2d', '3d_fullres', '3d_lowres'),
                        num_processes: Optional[Sequence[int]] = None, fingerprint_processes: int = 8,
                        verify_dataset_integrity: bool = False, clean: bool = False, preprocess: bool = True,
                        gpu_memory_target: Optional[float] = None, overwrite_plans_name: Optional[str] = None,
                        overwrite_target_spacing: Optional[Sequence[float]] = None,
                        preprocessor_name: str = 'DefaultPreprocessor', progress: bool = True) -> str:
    """Same steps as ``nnUNetv2_plan_and_preprocess -pl NAME``; returns the plans identifier."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprints, plan_experiment_dataset,
                                                                        preprocess as run_preprocessing)
    from nnunet_ext.registry import find_planner

    planner = find_planner(planner_name)
    extract_fingerprints([dataset_id], 'DatasetFingerprintExtractor', fingerprint_processes,
                         verify_dataset_integrity, clean, verbose=False, show_progress_bar=progress)
    _, plans_identifier = plan_experiment_dataset(dataset_id, planner, gpu_memory_target, preprocessor_name,
                                                  overwrite_target_spacing, overwrite_plans_name)
    if preprocess:
        if num_processes is None:
            num_processes = [DEFAULT_PROCESSES.get(c, 4) for c in configurations]
        run_preprocessing([dataset_id], plans_identifier, list(configurations), list(num_processes),
                          verbose=False, show_progress_bar=progress)
    return plans_identifier
