"""Median training-step time of our trainers relative to nnU-Net's own ``nnUNetTrainer``.

Same process, same batches, same initial weights (where the networks share them): each trainer is built by nnU-Net's own
``get_trainer_from_args`` on a phantom dataset planned by nnU-Net, the batches come from the
reference trainer's data loader, and the trainers' ``train_step`` calls (forward, loss, backward,
optimizer step) are interleaved round by round, alternating the order, so drifts of the machine
hit both alike. Prints one row per trainer and configuration with the ratio
``median(trainer) / median(nnUNetTrainer)``. ``bench/run_all.py`` uses the pieces of this module for
every trainer (adding inference time and peak memory).

    python bench/step_time.py                              # 2d and 3d_fullres, nnUNetTrainerGODC
    python bench/step_time.py -tr nnUNetTrainerGODC nnUNetTrainerGODCOnly --device cuda --rounds 50
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
from typing import Callable, Dict, List, Optional

SHAPES = {'2d': (96, 96), '3d_fullres': (24, 64, 64)}
REFERENCE = 'nnUNetTrainer'
MAX_BATCHES = 16


def setup_environment(root: str) -> None:
    from nnunet_ext.environment import nnunet_environment
    os.environ.update(nnunet_environment(root))
    os.environ.setdefault('nnUNet_n_proc_DA', '1')  # planning needs >= 1


def prepare_dataset(dataset_id: int, configuration: str) -> None:
    """A phantom dataset of 8 cases of ``SHAPES[configuration]``, planned and preprocessed by nnU-Net."""
    from nnunet_ext.demo.phantom import write_phantom_dataset
    from nnunet_ext.planning import plan_and_preprocess
    write_phantom_dataset(os.environ['nnUNet_raw'], dataset_id, f'Bench{configuration.replace("_", "")}',
                          num_train=8, num_test=0, shape=SHAPES[configuration], progress=False)
    with contextlib.redirect_stdout(io.StringIO()):
        plan_and_preprocess(dataset_id, 'ExperimentPlanner', [configuration], [2], 2, progress=False)


def build_trainer(name: str, dataset_id: int, configuration: str, device):
    """An initialised trainer (network in train mode), as nnUNetv2_train builds it."""
    from nnunetv2.run.run_training import get_trainer_from_args
    with contextlib.redirect_stdout(io.StringIO()):
        trainer = get_trainer_from_args(str(dataset_id), configuration, 0, name, device=device)
        trainer.initialize()
    trainer.network.train()
    return trainer


def share_initial_weights(reference, trainer) -> None:
    """Gives ``trainer`` the reference's weights wherever the networks share a parameter of the same shape
    (extra modules, widened layers keep their own)."""
    own = trainer.network.state_dict()
    shared = {k: v for k, v in reference.network.state_dict().items() if k in own and own[k].shape == v.shape}
    trainer.network.load_state_dict(shared, strict=False)


def reference_batches(reference, count: int) -> list:
    """``count`` training batches (at most ``MAX_BATCHES``, then reused) from the reference's data loader,
    made in this process up front."""
    planning_value = os.environ['nnUNet_n_proc_DA']
    os.environ['nnUNet_n_proc_DA'] = '0'
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            loader, _ = reference.get_dataloaders()
        return [next(loader) for _ in range(min(count, MAX_BATCHES))]
    finally:
        os.environ['nnUNet_n_proc_DA'] = planning_value  # the planner fails with 0


def with_trainer_targets(trainer, batches) -> list:
    """The batches with the targets in the trainer's deep-supervision format: from the full-resolution
    target, nnU-Net's ``DownsampleSegForDSTransform`` per sample at the trainer's
    ``_get_deep_supervision_scales()`` (what its own data pipeline does; ANU-Net's heads are all at full
    resolution), or the full-resolution target alone without deep supervision."""
    import torch
    from batchgeneratorsv2.transforms.utils.deep_supervision_downsampling import DownsampleSegForDSTransform
    scales = trainer._get_deep_supervision_scales()
    converted = []
    for batch in batches:
        full = batch['target'][0] if isinstance(batch['target'], list) else batch['target']
        if scales is None:
            converted.append({**batch, 'target': full})
            continue
        transform = DownsampleSegForDSTransform(ds_scales=scales)
        samples = [transform(segmentation=full[b])['segmentation'] for b in range(full.shape[0])]
        converted.append({**batch, 'target': [torch.stack([s[i] for s in samples]) for i in range(len(scales))]})
    return converted


def with_distance_maps(trainer, batches):
    """Batches as a multi-level-loss trainer's data pipeline delivers them (distance maps appended by
    its ``SignedDistanceTransform`` per sample, in the data-augmentation workers in real training),
    and the seconds that transform takes per batch; unchanged batches and None for other trainers.
    Such trainers are measured at full weights (alpha = beta = 1, the schedule's late epochs)."""
    if not hasattr(trainer, '_distance_transform'):
        return batches, None
    import torch
    trainer.loss.weights = trainer.mll_schedule(10 ** 6)
    transform = trainer._distance_transform()
    start = time.perf_counter()
    converted = []
    for batch in batches:
        target = batch['target'] if isinstance(batch['target'], list) else [batch['target']]
        samples = [transform(segmentation=[t[b] for t in target])['segmentation'] for b in range(len(target[0]))]
        packed = [torch.stack([s[i] for s in samples]) for i in range(len(target))]
        converted.append({**batch, 'target': packed if isinstance(batch['target'], list) else packed[0]})
    return converted, (time.perf_counter() - start) / len(batches)


def time_steps(trainers: Dict[str, object], batches: list, device, rounds: int, warmup: int,
               peak_memory: Optional[Callable[[Callable[[], object]], Optional[float]]] = None,
               progress: Optional[Callable[[], None]] = None):
    """Median ``train_step`` seconds per trainer, interleaved round by round in alternating order.

    Returns ``(medians, pipeline, peaks)``: ``pipeline`` the per-batch seconds of a data-pipeline
    transform (multi-level-loss trainers), ``peaks`` the peak memory of one more step per trainer
    (``peak_memory(step)``, measured after the timing; empty without it)."""
    import torch
    prepared = {name: with_distance_maps(trainer, with_trainer_targets(trainer, batches))
                for name, trainer in trainers.items()}
    times = {name: [] for name in trainers}
    names = list(trainers)
    for r in range(warmup + rounds):
        for name in (names if r % 2 == 0 else names[::-1]):
            batch = prepared[name][0][r % len(batches)]
            if device.type == 'cuda':
                torch.cuda.synchronize()
            start = time.perf_counter()
            trainers[name].train_step(batch)  # ends with loss.cpu(): synchronises
            if r >= warmup:
                times[name].append(time.perf_counter() - start)
        if progress is not None:
            progress()
    peaks = {}
    if peak_memory is not None:
        for name in names:
            batch = prepared[name][0][0]
            peaks[name] = peak_memory(lambda: trainers[name].train_step(batch))
    pipeline = {name: p[1] for name, p in prepared.items() if p[1] is not None}
    return {name: statistics.median(t) for name, t in times.items()}, pipeline, peaks


def measure(dataset_id: int, configuration: str, trainer_names: List[str], device, rounds: int, warmup: int):
    reference = build_trainer(REFERENCE, dataset_id, configuration, device)
    trainers = {REFERENCE: reference}
    for name in trainer_names:
        trainers[name] = build_trainer(name, dataset_id, configuration, device)
        share_initial_weights(reference, trainers[name])
    batches = reference_batches(reference, rounds + warmup)
    medians, pipeline, _ = time_steps(trainers, batches, device, rounds, warmup)
    info = dict(batch_size=reference.batch_size, patch_size=list(reference.configuration_manager.patch_size),
                pipeline=pipeline)
    return medians, info


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('-tr', nargs='+', default=['nnUNetTrainerGODC'], help='trainers to compare with nnUNetTrainer')
    parser.add_argument('-c', nargs='+', default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--rounds', type=int, default=20, help='timed steps per trainer')
    parser.add_argument('--warmup', type=int, default=3)
    args = parser.parse_args(argv)

    import warnings
    import torch
    from importlib.metadata import version
    warnings.filterwarnings('ignore', category=FutureWarning)
    device = torch.device(args.device)
    print(f'# step time vs {REFERENCE}: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, '
          f'device {device}{" " + torch.cuda.get_device_name() if device.type == "cuda" else ""}, '
          f'torch {torch.__version__}, nnunetv2 {version("nnunetv2")}')
    arguments = " ".join(argv if argv is not None else sys.argv[1:])
    print(f'# command: python bench/{os.path.basename(__file__)} {arguments}')
    print('| configuration | patch | batch | trainer | median step s | ratio vs nnUNetTrainer |')
    print('|---|---|---|---|---|---|')
    with tempfile.TemporaryDirectory() as root:
        setup_environment(root)
        for i, configuration in enumerate(args.c):
            dataset_id = 980 + i
            prepare_dataset(dataset_id, configuration)
            medians, info = measure(dataset_id, configuration, args.tr, device, args.rounds, args.warmup)
            for name, median in medians.items():
                print(f'| {configuration} | {info["patch_size"]} | {info["batch_size"]} | {name} | {median:.4f} | '
                      f'{median / medians[REFERENCE]:.3f} |', flush=True)
            for name, seconds in info['pipeline'].items():
                print(f'# {configuration} {name}: signed distance maps {seconds:.4f} s per batch in the data pipeline '
                      f'(per sample in the augmentation workers, not in the step)', flush=True)
    return 0


if __name__ == '__main__':
    sys.exit(main())
