"""The papers' own networks as trainers (``nnUNetTrainerANUNetPaper``, ``nnUNetTrainerResUNetPaper``): the
parameter counts the papers give, with the plans' channels and classes; the deep-supervision outputs
match the scales the trainer gives nnU-Net's data pipeline; 3D plans and a patch the network cannot divide
are refused with a clear message; a pruned export's plans build the pruned level."""
from __future__ import annotations

import pytest
import torch

from nnunet_ext.architectures.anunet import PRUNE_LEVEL_ENV
from trainer_helpers import make_trainer, tiny

ANUNET_PAPER = 'nnUNetTrainerANUNetPaper'
RESUNET_PAPER = 'nnUNetTrainerResUNetPaper'
# One binary output (a single region, sigmoid): the papers' setting, so their counts apply unchanged.
ONE_REGION = {'labels': {'background': 0, 'organ': [1, 2]}, 'regions_class_order': [1]}

pytestmark = pytest.mark.usefixtures('nnunet_folders')  # nnU-Net's trainers need its folders set


@pytest.fixture(autouse=True)
def _no_prune_env(monkeypatch):
    monkeypatch.delenv(PRUNE_LEVEL_ENV, raising=False)


def _trainer(name, configuration='2d', channels=1, dataset_json=None, patch=None, arch_kwargs=None):
    plans, base_dataset_json = tiny()
    if patch is not None:
        plans['configurations'][configuration]['patch_size'] = patch
    if arch_kwargs:
        plans['configurations'][configuration]['architecture']['arch_kwargs'].update(arch_kwargs)
    variant = {**(dataset_json or {}), 'channel_names': {str(c): f'channel{c}' for c in range(channels)}}
    return make_trainer(name, (plans, base_dataset_json), variant, configuration=configuration)


def _network(trainer, channels=1, deep_supervision=True):
    return trainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager, channels,
                                              trainer.label_manager.num_segmentation_heads, deep_supervision)


def _n_params(network):
    return sum(p.numel() for p in network.parameters())


def _norms(network):
    return {type(m) for m in network.modules() if isinstance(m, (torch.nn.modules.batchnorm._NormBase,
                                                                torch.nn.GroupNorm, torch.nn.LayerNorm))}


# ANU-Net with the paper's BatchNorm: Table 6, L4 (one CT channel, one output). Its default, InstanceNorm, has no
# norm on the 10 gates' one-channel psi (2 parameters each). Zhang et al.'s network on RGB, one output: 8,220,993
# + 386 in the two auxiliary heads (architectures/resunet.py).
@pytest.mark.parametrize('name, anunet_norm, channels, params, norm', [
    (ANUNET_PAPER, 'batch', 1, 8_950_594, torch.nn.BatchNorm2d),
    (ANUNET_PAPER, None, 1, 8_950_594 - 10 * 2, torch.nn.InstanceNorm2d),
    (RESUNET_PAPER, None, 3, 8_221_379, torch.nn.BatchNorm2d),
])
def test_the_network_is_the_papers_whatever_the_plans_topology(name, anunet_norm, channels, params, norm,
                                                               monkeypatch):
    trainer = _trainer(name, channels=channels, dataset_json=ONE_REGION)
    if anunet_norm is not None:
        monkeypatch.setattr(type(trainer), 'anunet_paper_norm', anunet_norm)
    assert trainer.configuration_manager.network_arch_init_kwargs['features_per_stage'] == [4, 8, 16, 32]
    network = _network(trainer, channels)
    assert _n_params(network) == params
    assert _norms(network) == {norm}  # the plans' features are [4, 8, 16, 32]: the topology is the paper's


def test_the_default_paper_anunet_predicts_with_what_it_trained_with(monkeypatch):
    """Regression for the paper network's gap on real images (docs/methods/anunet.md): with BatchNorm a test
    image is normalised by running statistics of augmented, foreground-oversampled training patches, not by its
    own, and the paper network scored 0.1 Dice below nnUNetTrainer; with the default InstanceNorm the output of
    an image is the same in training and in inference mode. The paper's BatchNorm stays one attribute away."""
    trainer = _trainer(ANUNET_PAPER)
    torch.manual_seed(0)
    network = _network(trainer, deep_supervision=False)
    x = torch.randn(3, 1, *trainer.configuration_manager.patch_size) * 4 + 2  # not the running stats' (0, 1)
    with torch.no_grad():
        training = network.train()(x)
        inference = network.eval()(x)
    torch.testing.assert_close(inference, training)
    monkeypatch.setattr(type(trainer), 'anunet_paper_norm', 'batch')
    paper = _network(trainer, deep_supervision=False)
    paper.load_state_dict(network.state_dict(), strict=False)
    with torch.no_grad():
        assert not torch.allclose(paper.train()(x), paper.eval()(x), atol=1e-3)


