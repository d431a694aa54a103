"""The loss our GODC trainers build, against nnU-Net's own trainer on the same plans.

Oracle: with one sample per batch GODC's weight is 1, so the GODC term is ``1 - DC`` while
nnU-Net's Dice term is ``-DC`` (batch Dice of one sample = per-sample Dice). The trainers' whole
losses (deep supervision, CE/BCE, ignore label, regions) must then differ by exactly 1 and have
identical gradients. That pins down that everything except the Dice term is nnU-Net's.
(nnU-Net sums its Dice terms in float32, hence float32 tolerances.)"""
from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from batchgenerators.utilities.file_and_folder_operations import load_json
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from nnunet_ext.demo.phantom import write_phantom_dataset
from nnunet_ext.trainers.godc_trainers import nnUNetTrainerGODC, nnUNetTrainerGODCOnly

DATASET_ID = 203


@pytest.fixture(scope='module')
def planned(tmp_path_factory):
    root = tmp_path_factory.mktemp('loss_root')
    saved = {k: os.environ.get(k) for k in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results')}
    for k in saved:
        os.environ[k] = str(root / k)
        os.makedirs(os.environ[k])
    try:
        from nnunet_ext.planning import plan_and_preprocess
        write_phantom_dataset(os.environ['nnUNet_raw'], DATASET_ID, 'LossPhantom', num_train=3, num_test=0,
                              shape=(32, 32), progress=False)
        plans_id = plan_and_preprocess(DATASET_ID, 'ExperimentPlanner', ['2d'], fingerprint_processes=1,
                                       preprocess=False, progress=False)
        folder = os.path.join(os.environ['nnUNet_preprocessed'], f'Dataset{DATASET_ID:03d}_LossPhantom')
        yield load_json(os.path.join(folder, plans_id + '.json')), load_json(
            os.path.join(os.environ['nnUNet_raw'], f'Dataset{DATASET_ID:03d}_LossPhantom', 'dataset.json'))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


DATASET_JSON_VARIANTS = {
    'labels': {},
    'ignore_label': {'labels': {'background': 0, 'liver': 1, 'tumour': 2, 'ignore': 3}},
    'regions': {'labels': {'background': 0, 'liver_and_tumour': [1, 2], 'tumour': 2}, 'regions_class_order': [1, 2]},
    'regions_ignore': {'labels': {'background': 0, 'liver_and_tumour': [1, 2], 'tumour': 2, 'ignore': 3},
                       'regions_class_order': [1, 2]},
}


def make_trainer(cls, planned, variant):
    plans, dataset_json = planned
    plans = copy.deepcopy(plans)
    plans['continue_training'] = False  # nnU-Net 2.8.1 pops this key
    dataset_json = {**dataset_json, **DATASET_JSON_VARIANTS[variant]}
    trainer = cls(plans, '2d', 0, dataset_json, torch.device('cpu'))
    return trainer


def batch(trainer, batch_size, seed=0):
    """Deep-supervision outputs and targets shaped as nnU-Net's data pipeline makes them."""
    g = torch.Generator().manual_seed(seed)
    lm = trainer.label_manager
    patch = trainer.configuration_manager.patch_size
    outputs, targets = [], []
    for scale in trainer._get_deep_supervision_scales():
        shape = [max(1, int(round(p * s))) for p, s in zip(patch, scale)]
        outputs.append(torch.randn(batch_size, lm.num_segmentation_heads, *shape, generator=g, dtype=torch.float64,
                                   requires_grad=True))
        labels = torch.randint(0, 3, (batch_size, 1, *shape), generator=g)
        if lm.ignore_label is not None:
            labels[torch.rand(labels.shape, generator=g) < 0.2] = lm.ignore_label
        if lm.has_regions:
            regions = [((labels == 1) | (labels == 2)), labels == 2]
            if lm.ignore_label is not None:
                regions.append(labels == lm.ignore_label)
            targets.append(torch.cat(regions, 1).double())
        else:
            targets.append(labels.double())
    return outputs, targets


@pytest.mark.parametrize('variant', sorted(DATASET_JSON_VARIANTS))
def test_godc_trainer_loss_is_nnunet_loss_plus_one_for_one_sample(planned, variant):
    ours, theirs = make_trainer(nnUNetTrainerGODC, planned, variant), make_trainer(nnUNetTrainer, planned, variant)
    assert ours.label_manager.has_regions == variant.startswith('regions')
    assert (ours.label_manager.ignore_label is not None) == ('ignore' in variant)
    outputs, targets = batch(ours, batch_size=1)
    loss_ours = ours._build_loss()(outputs, targets)
    grads_ours = torch.autograd.grad(loss_ours, outputs, allow_unused=True, materialize_grads=True)
    loss_theirs = theirs._build_loss()(outputs, targets)
    grads_theirs = torch.autograd.grad(loss_theirs, outputs, allow_unused=True, materialize_grads=True)
    assert loss_ours.item() == pytest.approx(loss_theirs.item() + 1.0, abs=1e-5)
    for a, b in zip(grads_ours, grads_theirs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8)


def test_godc_is_per_sample_although_plans_use_batch_dice(planned):
    ours, theirs = make_trainer(nnUNetTrainerGODC, planned, 'labels'), make_trainer(nnUNetTrainer, planned, 'labels')
    assert ours.configuration_manager.batch_dice  # nnU-Net's 2d default
    outputs, targets = batch(ours, batch_size=2)
    targets = [t.clone() for t in targets]
    targets[0][0][targets[0][0] == 1] = 0  # sample 0 loses its liver: unions now differ a lot
    difference = ours._build_loss()(outputs, targets).item() - theirs._build_loss()(outputs, targets).item()
    assert abs(difference - 1.0) > 1e-3


def test_godc_only_is_godc_without_cross_entropy(planned):
    godc, only = make_trainer(nnUNetTrainerGODC, planned, 'labels'), make_trainer(nnUNetTrainerGODCOnly, planned,
                                                                                   'labels')
    outputs, targets = batch(godc, batch_size=2)
    n = len(outputs)
    weights = np.array([1 / 2 ** i for i in range(n)])
    weights[-1] = 0
    weights /= weights.sum()
    ce = sum(w * F.cross_entropy(o, t[:, 0].long()) for w, o, t in zip(weights, outputs, targets))
    assert only._build_loss()(outputs, targets).item() == pytest.approx(
        godc._build_loss()(outputs, targets).item() - ce.item(), abs=1e-5)


def test_deep_supervision_length_mismatch_is_an_error(planned):
    trainer = make_trainer(nnUNetTrainerGODC, planned, 'labels')
    outputs, targets = batch(trainer, batch_size=1)
    with pytest.raises(ValueError, match='differ in length'):
        trainer._build_loss()(outputs[:-1], targets)


def test_without_deep_supervision_the_loss_takes_single_tensors(planned):
    trainer = make_trainer(nnUNetTrainerGODC, planned, 'labels')
    outputs, targets = batch(trainer, batch_size=1)
    trainer.enable_deep_supervision = False
    reference = make_trainer(nnUNetTrainer, planned, 'labels')
    reference.enable_deep_supervision = False
    assert trainer._build_loss()(outputs[0], targets[0]).item() == pytest.approx(
        reference._build_loss()(outputs[0], targets[0]).item() + 1.0, abs=1e-5)
