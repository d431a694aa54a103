"""Order-independent trainer composition: every hook a trainer resolves has one owner.

A trainer is a class statement listing mixins in front of ``nnUNetTrainer``. Python resolves a hook (a
method nnU-Net calls, or an option read by one) to the first class of the method resolution order that
defines it, so if two *unrelated* mixins define the same name, the order of the bases would decide which
one the trainer uses, silently. :class:`TrainerMixin`, the base of every mixin of this package, refuses such
a class when it is created (at import), with a message naming the two mixins and the hook.

Two ways to share a hook without depending on the order of the bases:

* **Refine by subclassing.** A mixin that changes another's hook subclasses it: Python puts a subclass
  before its bases in every method resolution order, so the refinement wins whatever the order. Example:
  the deep-supervision head weights are owned by
  :class:`~nnunet_ext.training.deep_supervision.DeepSupervisionHeadsMixin` (nnU-Net's ``1/2**i``); the
  loss mixins read them, and ``NestedUNetArchitectureMixin`` (ANU-Net's equal weights, Eq. 8) subclasses it
  and overrides them.
* **Cooperate.** A hook that several unrelated mixins each extend (``__init__``, ``on_train_start``,
  ``get_training_transforms``) is listed in ``cooperative_hooks`` by *every* mixin that defines it. That is a
  promise that each calls ``super()`` and does a job independent of the others' (one checks, one appends a
  transform), so any order gives the same trainer. ``tests/test_composition.py`` builds every permutation
  of every trainer's mixins and checks that it builds the same loss and network, or is refused.

Only mixins of this package are checked: nnU-Net's own trainer classes (``nnUNetTrainer`` and its
subclasses, including ours) are the base everything else refines.
"""
from __future__ import annotations

import itertools
from typing import Dict, FrozenSet, List

# names every class has, or that this module itself uses: not hooks
NOT_HOOKS = frozenset({
    '__module__', '__qualname__', '__doc__', '__dict__', '__weakref__', '__annotations__', '__firstlineno__',
    '__static_attributes__', '__orig_bases__', '__parameters__', '__abstractmethods__', '_abc_impl',
    '__init_subclass__', '__annotate__', '__annotate_func__', '__annotations_cache__', 'cooperative_hooks',
})


class CompositionError(TypeError):
    """Two mixins of a trainer define the same hook and the order of the bases would decide which one runs."""


def _is_nnunet_trainer(cls: type) -> bool:
    return any(c.__name__ == 'nnUNetTrainer' and c.__module__.startswith('nnunetv2.') for c in cls.__mro__)


def mixins_of(cls: type) -> List[type]:
    """The mixins of this package in ``cls``'s method resolution order (``TrainerMixin`` itself and trainer
    classes left out)."""
    return [c for c in cls.__mro__
            if issubclass(c, TrainerMixin) and c is not TrainerMixin and not _is_nnunet_trainer(c)]


def hook_definers(cls: type) -> Dict[str, List[type]]:
    """``{hook: [mixins defining it, in method resolution order]}`` for ``cls``."""
    definers: Dict[str, List[type]] = {}
    for mixin in mixins_of(cls):
        for name in vars(mixin):
            if name not in NOT_HOOKS:
                definers.setdefault(name, []).append(mixin)
    return definers


def _cooperative(mixin: type) -> FrozenSet[str]:
    return frozenset(vars(mixin).get('cooperative_hooks', ()))


def check_composition(cls: type) -> None:
    """Raise :class:`CompositionError` when two unrelated mixins of ``cls`` define the same hook and do not
    both declare it cooperative (module docstring)."""
    for name, definers in hook_definers(cls).items():
        for a, b in itertools.combinations(definers, 2):
            if issubclass(a, b) or issubclass(b, a):
                continue  # a refinement: the subclass wins in every order
            if name in _cooperative(a) and name in _cooperative(b):
                continue
            raise CompositionError(
                f"{cls.__name__}: {a.__name__} and {b.__name__} both define {name!r}, so the order of the bases "
                f"would decide which one the trainer uses. Make one a subclass of the other (the refinement "
                f"wins in any order), or, if both call super() and do independent jobs, list {name!r} in the "
                f"cooperative_hooks of both (nnunet_ext/training/composition.py).")


class TrainerMixin:
    """Base of every trainer mixin of this package: checks each class built from it at creation
    (:func:`check_composition`). ``cooperative_hooks``: the hooks this class extends cooperatively (it calls
    ``super()`` and its job does not depend on the other extensions')."""

    cooperative_hooks: FrozenSet[str] = frozenset()

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        check_composition(cls)