def test_an_unknown_paper_norm_is_refused(monkeypatch):
    trainer = _trainer(ANUNET_PAPER)
    monkeypatch.setattr(type(trainer), 'anunet_paper_norm', 'group')
    with pytest.raises(ValueError, match=r"anunet_paper_norm must be one of \['batch', 'instance'\].*got 'group'"):
        _network(trainer)


def test_more_classes_add_one_output_channel_to_every_head():
    """ANU-Net: 4 heads of 1x1 conv on 32 features, (32 + 1) parameters per extra output channel each."""
    trainer = _trainer(ANUNET_PAPER)  # background + liver + tumour: 3 softmax outputs
    assert _n_params(_network(trainer)) == 8_950_594 - 10 * 2 + 2 * 4 * (32 + 1)


@pytest.mark.parametrize('name', [ANUNET_PAPER, RESUNET_PAPER])
def test_deep_supervision_outputs_match_the_trainers_scales_and_the_loss_takes_them(name):
    trainer = _trainer(name)
    patch = trainer.configuration_manager.patch_size
    network = _network(trainer)
    x = torch.randn(2, 1, *patch)
    outputs = network(x)
    scales = trainer._get_deep_supervision_scales()
    expected = [[int(p * s) for p, s in zip(patch, scale)] for scale in scales]
    assert [list(o.shape[2:]) for o in outputs] == expected
    assert all(o.shape[:2] == (2, 3) for o in outputs)
    if name == ANUNET_PAPER:
        assert len(outputs) == 4 and all(e == list(patch) for e in expected)  # X_{0,4..1}, all full resolution
    else:
        assert expected == [list(patch), [p // 2 for p in patch], [p // 4 for p in patch]]
    targets = [torch.randint(0, 3, (2, 1, *shape)).float() for shape in expected]
    trainer.loss = trainer._build_loss()
    loss = trainer.loss(outputs, targets)
    loss.backward()
    assert torch.isfinite(loss)
    unused = {k for k, p in network.named_parameters() if p.grad is None}
    # nnU-Net weights the lowest-resolution head 0 outside DDP (and keeps it under DDP without compile);
    # ANU-Net's heads have equal weights (Eq. 8)
    assert unused == (set() if name == ANUNET_PAPER else {'decoder.seg_layers.0.weight', 'decoder.seg_layers.0.bias'})
    network.eval()
    with torch.no_grad():  # the predictor's network: deep supervision off, one full-resolution output
        single = _network(trainer, deep_supervision=False)
        single.load_state_dict(network.state_dict())
        assert single(x).shape == (2, 3, *patch)


@pytest.mark.parametrize('name, patch, factor', [(ANUNET_PAPER, [40, 40], 16), (RESUNET_PAPER, [36, 44], 8)])
def test_a_patch_the_network_cannot_divide_is_refused(name, patch, factor):
    trainer = _trainer(name, patch=patch)
    with pytest.raises(ValueError, match=rf'multiple of {factor}; these plans\' patch is \[{patch[0]}, {patch[1]}\]'):
        _network(trainer)


@pytest.mark.parametrize('name', [ANUNET_PAPER, RESUNET_PAPER])
def test_3d_plans_are_refused_the_papers_networks_are_2d(name):
    with pytest.raises(ValueError, match=r'is a 2D network .* patch \[16, 32, 32\] is 3D\. Train the 2d configuration'):
        _network(_trainer(name, '3d_fullres'))


def test_resunet_paper_takes_a_patch_anunet_paper_refuses():
    """40 = 5 * 8: Zhang et al.'s network (3 poolings) divides it, ANU-Net's (4 poolings, 16) does not."""
    with pytest.raises(ValueError, match=r"multiple of 16; these plans' patch is \[40, 40\]"):
        _network(_trainer(ANUNET_PAPER, patch=[40, 40]))
    network = _network(_trainer(RESUNET_PAPER, patch=[40, 40]))
    outputs = network(torch.randn(1, 1, 40, 40))  # deep supervision: full, 1/2 and 1/4 resolution
    assert [tuple(o.shape) for o in outputs] == [(1, 3, 40, 40), (1, 3, 20, 20), (1, 3, 10, 10)]


def test_pruned_plans_build_the_pruned_level(monkeypatch):
    """``nnunet-ext prune`` writes ``max_level`` into the plans: Table 6's L2 network, 513,387 parameters."""
    trainer = _trainer(ANUNET_PAPER, dataset_json=ONE_REGION, arch_kwargs={'max_level': 2})
    monkeypatch.setattr(type(trainer), 'anunet_paper_norm', 'batch')  # Table 6 counts the paper's BatchNorm
    network = _network(trainer, deep_supervision=False)
    assert network.max_level == network.prune_level == 2
    assert _n_params(network) == 513_387


def test_the_prune_level_variable_reaches_the_paper_network(monkeypatch):
    monkeypatch.setenv(PRUNE_LEVEL_ENV, '3')
    network = _network(_trainer(ANUNET_PAPER), deep_supervision=False)
    assert network.max_level == 4 and network.prune_level == 3
