"""The multi-level structural network (MLN) and its branches against independent references: naive
loops, a hand-written multi-head attention, the fusion formula of Section 3.4 written out voxel-wise,
and nnU-Net's own U-Net for the region branch."""
from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from dynamic_network_architectures.architectures.unet import PlainConvUNet, ResidualEncoderUNet
from torch import nn

from nnunet_ext.architectures.mln_unet import MLNOutput, MLNPlainConvUNet, MLNResidualEncoderUNet
from nnunet_ext.losses.uncertain_points import nearest_point_sample
from nnunet_ext.nn.point_attention import (PointAttentionBranch, gather_points, num_pixel_points, scatter_points,
                                           select_uncertain_voxels, voxel_centres)
from nnunet_ext.nn.saliency_fusion import SaliencyGuidanceFusion
from nnunet_ext.training.architecture_mixins import residual_encoder_kwargs


def plain_kwargs(ndim: int, deep_supervision: bool = True, num_classes: int = 3) -> dict:
    conv, norm = (nn.Conv2d, nn.InstanceNorm2d) if ndim == 2 else (nn.Conv3d, nn.InstanceNorm3d)
    if ndim == 2:
        kernels, strides = ((3, 3),) * 3, ((1, 1), (2, 2), (2, 1))
    else:  # anisotropic, as nnU-Net plans thick-slice CT
        kernels, strides = ((1, 3, 3), (3, 3, 3), (3, 3, 3)), ((1, 1, 1), (1, 2, 2), (2, 2, 2))
    return dict(input_channels=2, n_stages=3, features_per_stage=(8, 16, 16), conv_op=conv, kernel_sizes=kernels,
                strides=strides, n_conv_per_stage=2, num_classes=num_classes, n_conv_per_stage_decoder=1,
                conv_bias=True, norm_op=norm, norm_op_kwargs={'eps': 1e-5, 'affine': True}, nonlin=nn.LeakyReLU,
                nonlin_kwargs={'inplace': True}, deep_supervision=deep_supervision)


SHAPES = {2: (12, 10), 3: (4, 8, 12)}


def build(ndim: int, residual: bool = False, **extra):
    kwargs = plain_kwargs(ndim, **{k: extra.pop(k) for k in ('deep_supervision', 'num_classes') if k in extra})
    if residual:
        kwargs = residual_encoder_kwargs(kwargs)
    cls = MLNResidualEncoderUNet if residual else MLNPlainConvUNet
    network = cls(**kwargs, **extra)
    network.apply(network.initialize)
    return network, kwargs


def naive_margin(logits: torch.Tensor):
    """Per sample, per voxel (flat order): second-largest minus largest logit, by sorting each voxel."""
    B, C = logits.shape[:2]
    flat = logits.reshape(B, C, -1)
    return [[float(sorted(flat[b, :, v].tolist())[-2] - sorted(flat[b, :, v].tolist())[-1])
             for v in range(flat.shape[2])] for b in range(B)]


# --- point selection, gathering, scattering -------------------------------------------------------------------
@pytest.mark.parametrize('ndim', [2, 3])
def test_inference_selection_is_the_most_uncertain_voxels(ndim):
    torch.manual_seed(0)
    logits = torch.randn(2, 3, *SHAPES[ndim], dtype=torch.float64)
    indices = select_uncertain_voxels(logits, 7)
    for b, margins in enumerate(naive_margin(logits)):
        expected = sorted(range(len(margins)), key=lambda v: -margins[v])[:7]
        assert sorted(indices[b].tolist()) == sorted(expected)


def test_training_selection_keeps_m_n_uncertain_and_draws_the_rest_among_the_others():
    torch.manual_seed(1)
    logits = torch.randn(3, 2, 9, 11)
    margins = naive_margin(logits)
    draws = []
    for seed in range(2):
        indices = select_uncertain_voxels(logits, 20, importance_ratio=0.75,
                                          generator=torch.Generator().manual_seed(seed))
        assert indices.shape == (3, 20)
        for b in range(3):
            row = indices[b].tolist()
            assert len(set(row)) == 20 and all(0 <= v < 99 for v in row)  # distinct voxels of the grid
            assert sorted(row[:15]) == sorted(sorted(range(99), key=lambda v: -margins[b][v])[:15])
        draws.append(indices[:, 15:])
    assert not torch.equal(draws[0], draws[1])  # the (1 - m) N others are random


def test_selection_refuses_more_points_than_voxels():
    with pytest.raises(ValueError, match='num_points'):
        select_uncertain_voxels(torch.randn(1, 2, 3, 3), 10)
    assert num_pixel_points((48, 48)) == 144 and num_pixel_points((128, 128, 128)) == 1024
    assert num_pixel_points((4, 4), num_points=100) == 16


