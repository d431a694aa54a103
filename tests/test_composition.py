"""Trainer composition does not depend on the order of the mixins (``nnunet_ext/training/composition.py``).

For every registered trainer, every permutation of its own mixins either builds the same trainer (network,
loss with its weights, deep-supervision scales, training length and recipe, training and validation
transforms) or is refused when the class is created. The oracle is the registered trainer itself, built
the same way; the refusals are checked against hand-written bad compositions.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import io
import itertools
import os
import re

import numpy as np
import pytest
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_ext.registry import trainer_classes
from nnunet_ext.trainer_base import LengthAndChecksMixin
from nnunet_ext.training import (CompositionError, DiceCELossMixin, GODCLossMixin, IFEArchitectureMixin,
                                 LFAMArchitectureMixin, TrainerMixin)
from nnunet_ext.training.anunet_mixins import NestedUNetArchitectureMixin
from nnunet_ext.training.composition import hook_definers, mixins_of
from nnunet_ext.training.recipes import MLL_RECIPE, PaperRecipeMixin
from trainer_helpers import DATASET_JSON, tiny_plans

TRAINERS = trainer_classes()


@pytest.fixture(autouse=True)
def nnunet_folders(tmp_path, monkeypatch):
    for name in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results'):
        monkeypatch.setenv(name, str(tmp_path / name))
    monkeypatch.setenv('nnUNet_ext_num_epochs', '3')  # the environment must win over a recipe, in any order
    monkeypatch.delenv('nnUNet_ext_num_iterations_per_epoch', raising=False)
    monkeypatch.delenv('nnUNet_ext_num_val_iterations_per_epoch', raising=False)


def _plain(value):
    """A comparable form of an attribute value (modules and callables by type)."""
    if isinstance(value, (bool, int, float, str, type(None))):
        return value
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().tolist()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    return type(value).__name__


def _module_state(module: torch.nn.Module) -> list:
    """Every submodule's type and plain attributes (alpha, gamma, head weights, ...)."""
    return [(name, type(m).__name__, {k: _plain(v) for k, v in sorted(vars(m).items())
                                      if not k.startswith('_') and k != 'training'})
            for name, m in module.named_modules()]


def _transform_names(pipeline) -> list:
    out = []
    for t in pipeline.transforms:
        inner = getattr(t, 'transform', None)
        out.append(type(t).__name__ + (f'({type(inner).__name__})' if inner is not None else ''))
    return out


def fingerprint(cls) -> dict:
    """What a trainer class builds on tiny 2d plans: the network, the loss, the deep-supervision scales and
    weights, the training length and recipe, the training and validation transforms."""
    with contextlib.redirect_stdout(io.StringIO()):
        trainer = cls(copy.deepcopy(tiny_plans()), '2d', 0, dict(DATASET_JSON), torch.device('cpu'))
    lm, cm = trainer.label_manager, trainer.configuration_manager
    network = trainer.build_network_architecture(trainer.plans_manager, cm, 1, lm.num_segmentation_heads, True)
    loss = trainer._build_loss()
    scales = trainer._get_deep_supervision_scales()
    augmentation = trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    rotation, dummy_2d, initial_patch, mirror_axes = augmentation
    training = trainer.get_training_transforms(cm.patch_size, rotation, scales, mirror_axes, dummy_2d,
                                               use_mask_for_norm=cm.use_mask_for_norm, is_cascaded=False,
                                               foreground_labels=lm.foreground_labels, regions=None, ignore_label=None)
    validation = trainer.get_validation_transforms(scales, is_cascaded=False, foreground_labels=lm.foreground_labels,
                                                   regions=None, ignore_label=None)
    return {'network': repr(network), 'parameters': [(k, tuple(v.shape)) for k, v in network.state_dict().items()],
            'loss': _module_state(loss), 'scales': _plain(scales),
            'length': (trainer.num_epochs, trainer.num_iterations_per_epoch, trainer.num_val_iterations_per_epoch),
            'optimiser': (trainer.initial_lr, trainer.weight_decay, cm.batch_size),
            'augmentation': (_plain(rotation), dummy_2d, _plain(initial_patch), _plain(mirror_axes)),
            'training_transforms': _transform_names(training), 'validation_transforms': _transform_names(validation)}


def own_mixins(cls) -> tuple:
    assert cls.__bases__[-1] is nnUNetTrainer, f"{cls.__name__}: nnUNetTrainer must be the last base"
    return cls.__bases__[:-1]


def permutations(cls):
    """``(bases, class or the refusal)`` for every order of ``cls``'s mixins, ``cls``'s own attributes kept."""
    attributes = {k: v for k, v in vars(cls).items() if k not in ('__dict__', '__weakref__')}
    for order in itertools.permutations(own_mixins(cls)):
        try:
            yield order, type(cls.__name__, (*order, nnUNetTrainer), dict(attributes))
        except (CompositionError, TypeError) as refusal:  # ours, or Python's "cannot create a consistent MRO"
            yield order, refusal


