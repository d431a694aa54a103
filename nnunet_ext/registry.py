"""What this package provides to nnU-Net: trainer classes and experiment planners."""
from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import Dict, List, Tuple, Type


def _classes_defined_in(package_name: str, base: type) -> Dict[str, type]:
    package = importlib.import_module(package_name)
    found = {}
    for module_info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f'{package_name}.{module_info.name}')
        for name, obj in vars(module).items():
            if inspect.isclass(obj) and issubclass(obj, base) and obj.__module__ == module.__name__:
                if name in found:
                    raise RuntimeError(f"{package_name}: class {name} defined twice "
                                       f"({found[name].__module__}, {module.__name__}); nnU-Net looks classes up "
                                       f"by bare name, so names must be unique")
                found[name] = obj
    return dict(sorted(found.items()))


def first_docstring_line(cls: type) -> str:
    doc = inspect.getdoc(cls) or ''
    return doc.strip().splitlines()[0] if doc.strip() else ''


def trainer_classes() -> Dict[str, type]:
    """``{name: class}`` of every nnU-Net trainer in ``nnunet_ext.trainers``."""
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    return _classes_defined_in('nnunet_ext.trainers', nnUNetTrainer)


def planner_classes() -> Dict[str, type]:
    """``{name: class}`` of every experiment planner in ``nnunet_ext.plans`` (private base classes, whose
    names start with ``_``, left out)."""
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    return {name: cls for name, cls in _classes_defined_in('nnunet_ext.plans', ExperimentPlanner).items()
            if not name.startswith('_')}


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
