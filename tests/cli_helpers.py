"""Running the stock nnU-Net commands (and ours) in subprocesses, as a user's shell would."""
from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Dict, List, Optional, Sequence

BIN = os.path.dirname(sys.executable)  # the venv's console scripts (nnUNetv2_*, nnunet-ext)

# test-sized training, read by our trainers only (nnunet_ext.training.schedule); one export worker for the
# final validation of the fold's one case (nnU-Net spawns its pool: every further worker costs seconds of imports)
SHORT_TRAINING = {'nnUNet_ext_num_epochs': '1', 'nnUNet_ext_num_iterations_per_epoch': '3',
                  'nnUNet_ext_num_val_iterations_per_epoch': '2', 'nnUNet_def_n_proc': '1'}


def user_environment(root: str) -> Dict[str, str]:
    """The environment after ``eval "$(nnunet-ext env --root ROOT)"``, exactly as README says."""
    env = {k: v for k, v in os.environ.items() if not k.startswith('nnUNet')}
    env['PATH'] = BIN + os.pathsep + env.get('PATH', '')
    exports = run(['nnunet-ext', 'env', '--root', root], env).stdout
    script = f'{exports}\nenv -0'
    dumped = subprocess.run(['bash', '-c', script], env=env, capture_output=True, check=True).stdout
    env = dict(item.split('=', 1) for item in dumped.decode().split('\0') if '=' in item)
    env['nnUNet_def_n_proc'] = '2'  # validation/export processes on 2 cores
    # nnU-Net gives every process one OpenMP thread per core; with two or three processes at once
    # (run_parallel) spin-waiting threads stall each other: passive waiting is 3-10x faster here
    env['OMP_WAIT_POLICY'] = 'PASSIVE'
    return env


def run(cmd: Sequence[str], env: Dict[str, str], check: bool = True, timeout: float = 900,
        cwd: str | None = None) -> subprocess.CompletedProcess:
    cmd = [os.path.join(BIN, cmd[0]) if os.path.exists(os.path.join(BIN, cmd[0])) else cmd[0], *cmd[1:]]
    start = time.perf_counter()
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, encoding='utf-8', errors='replace',
                            timeout=timeout, cwd=cwd)
    if os.environ.get('NNUNET_EXT_TEST_TIMINGS'):  # a file: one line per command, to find where the suite's time goes
        with open(os.environ['NNUNET_EXT_TEST_TIMINGS'], 'a', encoding='utf-8') as f:
            f.write(f"{time.perf_counter() - start:7.1f} s  {' '.join(os.path.basename(c) for c in cmd)[:160]}\n")
    if check:
        check_success(cmd, result)
    return result


def check_success(cmd: Sequence[str], result: subprocess.CompletedProcess) -> None:
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {result.returncode}\n--- stdout (tail)\n"
                             f"{result.stdout[-4000:]}\n--- stderr (tail)\n{result.stderr[-6000:]}")


def run_parallel(commands: Sequence[Sequence[str]], env: Dict[str, str], workers: int = 2, timeout: float = 900,
                 envs: Optional[Sequence[Dict[str, str]]] = None, check: bool = True
                 ) -> List[subprocess.CompletedProcess]:
    """``run`` for independent commands (different trainers, folds or output folders), ``workers`` at a
    time: each nnU-Net command spends ~8 s importing torch and nnU-Net on one core, so two at a time
    nearly halve a CLI test on 2 cores. ``envs`` gives each command its own environment (default:
    ``env`` for all). Trainings of one dataset need its ``splits_final.json`` first
    (``write_default_splits``; ``planned_phantom`` writes it). Results in the order of ``commands``; with
    ``check``, the first failure raises after all have finished."""
    envs = [env] * len(commands) if envs is None else list(envs)
    if len(envs) != len(commands):
        raise ValueError(f"{len(commands)} commands but {len(envs)} environments")
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(run, command, e, False, timeout) for command, e in zip(commands, envs)]
        results = [f.result() for f in futures]
    for command, result in zip(commands if check else [], results):
        check_success(command, result)
    return results


