"""Term magnitudes at initialisation of the multi-level structural loss (MLL, Eq. 11) and of the MLN loss
(Eq. 13), on freshly built networks (nnU-Net's ``PlainConvUNet`` / our ``MLNPlainConvUNet``, He-initialised
as nnU-Net does), against nnU-Net's region term (Dice + CE, deep-supervision weighted), for the balanced
form (default: Phi / mean |Phi| per sample and class) and the literal one (Phi in mm).

Patches: 2D 256^2 at 0.8 mm (7 stages, 6 deep-supervision outputs) and 3D 128^3 at 1 mm (6 stages, 5
outputs); contents: an organ with a lesion (labels 1, 2), an empty patch, a patch class 1 fills. Weights at
their plateau: MLL alpha = beta = 1, MLN alpha = beta = gamma = 1. The issue-16 criterion: every weighted
term within 10x of the region term.

    python bench/loss_balance.py                  # ~1-2 min on 2 CPU cores
    python bench/loss_balance.py --features 32    # nnU-Net's widths (slower; the magnitudes barely change)
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np
import torch
from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
from dynamic_network_architectures.architectures.unet import PlainConvUNet
from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss
from torch import nn

from nnunet_ext.architectures.mln_unet import MLNPlainConvUNet
from nnunet_ext.losses import BoundaryLoss, StructuralLoss, TermWeights
from nnunet_ext.losses.mln import MLNLoss, MLNTermWeights, SignedDistanceRegressionLoss
from nnunet_ext.training.deep_supervision import nnunet_deep_supervision_weights
from nnunet_ext.training.distance_transform import SignedDistanceTransform

PATCHES = {'2d-256 @0.8mm': ((256, 256), (0.8, 0.8), 7), '3d-128 @1mm': ((128, 128, 128), (1.0, 1.0, 1.0), 6)}
CONTENTS = ('organ', 'empty', 'filled')
FORMS = {'balanced (mean)': 'mean', 'literal (mm)': None}


def labels_for(shape, spacing, content):
    if content != 'organ':
        return torch.full((1, *shape), 0 if content == 'empty' else 1, dtype=torch.int16)
    grid = np.meshgrid(*[(np.arange(n) + 0.5) * s for n, s in zip(shape, spacing)], indexing='ij')
    extent = np.array([n * s for n, s in zip(shape, spacing)])
    organ = sum(((g - 0.55 * e) / (0.38 * e)) ** 2 for g, e in zip(grid, extent)) < 1
    lesion = sum(((g - 0.65 * e) / (0.1 * e)) ** 2 for g, e in zip(grid, extent)) < 1
    return torch.from_numpy(np.where(lesion, 2, np.where(organ, 1, 0)).astype(np.int16))[None]


def network_kwargs(ndim, n_stages, base, cap):
    conv, norm = (nn.Conv2d, nn.InstanceNorm2d) if ndim == 2 else (nn.Conv3d, nn.InstanceNorm3d)
    return dict(input_channels=1, n_stages=n_stages,
                features_per_stage=[min(base * 2 ** i, cap) for i in range(n_stages)], conv_op=conv,
                kernel_sizes=[[3] * ndim] * n_stages, strides=[[1] * ndim] + [[2] * ndim] * (n_stages - 1),
                n_conv_per_stage=2, num_classes=3, n_conv_per_stage_decoder=2, conv_bias=True, norm_op=norm,
                norm_op_kwargs={'eps': 1e-5, 'affine': True}, nonlin=nn.LeakyReLU, nonlin_kwargs={'inplace': True},
                deep_supervision=True)


def region_loss():
    return DC_and_CE_loss({'batch_dice': False, 'smooth': 1e-5, 'do_bg': False, 'ddp': False}, {}, weight_ce=1,
                          weight_dice=1, ignore_label=None, dice_class=MemoryEfficientSoftDiceLoss)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--features', type=int, default=8, help='features of the first stage (nnU-Net: 32)')
    parser.add_argument('--patches', nargs='+', default=list(PATCHES), choices=list(PATCHES))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    print(f"# loss terms at initialisation (weighted, full weights); load average {os.getloadavg()[0]:.2f}")
    print("| patch | content | form | MLL region | alpha E_B | beta E_P | MLN region | alpha E_B | alpha L2 | "
          "beta E_P | gamma fusion | max ratio to region |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.patches:
        shape, spacing, n_stages = PATCHES[name]
        kwargs = network_kwargs(len(shape), n_stages, args.features, 320 if len(shape) == 3 else 512)
        unet, mln = PlainConvUNet(**kwargs), MLNPlainConvUNet(**kwargs)
        for network in (unet, mln):
            network.apply(network.initialize)
        x = torch.randn(1, 1, *shape)
        with torch.no_grad():
            unet_out, mln_out = unet(x), mln(x)
        scales = [[1 / 2 ** i] * len(shape) for i in range(len(unet_out))]
        ds_weights = nnunet_deep_supervision_weights(len(scales))
        for content in CONTENTS:
            segs = DownsampleSegForDSTransform(scales)(segmentation=labels_for(shape, spacing, content))['segmentation']
            targets = [t[None] for t in SignedDistanceTransform(spacing, foreground_labels=(1, 2))(
                segmentation=segs)['segmentation']]
            for form, normalization in FORMS.items():
                mll = StructuralLoss(region_loss(), deep_supervision_weights=ds_weights,
                                     boundary_loss=BoundaryLoss(normalization=normalization))
                mll.weights = TermWeights(1.0, 1.0, 1.0)
                mln_loss = MLNLoss(region_loss(), deep_supervision_weights=ds_weights,
                                   distance_loss=SignedDistanceRegressionLoss(normalization))
                mln_loss.weights = MLNTermWeights(1.0, 1.0, 1.0, 1.0)
                with torch.no_grad():
                    mll(unet_out, targets)
                    mln_loss(mln_out, targets)
                a, b = mll.pop_term_means(), mln_loss.pop_term_means()
                ratio = max(max(abs(v) / a['region'] for k, v in a.items() if k != 'region'),
                            max(abs(v) / b['region'] for k, v in b.items() if k != 'region'))
                print(f"| {name} | {content} | {form} | {a['region']:.3g} | {a['boundary']:.3g} | {a['point']:.3g} | "
                      f"{b['region']:.3g} | {b['boundary']:.3g} | {b['distance_l2']:.3g} | {b['point']:.3g} | "
                      f"{b['fusion']:.3g} | {ratio:.3g} |")
        sys.stdout.flush()


if __name__ == '__main__':
    main()