@pytest.mark.parametrize('name', sorted(TRAINERS))
def test_every_order_of_a_trainers_mixins_builds_the_same_trainer_or_is_refused(name):
    cls = TRAINERS[name]
    expected = fingerprint(cls)
    built = {}
    for order, result in permutations(cls):
        if isinstance(result, Exception):
            continue
        mro = tuple(result.__mro__[1:])
        if mro not in built:  # the same resolution order builds the same trainer
            built[mro] = fingerprint(result)
            for key, value in expected.items():
                assert built[mro][key] == value, (f"{name} with its mixins in the order "
                                                  f"{[b.__name__ for b in order]}: {key} differs")
    assert built, f"{name}: no order of its mixins builds"


@pytest.mark.parametrize('name', sorted(TRAINERS))
def test_each_hook_of_every_trainer_resolves_to_its_intended_owner(name):
    """The intended owner of a hook is the most specific mixin defining it; two mixins defining a hook are
    a refinement (one subclasses the other) or both declare the hook cooperative."""
    cls = TRAINERS[name]
    for hook, definers in hook_definers(cls).items():
        owner = definers[0]
        assert all(issubclass(owner, other) or hook in vars(owner).get('cooperative_hooks', ())
                   for other in definers[1:]), (name, hook, definers)
        assert inspect.getattr_static(cls, hook) is vars(owner)[hook] or hook in vars(cls), (name, hook)


def test_the_documented_order_of_anunet_with_godc_weighs_the_heads_equally():
    """``(length, loss mixin, architecture mixin, nnUNetTrainer)`` as docs/architecture.md says to write it:
    ANU-Net's heads get Eq. 8's equal weights (before, the loss mixin's nnU-Net weights ``1/2**i`` won,
    the last head at 0)."""
    class DocumentedOrder(LengthAndChecksMixin, GODCLossMixin, NestedUNetArchitectureMixin, nnUNetTrainer):
        pass

    class ArchitectureFirst(LengthAndChecksMixin, NestedUNetArchitectureMixin, GODCLossMixin, nnUNetTrainer):
        pass

    for cls in (DocumentedOrder, ArchitectureFirst):
        with contextlib.redirect_stdout(io.StringIO()):
            trainer = cls(copy.deepcopy(tiny_plans()), '2d', 0, dict(DATASET_JSON), torch.device('cpu'))
        # tiny_plans' 2d U-Net has 4 stages: 3 heads X_{0,1..3}, each weighted 1/3
        np.testing.assert_allclose(trainer._deep_supervision_weights(), [1 / 3, 1 / 3, 1 / 3])
        np.testing.assert_allclose(trainer._build_loss().weight_factors, [1 / 3, 1 / 3, 1 / 3])


def test_nnunet_weighs_its_own_heads_by_halves():
    """The control: GODC on nnU-Net's U-Net keeps nnU-Net's weights (1, 1/2, lowest 0; normalised)."""
    with contextlib.redirect_stdout(io.StringIO()):
        trainer = TRAINERS['nnUNetTrainerGODC'](copy.deepcopy(tiny_plans()), '2d', 0, dict(DATASET_JSON),
                                                torch.device('cpu'))
    np.testing.assert_allclose(trainer._deep_supervision_weights(), [2 / 3, 1 / 3, 0])


@pytest.mark.parametrize('bases, definers, hook', [
    ((GODCLossMixin, DiceCELossMixin), ('GODCLossMixin', 'DiceCELossMixin'), '_build_output_loss'),
    ((LFAMArchitectureMixin, IFEArchitectureMixin), ('LFAMArchitectureMixin', 'IFEArchitectureMixin'),
     'variant_networks'),
    # LFAM's network hook is its base's (PlansUNetVariantMixin), which the message names
    ((NestedUNetArchitectureMixin, LFAMArchitectureMixin), ('NestedUNetArchitectureMixin', 'PlansUNetVariantMixin'),
     'build_network_architecture'),
])
def test_two_unrelated_mixins_defining_a_hook_are_refused_at_class_creation(bases, definers, hook):
    a, b = definers
    for order in (bases, bases[::-1]):
        with pytest.raises(CompositionError, match=rf"^Clash: ({a} and {b}|{b} and {a}) both define '{hook}'"):
            type('Clash', (*order, nnUNetTrainer), {})


def test_a_mixin_that_overrides_a_hook_without_declaring_cooperation_is_refused():
    class Unannounced(TrainerMixin):
        def on_train_start(self):
            super().on_train_start()

    with pytest.raises(CompositionError, match="Unannounced and NestedUNetArchitectureMixin both define "
                                               "'on_train_start'|NestedUNetArchitectureMixin and Unannounced"):
        type('Clash', (Unannounced, NestedUNetArchitectureMixin, nnUNetTrainer), {})