def planned_phantom(env: Dict[str, str], dataset_id: int, name: str, configuration: str, shape: Sequence[int],
                    prepare: Optional[Callable[[str], None]] = None, planner: Optional[str] = None,
                    num_train: int = 5) -> str:
    """Writes a ``num_train`` + 2 case phantom dataset (``prepare(dataset_folder)`` may edit it), then runs the stock
    ``nnUNetv2_plan_and_preprocess`` for one configuration (or, with ``planner``, ``nnunet-ext plan -pl
    PLANNER``, as README tells users for our planners). Returns the dataset's folder name."""
    from nnunet_ext.demo.phantom import write_phantom_dataset
    write_phantom_dataset(env['nnUNet_raw'], dataset_id, name, num_train=num_train, num_test=2, shape=shape,
                          seed=dataset_id, progress=False)
    dataset = f'Dataset{dataset_id:03d}_{name}'
    if prepare is not None:
        prepare(os.path.join(env['nnUNet_raw'], dataset))
    if planner is None:
        command = ['nnUNetv2_plan_and_preprocess', '-d', str(dataset_id)]
    else:
        command = ['nnunet-ext', 'plan', str(dataset_id), '-pl', planner, '--no_pbar']
    run([*command, '--verify_dataset_integrity', '-c', configuration, '-np', '1', '-npfp', '1'],
        {**env, 'nnUNet_n_proc_DA': '1'})  # the planner fails with 0
    write_default_splits(env, dataset)
    return dataset


def write_default_splits(env: Dict[str, str], dataset: str) -> None:
    """Writes the ``splits_final.json`` nnU-Net's first training would write (its own seeded 5-fold split
    of the training cases), so that trainings started in parallel (``run_parallel``) read it instead of
    racing to create it."""
    import json
    from nnunetv2.utilities.crossval_split import generate_crossval_split
    from nnunetv2.utilities.utils import get_identifiers_from_splitted_dataset_folder
    raw = os.path.join(env['nnUNet_raw'], dataset)
    with open(os.path.join(raw, 'dataset.json'), encoding='utf-8') as f:
        file_ending = json.load(f)['file_ending']
    cases = sorted(get_identifiers_from_splitted_dataset_folder(os.path.join(raw, 'imagesTr'), file_ending))
    splits = generate_crossval_split(cases, seed=12345, n_splits=5)
    with open(os.path.join(env['nnUNet_preprocessed'], dataset, 'splits_final.json'), 'w', encoding='utf-8') as f:
        json.dump(splits, f, indent=4)


def verify_raw_dataset(folder: str) -> None:
    """nnU-Net's own integrity check of a raw dataset (raises on any problem)."""
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    verify_dataset_integrity(folder, num_processes=1)


def snapshot(root) -> set:
    """Every file and folder under ``root`` (hidden ones included): what a failed run must not add to."""
    return {os.path.relpath(os.path.join(d, n), root) for d, dirs, files in os.walk(root) for n in dirs + files}


def refused_in_process(capsys, argv: Sequence[str], watched, pattern: Optional[str] = None,
                       may_appear: Sequence[str] = ()) -> str:
    """``nnunet-ext ARGV`` in-process (``nnunet_ext.cli.main``, as the console script calls it; an exception
    escaping it is the traceback a user would see): exit status 2 (argparse's own refusals included), exactly
    one ``error:`` line on stderr besides progress bars, no traceback, the message after ``nnunet-ext `` matching
    the regex ``pattern``, and nothing new under ``watched`` but the empty folders ``may_appear``. Returns the
    error line."""
    from nnunet_ext.cli import main
    before = snapshot(watched)
    try:
        status = main(list(argv))
    except SystemExit as e:  # argparse: usage + one error line
        status = e.code
    err = capsys.readouterr().err
    assert status == 2, f"{argv}: exit status {status}\n{err}"
    assert 'Traceback' not in err, err
    errors = [line for line in re.split(r'[\r\n]', err) if 'error:' in line]
    assert len(errors) == 1, err
    if pattern is not None:
        assert re.search(pattern, errors[0].split('nnunet-ext ', 1)[-1]), err
    new = snapshot(watched) - before
    assert all(n in may_appear and not os.listdir(os.path.join(watched, n)) for n in new), new
    return errors[0]


def assert_refused(result: subprocess.CompletedProcess, pattern: str, raw_folder: str) -> None:
    """A user error: exit code 2, stderr matching the regex ``pattern``, no traceback, and nothing left
    in ``raw_folder`` (the converters' all-or-nothing promise)."""
    assert result.returncode == 2, result.stderr
    assert re.search(pattern, result.stderr), result.stderr
    assert 'Traceback' not in result.stderr, result.stderr
    assert os.listdir(raw_folder) == [], os.listdir(raw_folder)


