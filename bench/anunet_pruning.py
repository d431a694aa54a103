"""ANU-Net pruning: inference time and parameters per level vs the full model (ANU-Net paper,
Section 3.5, Table 6).

Two networks per dimension, both measured level by level in the same process, levels interleaved
round by round (order alternating) so machine drift hits all alike:

* the paper's preset (``ANUNet.paper_preset``: 1 channel, 32..512 features, 4 poolings; 2D on a
  512 x 512 slice as LiTS, 3D on a 32 x 128 x 128 patch);
* the network nnU-Net's planning gives (``nnunet-ext plan -pl ANUNetPlanner`` on a phantom dataset;
  its planned patch size).

Time is one forward pass (eval, no grad, batch 1) of the network of level ``l`` built with
``max_level=l`` (what ``nnunet-ext prune`` exports; the same work as the full network run with
``prune_level=l``). nnU-Net's sliding-window prediction runs that forward once per patch (times 8 or 4
with mirroring), so the ratios carry over. Prints a Markdown table; the issue's target: level L-1 at
least 1.3x faster than level L on CPU.

    python bench/anunet_pruning.py                    # 2d and 3d, CPU
    python bench/anunet_pruning.py -c 2d --rounds 10 --device cuda
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import statistics
import sys
import tempfile
import time

PAPER_SHAPES = {'2d': (512, 512), '3d_fullres': (32, 128, 128)}
PHANTOM_SHAPES = {'2d': (256, 256), '3d_fullres': (48, 160, 160)}


def _planned_network(dataset_id: int, configuration: str):
    """ANU-Net as nnUNetTrainerANUNet builds it from ANUNetPlanner's plans of a phantom dataset; and
    the planned patch size."""
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    from nnunet_ext.demo.phantom import write_phantom_dataset
    from nnunet_ext.planning import plan_and_preprocess
    from nnunet_ext.trainers.anunet_trainers import nnUNetTrainerANUNet

    name = f'PruneBench{configuration.replace("_", "")}'
    write_phantom_dataset(os.environ['nnUNet_raw'], dataset_id, name, num_train=4, num_test=0,
                          shape=PHANTOM_SHAPES[configuration], progress=False)
    with contextlib.redirect_stdout(io.StringIO()):
        plans_id = plan_and_preprocess(dataset_id, 'ANUNetPlanner', [configuration], [1], 2, preprocess=False,
                                       progress=False)
    plans = load_json(os.path.join(os.environ['nnUNet_preprocessed'], f'Dataset{dataset_id:03d}_{name}',
                                   plans_id + '.json'))
    manager = PlansManager(plans)
    configuration_manager = manager.get_configuration(configuration)
    network = nnUNetTrainerANUNet.build_network_architecture(manager, configuration_manager, 1, 3, False)
    return network, tuple(configuration_manager.patch_size)


def _per_level(network):
    return {level: network.pruned_copy(level).eval() for level in range(1, network.max_level + 1)}


def _time_levels(networks, shape, device, rounds: int, warmup: int):
    import torch
    x = torch.randn(1, 1, *shape, device=device)
    times = {level: [] for level in networks}
    order = list(networks)
    with torch.no_grad():
        for r in range(warmup + rounds):
            for level in (order if r % 2 == 0 else order[::-1]):
                if device.type == 'cuda':
                    torch.cuda.synchronize()
                start = time.perf_counter()
                networks[level](x)
                if device.type == 'cuda':
                    torch.cuda.synchronize()
                if r >= warmup:
                    times[level].append(time.perf_counter() - start)
    return {level: statistics.median(t) for level, t in times.items()}


def _report(title: str, shape, networks, medians) -> None:
    top = max(networks)
    print(f'\n**{title}**, input {list(shape)}\n')
    print('| level | parameters | forward s (median) | speed-up vs full | speed-up vs level + 1 |')
    print('|---|---|---|---|---|')
    for level in sorted(networks):
        params = sum(p.numel() for p in networks[level].parameters())
        step = f'{medians[level + 1] / medians[level]:.2f}x' if level < top else '-'
        print(f'| L{level}{" (full)" if level == top else ""} | {params:,} | {medians[level]:.4f} | '
              f'{medians[top] / medians[level]:.2f}x | {step} |', flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('-c', nargs='+', default=list(PAPER_SHAPES), choices=list(PAPER_SHAPES))
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--rounds', type=int, default=5)
    parser.add_argument('--warmup', type=int, default=1)
    args = parser.parse_args(argv)

    import warnings
    import torch
    warnings.filterwarnings('ignore', category=FutureWarning)
    from nnunet_ext.architectures.anunet import ANUNet
    from nnunet_ext.environment import nnunet_environment

    device = torch.device(args.device)
    print(f'# ANU-Net pruning: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, '
          f'{torch.get_num_threads()} torch threads, device {device}, torch {torch.__version__}')
    arguments = " ".join(argv if argv is not None else sys.argv[1:])
    print(f'# command: python bench/{os.path.basename(__file__)} {arguments}')
    with tempfile.TemporaryDirectory() as root:
        os.environ.update(nnunet_environment(root))
        os.environ.setdefault('nnUNet_n_proc_DA', '1')
        for i, configuration in enumerate(args.c):
            ndim = 2 if configuration == '2d' else 3
            paper = _per_level(ANUNet.paper_preset(4, num_classes=1, ndim=ndim, deep_supervision=False).to(device))
            _report(f'{configuration}: paper preset (Table 6)', PAPER_SHAPES[configuration], paper,
                    _time_levels(paper, PAPER_SHAPES[configuration], device, args.rounds, args.warmup))
            planned, patch = _planned_network(970 + i, configuration)
            planned = _per_level(planned.to(device))
            _report(f'{configuration}: nnU-Net-planned topology (ANUNetPlanner, 3 classes)', patch, planned,
                    _time_levels(planned, patch, device, args.rounds, args.warmup))
    return 0


if __name__ == '__main__':
    sys.exit(main())