@pytest.mark.parametrize('ndim', [2, 3])
def test_gather_scatter_and_centres_against_loops(ndim):
    torch.manual_seed(2)
    shape = SHAPES[ndim]
    x = torch.randn(2, 3, *shape)
    indices = torch.stack([torch.randperm(math.prod(shape))[:5] for _ in range(2)])
    gathered = gather_points(x, indices)
    positions = list(itertools.product(*[range(s) for s in shape]))  # C order: flat index -> position
    for b, n in itertools.product(range(2), range(5)):
        position = positions[indices[b, n]]
        torch.testing.assert_close(gathered[b, :, n], x[(b, slice(None), *position)])
    # the centres are the uncertain-point coordinates of those voxels (nearest sampling reads the same values)
    torch.testing.assert_close(nearest_point_sample(x, voxel_centres(indices, shape)), gathered)
    scattered = scatter_points(gathered, indices, shape)
    expected = torch.zeros_like(x)
    for b, n in itertools.product(range(2), range(5)):
        expected[(b, slice(None), *positions[indices[b, n]])] = gathered[b, :, n]
    torch.testing.assert_close(scattered, expected)


# --- pixel branch --------------------------------------------------------------------------------------------
def reference_point_branch(branch: PointAttentionBranch, features: torch.Tensor, indices: torch.Tensor):
    """Section 3.3 written out: gather, embed, multi-head attention by hand, residuals, LayerNorms, MLPs."""
    attention = branch.attention
    heads, width = attention.num_heads, attention.embed_dim
    outs, logits = [], []
    for b in range(features.shape[0]):
        tokens = torch.stack([features[b].reshape(features.shape[1], -1)[:, v] for v in indices[b].tolist()])
        x = tokens @ branch.embed.weight.T + branch.embed.bias
        projections = zip(attention.in_proj_weight.chunk(3), attention.in_proj_bias.chunk(3))
        q, k, v = (x @ w.T + bias for w, bias in projections)
        head_outputs = []
        for h in range(heads):
            sl = slice(h * width // heads, (h + 1) * width // heads)
            scores = q[:, sl] @ k[:, sl].T / math.sqrt(width // heads)
            head_outputs.append(torch.softmax(scores, 1) @ v[:, sl])
        attended = torch.cat(head_outputs, 1) @ attention.out_proj.weight.T + attention.out_proj.bias
        x = F.layer_norm(x + attended, (width,), branch.attention_norm.weight, branch.attention_norm.bias)
        mlp = torch.relu(x @ branch.pointwise.weight.T + branch.pointwise.bias)
        x = F.layer_norm(x + mlp, (width,), branch.pointwise_norm.weight, branch.pointwise_norm.bias)
        first, _, last = branch.classifier
        logits.append((torch.relu(x @ first.weight.T + first.bias) @ last.weight.T + last.bias).T)
        outs.append(x.T)
    return torch.stack(outs), torch.stack(logits)


@pytest.mark.parametrize('ndim', [2, 3])
def test_pixel_branch_is_section_3_3_written_out(ndim):
    torch.manual_seed(3)
    branch = PointAttentionBranch(5, 8, 3, num_heads=2).double()
    features = torch.randn(2, 5, *SHAPES[ndim], dtype=torch.float64)
    indices = torch.stack([torch.randperm(math.prod(SHAPES[ndim]))[:6] for _ in range(2)])
    point_features, point_logits = branch(features, indices)
    assert point_features.shape == (2, 8, 6) and point_logits.shape == (2, 3, 6)
    expected_features, expected_logits = reference_point_branch(branch, features, indices)
    torch.testing.assert_close(point_features, expected_features)
    torch.testing.assert_close(point_logits, expected_logits)


@pytest.mark.parametrize('ndim', [2, 3])
def test_pixel_branch_only_touches_the_selected_points(ndim):
    torch.manual_seed(4)
    branch = PointAttentionBranch(4, 8, 2, num_heads=4).double()
    shape = SHAPES[ndim]
    features = torch.randn(2, 4, *shape, dtype=torch.float64, requires_grad=True)
    indices = torch.stack([torch.randperm(math.prod(shape))[:5] for _ in range(2)])
    selected = torch.zeros(2, math.prod(shape), dtype=torch.bool)
    selected[torch.arange(2)[:, None], indices] = True
    selected = selected.reshape(2, 1, *shape)
    point_features, point_logits = branch(features, indices)
    # perturbing every other voxel changes nothing
    perturbed = torch.where(selected, features, features + 10 * torch.randn_like(features))
    again = branch(perturbed, indices)
    torch.testing.assert_close(again[0], point_features, rtol=0, atol=0)
    torch.testing.assert_close(again[1], point_logits, rtol=0, atol=0)
    # the gradient reaches the selected voxels only, all of them
    grad, = torch.autograd.grad(point_logits.square().sum() + point_features.sum(), features)
    assert grad.masked_select(~selected.expand_as(grad)).abs().max() == 0
    assert (grad.abs().sum(1) > 0)[:, None].eq(selected).all()


def test_pixel_branch_attends_within_each_sample_only():
    torch.manual_seed(5)
    branch = PointAttentionBranch(3, 4, 2, num_heads=2)
    features = torch.randn(2, 3, 6, 6)
    indices = torch.stack([torch.randperm(36)[:8] for _ in range(2)])
    alone = branch(features[:1], indices[:1])
    together = branch(torch.cat((features[:1], 5 * features[1:])), indices)
    torch.testing.assert_close(together[1][:1], alone[1])


def test_pixel_branch_refuses_heads_that_do_not_divide_the_width():
    with pytest.raises(ValueError, match='num_heads'):
        PointAttentionBranch(4, 6, 2, num_heads=4)


# --- saliency guidance fusion --------------------------------------------------------------------------------
@pytest.mark.parametrize('ndim', [2, 3])
def test_fusion_is_section_3_4_written_out(ndim):
    torch.manual_seed(6)
    conv = nn.Conv2d if ndim == 2 else nn.Conv3d
    fusion = SaliencyGuidanceFusion(3, 2, conv, nn.LeakyReLU, {'negative_slope': 0.1}).double()
    for p in fusion.parameters():  # non-zero biases too
        nn.init.normal_(p)
    shape = SHAPES[ndim]
    region, boundary, pixel = (torch.randn(2, 3, *shape, dtype=torch.float64) for _ in range(3))
    pixel = pixel * (torch.rand(2, 1, *shape) < 0.3)  # zero except at "points"
    out = fusion(region, boundary, pixel)

    # voxel-wise: channel c of a depth-wise 1x1 conv is a_c * s + b_c
    def depthwise(layer, s):
        return layer.weight.reshape(1, 3, *(1,) * ndim) * s + layer.bias.reshape(1, 3, *(1,) * ndim)

    def pointwise(layer, x):
        return torch.einsum('oi,bi...->bo...', layer.weight.reshape(layer.out_channels, -1), x) + \
            layer.bias.reshape(1, -1, *(1,) * ndim)

    s = boundary + pixel
    m_b = torch.sigmoid(depthwise(fusion.boundary_weight, s)) * boundary
    m_p = torch.sigmoid(depthwise(fusion.pixel_weight, s)) * pixel
    hidden = pointwise(fusion.hidden[0], torch.cat((region * m_b, region * m_p), 1))
    hidden = torch.where(hidden > 0, hidden, 0.1 * hidden)
    torch.testing.assert_close(out, pointwise(fusion.classifier, hidden))


def test_fusion_refuses_mismatched_features():
    fusion = SaliencyGuidanceFusion(3, 2)
    with pytest.raises(ValueError, match='must all have shape'):
        fusion(torch.zeros(1, 3, 4, 4), torch.zeros(1, 3, 4, 4), torch.zeros(1, 2, 4, 4))


# --- the network ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize('ndim', [2, 3])
@pytest.mark.parametrize('residual', [False, True])
def test_region_branch_is_nnunets_unet_and_every_branch_has_its_shape(ndim, residual):
    torch.manual_seed(7)
    ours, kwargs = build(ndim, residual, mln_num_points=9)
    theirs = (ResidualEncoderUNet if residual else PlainConvUNet)(**kwargs)
    missing, unexpected = theirs.load_state_dict(ours.state_dict(), strict=False)
    assert not missing  # the U-Net's parameters are nnU-Net's; the heads only add
    assert {k.split('.')[0] for k in unexpected} == {'boundary_branch', 'distance_head', 'pixel_branch', 'fusion',
                                                    'fusion_active'}
    x = torch.randn(2, 2, *SHAPES[ndim])
    out = ours(x)
    assert isinstance(out, MLNOutput)
    reference = theirs(x)
    assert len(out.region) == len(reference) == 2
    for a, b in zip(out.region, reference):
        torch.testing.assert_close(a, b)
    assert out.distance.shape == (2, 2, *SHAPES[ndim])  # one signed distance map per foreground class
    assert out.point_logits.shape == (2, 3, 9) and out.point_indices.shape == (2, 9)
    assert out.fused.shape == (2, 3, *SHAPES[ndim])
    torch.testing.assert_close(out[0], out.fused)  # fusion_active by default
    assert out.points.shape == (2, 9, ndim)
    with pytest.raises(IndexError):
        out[1]


BRANCH_PARAMETERS = {  # output -> modules that receive a gradient from it (besides the encoder)
    'region': {'decoder'},
    'distance': {'decoder', 'boundary_branch', 'distance_head'},
    'point_logits': {'pixel_branch'},
    'fused': {'decoder', 'boundary_branch', 'pixel_branch', 'fusion'},
}


@pytest.mark.parametrize('ndim', [2, 3])
@pytest.mark.parametrize('output', sorted(BRANCH_PARAMETERS))
def test_each_branch_backpropagates_into_its_own_modules(ndim, output):
    torch.manual_seed(8)
    network, _ = build(ndim, mln_num_points=6)
    out = network(torch.randn(2, 2, *SHAPES[ndim]))
    value = getattr(out, output)
    (sum(v.square().sum() for v in value) if isinstance(value, list) else value.square().sum()).backward()
    touched = {name.split('.')[0] for name, p in network.named_parameters()
               if p.grad is not None and p.grad.abs().sum() > 0}
    assert touched == BRANCH_PARAMETERS[output] | {'encoder'}
    if output == 'point_logits':  # the pixel branch reads the full-resolution encoder stage only
        encoder = {name.split('.')[2] for name, p in network.named_parameters()
                   if name.startswith('encoder.') and p.grad is not None and p.grad.abs().sum() > 0}
        assert encoder == {'0'}
    if output == 'fused':  # the shared MLP classifies points; the fusion takes the features before it
        assert all(p.grad is None for p in network.pixel_branch.classifier.parameters())


@pytest.mark.parametrize('ndim', [2, 3])
def test_inference_returns_the_fused_prediction_with_the_same_parameters(ndim):
    torch.manual_seed(9)
    training, kwargs = build(ndim, mln_num_points=5)
    inference = MLNPlainConvUNet(**{**kwargs, 'deep_supervision': False}, mln_num_points=5)
    inference.load_state_dict(training.state_dict(), strict=True)
    training.eval(), inference.eval()
    x = torch.randn(2, 2, *SHAPES[ndim])
    out, fused = training(x), inference(x)
    assert isinstance(fused, torch.Tensor)
    torch.testing.assert_close(fused, out.fused)
    # at inference the points are the N most uncertain voxels of the region prediction
    expected = select_uncertain_voxels(out.region[0], 5)
    assert torch.equal(out.point_indices, expected)


@pytest.mark.parametrize('ndim', [2, 3])
def test_before_the_fusion_is_trained_the_prediction_is_the_region_branch(ndim):
    """``fusion_active`` False (gamma still 0): training output [0] and the predictor's output are the
    full-resolution region logits; the flag travels in the state dict to the predictor's network."""
    torch.manual_seed(10)
    training, kwargs = build(ndim, mln_num_points=5)
    assert bool(training.fusion_active)  # default: the fusion (a network built outside a trainer)
    training.fusion_active.fill_(False)
    inference = MLNPlainConvUNet(**{**kwargs, 'deep_supervision': False}, mln_num_points=5)
    inference.load_state_dict(training.state_dict(), strict=True)
    assert not bool(inference.fusion_active)
    training.eval(), inference.eval()
    x = torch.randn(2, 2, *SHAPES[ndim])
    out = training(x)
    torch.testing.assert_close(out[0], out.region[0])
    torch.testing.assert_close(inference(x), out.region[0])
    assert not torch.allclose(out.fused, out.region[0])
    training.fusion_active.fill_(True)
    torch.testing.assert_close(training(x)[0], out.fused)


def test_the_pixel_branch_contributes_to_the_fused_prediction_at_its_points_only():
    torch.manual_seed(10)
    network, kwargs = build(2, deep_supervision=False, mln_num_points=7)
    network.eval()
    x = torch.randn(2, 2, *SHAPES[2])
    with torch.no_grad():
        fused = network(x)
        network.decoder.deep_supervision = True
        indices = network(x).point_indices
        network.decoder.deep_supervision = False
        for p in network.pixel_branch.pointwise_norm.parameters():  # other pixel features
            p.add_(1.0)
        changed = (network(x) - fused).abs().amax(1).flatten(1) > 0
    expected = torch.zeros_like(changed)
    expected[torch.arange(2)[:, None], indices] = True
    assert torch.equal(changed, expected)


def test_network_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match='at least 2 output channels'):
        build(2, num_classes=1)
    kwargs = {**plain_kwargs(2), 'strides': ((2, 2), (2, 2), (2, 1))}
    with pytest.raises(ValueError, match='full resolution'):
        MLNPlainConvUNet(**kwargs)
    with pytest.raises(ValueError, match='num_heads'):
        build(2, mln_num_heads=3)