#: configuration -> (dataset id, phantom shape, training cases) of the planned phantoms shared by the stock-CLI
#: tests; ten in 2d: two validation cases per fold of nnU-Net's 5-fold split (test_compare_cli.py pairs them)
STOCK_PHANTOMS = {'2d': (201, (48, 48), 10), '3d_fullres': (202, (12, 32, 32), 5)}


#: plans made on the stock phantoms besides nnU-Net's default ``nnUNetPlans``: our planner -> its plans
STOCK_PHANTOM_EXTRA_PLANS = {'ANUNetPlanner': 'nnUNetPlansANUNet'}


def _plan_stock_phantom(env: Dict[str, str], configuration: str) -> str:
    dataset_id, shape, num_train = STOCK_PHANTOMS[configuration]
    dataset = planned_phantom(env, dataset_id, f'StockPhantom{configuration.replace("_", "")}', configuration, shape,
                              num_train=num_train)
    for planner in STOCK_PHANTOM_EXTRA_PLANS:  # the fingerprint is reused
        run(['nnunet-ext', 'plan', str(dataset_id), '-pl', planner, '--no_pbar', '-c', configuration, '-np', '1',
             '-npfp', '1'], {**env, 'nnUNet_n_proc_DA': '1'})  # the planner fails with 0
    return dataset


def plan_stock_phantoms(root: str) -> Dict[str, dict]:
    """Plans one phantom per configuration of :data:`STOCK_PHANTOMS` with nnU-Net's default planner and
    with ours of :data:`STOCK_PHANTOM_EXTRA_PLANS`, both configurations at once, in one user environment
    under ``root``: ``{configuration: {env, dataset_id, dataset}}``. Shared by the stock-CLI tests of
    several trainer families (each adds its own trainer's results folder), so the suite plans them once
    instead of once per family, and before any training (planning rewrites the preprocessed folder's
    ``dataset.json`` and ``gt_segmentations``, which trainings read)."""
    env = user_environment(root)
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {c: pool.submit(_plan_stock_phantom, env, c) for c in STOCK_PHANTOMS}
        return {c: dict(env=env, dataset_id=STOCK_PHANTOMS[c][0], dataset=f.result()) for c, f in futures.items()}


def assert_preactivation_resunet_fold(fold: str, trainer: str, lfam: bool) -> None:
    """A fold folder that the stock ``nnUNetv2_train`` wrote for a residual U-Net trainer: ``trainer``'s final
    checkpoint holds pre-activation units and our decoder (nnU-Net's ``UNetDecoder`` keeps the encoder under
    ``decoder.encoder.``), LFAM's deformable alignments exactly when ``lfam``, and the fold was validated."""
    import torch
    checkpoint = torch.load(os.path.join(fold, 'checkpoint_final.pth'), map_location='cpu', weights_only=False)
    assert checkpoint['trainer_name'] == trainer
    weights = checkpoint['network_weights']
    assert any(k.endswith('.norm1.weight') for k in weights)  # pre-activation units
    assert any(k.startswith('decoder.alignments.') for k in weights) == lfam
    assert not any(k.startswith('decoder.encoder.') for k in weights)
    assert os.path.isfile(os.path.join(fold, 'validation', 'summary.json'))


def assert_label_maps_on_input_grids(images_folder: str, predictions: Dict[str, str], labels=(0, 1, 2)) -> None:
    """Each folder of ``predictions`` (name -> folder) holds one label map per ``*_0000.nii.gz`` image of
    ``images_folder``, on that image's grid (size, spacing), with values in ``labels``."""
    import glob

    import numpy as np
    import SimpleITK as sitk
    images = sorted(glob.glob(os.path.join(images_folder, '*_0000.nii.gz')))
    for name, folder in predictions.items():
        predicted = sorted(glob.glob(os.path.join(folder, '*.nii.gz')))
        assert [os.path.basename(p) for p in predicted] == [os.path.basename(i).replace('_0000', '') for i in images]
        for image, prediction in zip(images, predicted):
            a, b = sitk.ReadImage(image), sitk.ReadImage(prediction)
            assert a.GetSize() == b.GetSize() and np.allclose(a.GetSpacing(), b.GetSpacing()), name
            assert set(np.unique(sitk.GetArrayFromImage(b))) <= set(labels), name
