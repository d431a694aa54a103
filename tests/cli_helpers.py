"""Running the stock nnU-Net commands (and ours) in subprocesses, as a user's shell would."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from typing import Callable, Dict, Optional, Sequence

BIN = os.path.dirname(sys.executable)  # the venv's console scripts (nnUNetv2_*, nnunet-ext)

# test-sized training: read by our trainers only (nnunet_ext.training.schedule)
SHORT_TRAINING = {'nnUNet_ext_num_epochs': '1', 'nnUNet_ext_num_iterations_per_epoch': '3',
                  'nnUNet_ext_num_val_iterations_per_epoch': '2'}


def user_environment(root: str) -> Dict[str, str]:
    """The environment after ``eval "$(nnunet-ext env --root ROOT)"``, exactly as README says."""
    env = {k: v for k, v in os.environ.items() if not k.startswith('nnUNet')}
    env['PATH'] = BIN + os.pathsep + env.get('PATH', '')
    exports = run(['nnunet-ext', 'env', '--root', root], env).stdout
    script = f'{exports}\nenv -0'
    dumped = subprocess.run(['bash', '-c', script], env=env, capture_output=True, check=True).stdout
    env = dict(item.split('=', 1) for item in dumped.decode().split('\0') if '=' in item)
    env['nnUNet_def_n_proc'] = '2'  # validation/export processes on 2 cores
    return env


def run(cmd: Sequence[str], env: Dict[str, str], check: bool = True, timeout: float = 900,
        cwd: str | None = None) -> subprocess.CompletedProcess:
    cmd = [os.path.join(BIN, cmd[0]) if os.path.exists(os.path.join(BIN, cmd[0])) else cmd[0], *cmd[1:]]
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, encoding='utf-8', errors='replace',
                            timeout=timeout, cwd=cwd)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {result.returncode}\n--- stdout (tail)\n"
                             f"{result.stdout[-4000:]}\n--- stderr (tail)\n{result.stderr[-6000:]}")
    return result


def planned_phantom(env: Dict[str, str], dataset_id: int, name: str, configuration: str, shape: Sequence[int],
                    prepare: Optional[Callable[[str], None]] = None) -> str:
    """Writes a 5 + 2 case phantom dataset (``prepare(dataset_folder)`` may edit it), then runs the stock
    ``nnUNetv2_plan_and_preprocess`` for one configuration. Returns the dataset's folder name."""
    from nnunet_ext.demo.phantom import write_phantom_dataset
    write_phantom_dataset(env['nnUNet_raw'], dataset_id, name, num_train=5, num_test=2, shape=shape,
                          seed=dataset_id, progress=False)
    dataset = f'Dataset{dataset_id:03d}_{name}'
    if prepare is not None:
        prepare(os.path.join(env['nnUNet_raw'], dataset))
    run(['nnUNetv2_plan_and_preprocess', '-d', str(dataset_id), '--verify_dataset_integrity', '-c', configuration,
         '-np', '2', '-npfp', '2'], {**env, 'nnUNet_n_proc_DA': '1'})  # the planner fails with 0
    return dataset


def verify_raw_dataset(folder: str) -> None:
    """nnU-Net's own integrity check of a raw dataset (raises on any problem)."""
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity
    verify_dataset_integrity(folder, num_processes=1)


def assert_refused(result: subprocess.CompletedProcess, pattern: str, raw_folder: str) -> None:
    """A user error: exit code 2, stderr matching the regex ``pattern``, no traceback, and nothing left
    in ``raw_folder`` (the converters' all-or-nothing promise)."""
    assert result.returncode == 2, result.stderr
    assert re.search(pattern, result.stderr), result.stderr
    assert 'Traceback' not in result.stderr, result.stderr
    assert os.listdir(raw_folder) == [], os.listdir(raw_folder)
