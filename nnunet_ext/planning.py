"""``nnunet-ext plan``: fingerprint, plan with one of our planners, preprocess.

nnU-Net's ``-pl`` only finds planners inside its own package, so this drives its planning API
(``plan_experiment_dataset``) with the class itself; fingerprinting and preprocessing are
nnU-Net's own.

A planner that writes several plans files (``MultiView2DPlanner``: one per view) says which with a
classmethod ``written_plans_identifiers(plans_identifier) -> list``; each of them is preprocessed.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

DEFAULT_PROCESSES = {'2d': 8, '3d_fullres': 4, '3d_lowres': 8}


def _written_plans_identifiers(planner, plans_identifier: str) -> List[str]:
    if hasattr(planner, 'written_plans_identifiers'):
        return list(planner.written_plans_identifiers(plans_identifier))
    return [plans_identifier]


def plan_and_preprocess_all(dataset_id: int, planner_name: str,
                            configurations: Sequence[str] = ('2d', '3d_fullres', '3d_lowres'),
                            num_processes: Optional[Sequence[int]] = None, fingerprint_processes: int = 8,
                            verify_dataset_integrity: bool = False, clean: bool = False, preprocess: bool = True,
                            gpu_memory_target: Optional[float] = None, overwrite_plans_name: Optional[str] = None,
                            overwrite_target_spacing: Optional[Sequence[float]] = None,
                            preprocessor_name: str = 'DefaultPreprocessor', progress: bool = True) -> List[str]:
    """Same steps as ``nnUNetv2_plan_and_preprocess -pl NAME``; returns the identifiers of the plans
    files written (one, or one per view for a multi-view planner), each preprocessed for
    ``configurations`` (nnU-Net skips, with a message, a configuration a plans file does not have)."""
    from nnunetv2.experiment_planning.plan_and_preprocess_api import (extract_fingerprints, plan_experiment_dataset,
                                                                        preprocess as run_preprocessing)
    from nnunet_ext.nnunet_glue import file_listing_in_process
    from nnunet_ext.registry import find_planner

    planner = find_planner(planner_name)
    with file_listing_in_process():  # nnU-Net's fork pool could hang: see there
        extract_fingerprints([dataset_id], 'DatasetFingerprintExtractor', fingerprint_processes,
                             verify_dataset_integrity, clean, verbose=False, show_progress_bar=progress)
        _, plans_identifier = plan_experiment_dataset(dataset_id, planner, gpu_memory_target, preprocessor_name,
                                                      overwrite_target_spacing, overwrite_plans_name)
        identifiers = _written_plans_identifiers(planner, plans_identifier)
        if preprocess:
            if num_processes is None:
                num_processes = [DEFAULT_PROCESSES.get(c, 4) for c in configurations]
            for identifier in identifiers:
                run_preprocessing([dataset_id], identifier, list(configurations), list(num_processes),
                                  verbose=False, show_progress_bar=progress)
    return identifiers


def plan_and_preprocess(dataset_id: int, planner_name: str,
                        configurations: Sequence[str] = ('2d', '3d_fullres', '3d_lowres'),
                        num_processes: Optional[Sequence[int]] = None, fingerprint_processes: int = 8,
                        verify_dataset_integrity: bool = False, clean: bool = False, preprocess: bool = True,
                        gpu_memory_target: Optional[float] = None, overwrite_plans_name: Optional[str] = None,
                        overwrite_target_spacing: Optional[Sequence[float]] = None,
                        preprocessor_name: str = 'DefaultPreprocessor', progress: bool = True) -> str:
    """``plan_and_preprocess_all`` for a planner that writes one plans file; returns its identifier."""
    from nnunet_ext.registry import find_planner

    planner = find_planner(planner_name)
    if hasattr(planner, 'written_plans_identifiers'):
        raise ValueError(f"{planner_name} writes several plans files; use plan_and_preprocess_all")
    return plan_and_preprocess_all(dataset_id, planner_name, configurations, num_processes, fingerprint_processes,
                                   verify_dataset_integrity, clean, preprocess, gpu_memory_target,
                                   overwrite_plans_name, overwrite_target_spacing, preprocessor_name, progress)[0]