def test_a_recipe_before_the_training_length_mixin_keeps_the_environments_length():
    """Before, ``PaperRecipeMixin`` listed before the training-length mixin overrode ``nnUNet_ext_num_epochs``."""
    for bases in ((PaperRecipeMixin, LengthAndChecksMixin), (LengthAndChecksMixin, PaperRecipeMixin)):
        cls = type('Recipe', (*bases, DiceCELossMixin, nnUNetTrainer), {'paper_recipe': MLL_RECIPE})
        assert fingerprint(cls)['length'][0] == 3  # nnUNet_ext_num_epochs (fixture), not the recipe's 20


def documented_example() -> dict:
    """The worked example of docs/architecture.md, executed as a module."""
    doc = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'docs', 'architecture.md'),
               encoding='utf-8').read()
    code = re.search(r'```python\n(# my_tversky_trainers\.py\n.*?)```', doc, re.S).group(1)
    namespace = {'__name__': 'my_tversky_trainers'}
    exec(compile(code, 'docs/architecture.md', 'exec'), namespace)
    return namespace


def test_the_documented_worked_example_trains_anunet_and_unet_with_the_right_head_weights():
    example = documented_example()
    with contextlib.redirect_stdout(io.StringIO()):
        anunet = example['nnUNetTrainerANUNetTversky'](copy.deepcopy(tiny_plans()), '2d', 0, dict(DATASET_JSON),
                                                       torch.device('cpu'))
        unet = example['nnUNetTrainerTversky'](copy.deepcopy(tiny_plans()), '2d', 0, dict(DATASET_JSON),
                                               torch.device('cpu'))
    np.testing.assert_allclose(anunet._build_loss().weight_factors, [1 / 3, 1 / 3, 1 / 3])
    np.testing.assert_allclose(unet._build_loss().weight_factors, [2 / 3, 1 / 3, 0])
    # the loss by hand: two classes, foreground probability 1/2 everywhere, half the voxels foreground:
    # TP = FP = FN = N/4, so (TP) / (TP + 0.3 FP + 0.7 FN) = 1/2 and the loss is 1/2
    loss = example['SoftTverskyLoss'](0.3, 0.7, smooth=0.0)
    target = torch.zeros(2, 1, 4, 4)
    target[:, :, :2] = 1
    assert float(loss(torch.zeros(2, 2, 4, 4), target)) == pytest.approx(0.5)
    # what the text says: the other order builds the same trainer; with DiceCELossMixin too, refused
    swapped = type('Swapped', (LengthAndChecksMixin, example['NestedUNetArchitectureMixin'],
                               example['TverskyLossMixin'], nnUNetTrainer), {})
    assert fingerprint(swapped) == fingerprint(example['nnUNetTrainerANUNetTversky'])
    with pytest.raises(CompositionError, match="'_build_output_loss'"):
        type('Both', (LengthAndChecksMixin, example['TverskyLossMixin'], DiceCELossMixin, nnUNetTrainer), {})


def options_of(cls) -> dict:
    """``{option: the mixin that declares it}``: the class attributes of our mixins that are data (not
    methods), each with the most basic mixin of ``cls``'s MRO defining it."""
    options = {}
    for mixin in reversed(mixins_of(cls)):
        for name, value in vars(mixin).items():
            if name.startswith('_') or name == 'cooperative_hooks' or callable(value) \
                    or isinstance(value, (classmethod, staticmethod, property)):
                continue
            options.setdefault(name, mixin)
    return options


@pytest.mark.parametrize('name', sorted(TRAINERS))
def test_every_option_of_a_trainer_is_read_by_the_class_that_declares_it(name):
    """Options live on the class that reads them: an option a trainer accepts is used, not ignored."""
    for option, declared_by in options_of(TRAINERS[name]).items():
        source = inspect.getsource(declared_by)
        assert re.search(rf'\b(self|cls)\.{option}\b', source), (f"{name}: option {option!r} is declared by "
                                                                 f"{declared_by.__name__}, which never reads it")


def test_mln_trainers_do_not_accept_the_multi_level_loss_options_they_would_ignore():
    mll_only = ('mll_boundary_term', 'mll_point_term', 'mll_num_points', 'mll_point_fraction',
                'mll_oversample_ratio', 'mll_importance_ratio', 'mll_distance_normalization')
    for name in ('nnUNetTrainerMLN', 'nnUNetTrainerMLNPaperRecipe'):
        assert not [o for o in mll_only if hasattr(TRAINERS[name], o)], name
        assert TRAINERS[name].mll_schedule.__class__.__name__ == 'MLNSchedule'  # the one shared option, its own
    assert all(hasattr(TRAINERS['nnUNetTrainerMLL'], o) for o in mll_only)
