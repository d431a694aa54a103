"""``nnunet-ext deploy-predict`` (ONNX Runtime, no PyTorch) against ``nnUNetv2_predict`` on the same cases and
models, in one run: wall time of each command (start-up included, as a user sees it), the ratio, and the voxel
agreement of their label maps.

The models are built, not trained: a trainer's network with its initial weights in a checkpoint shaped like
nnU-Net's (the time of a prediction does not depend on the weights; agreement on an untrained network, whose
logits are nearly tied everywhere, is a harder test than on a trained one). Both commands run on the CPU by
default (``nnUNetv2_predict -device cpu``; ONNX Runtime's CPUExecutionProvider with ``--threads`` threads, by
default one per core as PyTorch uses); ``--device cuda`` runs ``-device cuda`` against the CUDAExecutionProvider.
Rounds alternate the order of the two commands.

    python bench/deploy_time.py                                  # 2d and 3d_fullres phantoms, nnUNetTrainer + GODCLFAM
    python bench/deploy_time.py --configurations 3d_fullres --trainers nnUNetTrainer --rounds 3
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Dict, List


SHAPES = {'2d': (256, 256), '3d_fullres': (48, 96, 96)}
DATASET_IDS = {'2d': 961, '3d_fullres': 962}


def _uptime() -> str:
    try:
        return subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()
    except OSError:
        return 'uptime not available'


def _run(command: List[str], env: Dict[str, str]) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return elapsed


def _model_folder(env: Dict[str, str], dataset: str, configuration: str, trainer_name: str) -> str:
    """A model folder with fold 0: the trainer's network, initial weights, in a checkpoint like nnU-Net's."""
    import torch
    from batchgenerators.utilities.file_and_folder_operations import load_json
    from nnunet_ext.model_folders import trainer_class
    preprocessed = os.path.join(env['nnUNet_preprocessed'], dataset)
    plans, dataset_json = load_json(os.path.join(preprocessed, 'nnUNetPlans.json')), load_json(
        os.path.join(preprocessed, 'dataset.json'))
    folder = os.path.join(env['nnUNet_results'], dataset, f'{trainer_name}__nnUNetPlans__{configuration}')
    os.makedirs(os.path.join(folder, 'fold_0'), exist_ok=True)
    shutil.copy(os.path.join(preprocessed, 'nnUNetPlans.json'), os.path.join(folder, 'plans.json'))
    shutil.copy(os.path.join(preprocessed, 'dataset.json'), os.path.join(folder, 'dataset.json'))
    plans['continue_training'] = False  # nnU-Net 2.8.1's trainer pops this key (nnUNetv2_train sets it)
    trainer = trainer_class(trainer_name)(plans, configuration, 0, dataset_json, torch.device('cpu'))
    network = trainer.build_network_architecture(trainer.plans_manager, trainer.configuration_manager,
                                                 len(dataset_json['channel_names']),
                                                 trainer.label_manager.num_segmentation_heads, False)
    trainer.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
    mirror_axes = trainer.inference_allowed_mirroring_axes
    torch.save({'network_weights': network.state_dict(), 'trainer_name': trainer_name,
                'init_args': {'configuration': configuration}, 'inference_allowed_mirroring_axes': mirror_axes},
               os.path.join(folder, 'fold_0', 'checkpoint_final.pth'))
    return folder


def _agreement(a_folder: str, b_folder: str) -> float:
    import SimpleITK as sitk
    names = sorted(n for n in os.listdir(a_folder) if n.endswith('.nii.gz'))
    same = total = 0
    for name in names:
        a = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(a_folder, name)))
        b = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(b_folder, name)))
        same, total = same + int((a == b).sum()), total + a.size
    return same / total


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--configurations', nargs='+', default=['2d', '3d_fullres'], choices=sorted(SHAPES))
    parser.add_argument('--trainers', nargs='+', default=['nnUNetTrainer', 'nnUNetTrainerGODCLFAM'])
    parser.add_argument('--cases', type=int, default=4, help='test cases per configuration (default 4)')
    parser.add_argument('--rounds', type=int, default=2, help='timed rounds per command (default 2)')
    parser.add_argument('--threads', type=int, default=os.cpu_count(), help='ONNX Runtime threads (default: cores)')
    parser.add_argument('--device', choices=['cpu', 'cuda'], default='cpu')
    parser.add_argument('--root', help='work folder (default: a temporary one, removed)')
    args = parser.parse_args(argv)

    from nnunet_ext.demo.phantom import write_phantom_dataset
    from nnunet_ext.environment import nnunet_environment

    root = args.root or tempfile.mkdtemp(prefix='deploy_time_')
    env = {**os.environ, **nnunet_environment(root), 'OMP_WAIT_POLICY': 'PASSIVE'}
    os.environ.update(env)
    provider = 'CUDAExecutionProvider' if args.device == 'cuda' else 'CPUExecutionProvider'
    before = _uptime()
    rows = []
    try:
        for configuration in args.configurations:
            dataset_id = DATASET_IDS[configuration]
            dataset = f'Dataset{dataset_id}_DeployTime{configuration.replace("_", "")}'
            if not os.path.isdir(os.path.join(env['nnUNet_preprocessed'], dataset)):
                write_phantom_dataset(env['nnUNet_raw'], dataset_id, dataset.split('_', 1)[1], num_train=2,
                                      num_test=args.cases, shape=SHAPES[configuration], seed=dataset_id,
                                      progress=False)
                _run(['nnUNetv2_plan_and_preprocess', '-d', str(dataset_id), '-c', configuration, '-np', '1',
                      '-npfp', '1'], env)
            images = os.path.join(env['nnUNet_raw'], dataset, 'imagesTs')
            for trainer_name in args.trainers:
                model = _model_folder(env, dataset, configuration, trainer_name)
                export = os.path.join(root, f'export_{trainer_name}_{configuration}')
                shutil.rmtree(export, ignore_errors=True)  # the model's weights are new: so must be its export
                _run(['nnunet-ext', 'export', model, '-f', '0', '-o', export], env)
                outputs = {k: os.path.join(root, f'{k}_{trainer_name}_{configuration}') for k in ('stock', 'deploy')}
                commands = {
                    'stock': ['nnUNetv2_predict', '-i', images, '-o', outputs['stock'], '-d', str(dataset_id), '-c',
                              configuration, '-tr', trainer_name, '-f', '0', '-device', args.device, '-npp', '1',
                              '-nps', '1'],
                    'deploy': ['nnunet-ext', 'deploy-predict', export, '-i', images, '-o', outputs['deploy'],
                               '--threads', str(args.threads), '--providers', provider, '--no-progress']}
                times = {k: [] for k in commands}
                for r in range(args.rounds):
                    for k in (('stock', 'deploy') if r % 2 == 0 else ('deploy', 'stock')):
                        shutil.rmtree(outputs[k], ignore_errors=True)
                        times[k].append(_run(commands[k], env))
                stock, deploy = statistics.median(times['stock']), statistics.median(times['deploy'])
                rows.append(dict(configuration=configuration, trainer=trainer_name, cases=args.cases,
                                 stock_s=round(stock, 2), deploy_s=round(deploy, 2), ratio=round(deploy / stock, 3),
                                 agreement=round(_agreement(outputs['stock'], outputs['deploy']), 5)))
                print(json.dumps(rows[-1]), flush=True)
    finally:
        if args.root is None:
            shutil.rmtree(root, ignore_errors=True)
    after = _uptime()
    print(f"\nuptime before: {before}\nuptime after:  {after}")
    print(f"ONNX Runtime: {provider}, {args.threads} threads; nnUNetv2_predict -device {args.device} "
          f"(torch threads: its default); {args.rounds} rounds, median wall time per command (start-up included)\n")
    print('| configuration | trainer | cases | nnUNetv2_predict s | deploy-predict s | ratio | voxel agreement |')
    print('|---|---|---|---|---|---|---|')
    for row in rows:
        print(f"| {row['configuration']} | {row['trainer']} | {row['cases']} | {row['stock_s']} | {row['deploy_s']} | "
              f"{row['ratio']} | {row['agreement']} |")
    return 0


if __name__ == '__main__':
    sys.exit(main())
