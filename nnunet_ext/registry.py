"""What this package provides to nnU-Net: trainer classes and experiment planners."""
from __future__ import annotations

import inspect
from typing import Dict, List, Tuple, Type

from nnunet_ext.discovery import classes_defined_in, planner_classes


def first_docstring_line(cls: type) -> str:
    doc = inspect.getdoc(cls) or ''
    return doc.strip().splitlines()[0] if doc.strip() else ''


def trainer_classes() -> Dict[str, type]:
    """``{name: class}`` of every nnU-Net trainer in ``nnunet_ext.trainers``: the one list of our trainers (the
    README's and docs' tables are checked against it by tests/test_readme_and_demo.py)."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    return classes_defined_in('nnunet_ext.trainers', nnUNetTrainer)


def describe(classes: Dict[str, type]) -> List[Tuple[str, str]]:
    return [(name, first_docstring_line(cls)) for name, cls in classes.items()]


def find_planner(name: str) -> Type:
    """A planner by name: ours (``nnunet_ext.plans``) first, then nnU-Net's own."""
    ours = planner_classes()
    if name in ours:
        return ours[name]
    import nnunetv2
    from os.path import join
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
    theirs = recursive_find_python_class(join(nnunetv2.__path__[0], 'experiment_planning'), name,
                                         current_module='nnunetv2.experiment_planning')
    if theirs is None:
        raise LookupError(f"unknown planner {name!r}; ours: {', '.join(ours) or 'none'}; nnU-Net's own planners "
                          f"(e.g. ExperimentPlanner, nnUNetPlannerResEncM) are accepted too")
    return theirs
