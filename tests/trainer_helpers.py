"""Trainers built by hand on a tiny planned 2D phantom (no training), and nnU-Net-shaped batches for
comparing the losses they build. ``planned`` is a fixture of conftest.py."""
from __future__ import annotations

import copy
import os

import torch
from batchgenerators.utilities.file_and_folder_operations import load_json

from nnunet_ext.demo.phantom import write_phantom_dataset

DATASET_ID = 203


def plan_phantom(root: str):
    """Plans (does not preprocess) a 2D phantom dataset under ``root``; returns ``(environ, plans,
    dataset_json)``, ``environ`` nnU-Net's three folders (set in ``os.environ`` only while planning)."""
    environ = {k: os.path.join(root, k) for k in ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results')}
    saved = {k: os.environ.get(k) for k in environ}
    for k, v in environ.items():
        os.environ[k] = v
        os.makedirs(v)
    try:
        from nnunet_ext.planning import plan_and_preprocess
        write_phantom_dataset(environ['nnUNet_raw'], DATASET_ID, 'LossPhantom', num_train=3, num_test=0,
                              shape=(32, 32), progress=False)
        plans_id = plan_and_preprocess(DATASET_ID, 'ExperimentPlanner', ['2d'], fingerprint_processes=1,
                                       preprocess=False, progress=False)
        folder = os.path.join(environ['nnUNet_preprocessed'], f'Dataset{DATASET_ID:03d}_LossPhantom')
        return (environ, load_json(os.path.join(folder, plans_id + '.json')),
                load_json(os.path.join(environ['nnUNet_raw'], f'Dataset{DATASET_ID:03d}_LossPhantom', 'dataset.json')))
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


def kept_for_backward(network, x) -> int:
    """Elements autograd keeps for backward when ``network(x)`` runs (``saved_tensors_hooks``; unique
    storages, parameters excluded): the oracle for "the estimate counts what the network keeps"."""
    parameters = {p.untyped_storage().data_ptr() for p in network.parameters()}
    kept = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in parameters:
            kept[storage.data_ptr()] = storage.nbytes() // t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        network(x)
    return sum(kept.values())
