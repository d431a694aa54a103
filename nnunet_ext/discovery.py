"""Classes this package defines in a sub-package, found by scanning its modules; and our experiment planners.

Below ``nnunet_ext.memory_check`` and ``nnunet_ext.registry`` in the dependency order: it imports the
scanned package only when asked (``nnunet_ext.plans`` imports ``nnunet_ext.training``, never the other way).
"""
from __future__ import annotations

import importlib
import inspect
import pkgutil
from typing import Dict


def classes_defined_in(package_name: str, base: type) -> Dict[str, type]:
    """``{name: class}`` of the subclasses of ``base`` defined in the modules of ``package_name``, sorted by
    name; a name defined twice is refused (nnU-Net looks classes up by bare name)."""
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


def planner_classes() -> Dict[str, type]:
    """``{name: class}`` of every experiment planner in ``nnunet_ext.plans`` (private base classes, whose
    names start with ``_``, left out)."""
    from nnunetv2.experiment_planning.experiment_planners.default_experiment_planner import ExperimentPlanner
    return {name: cls for name, cls in classes_defined_in('nnunet_ext.plans', ExperimentPlanner).items()
            if not name.startswith('_')}
