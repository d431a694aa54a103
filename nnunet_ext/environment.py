"""The shell environment nnU-Net needs to find data and our trainers (``nnunet-ext env``)."""
from __future__ import annotations

import os
import shlex
from typing import Dict, Mapping, Optional

DATA_VARIABLES = ('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results')
TRAINER_VARIABLE = 'nnUNet_extTrainer'


class EnvironmentSetupError(RuntimeError):
    """A folder of the requested environment cannot be used."""


def trainers_folder() -> str:
    """The folder holding this package's trainer modules (what ``nnUNet_extTrainer`` points at)."""
    import nnunet_ext.trainers
    return os.path.dirname(os.path.abspath(nnunet_ext.trainers.__file__))


def _writable_dir(path: str, variable: str) -> str:
    path = os.path.abspath(os.path.expanduser(path))
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise EnvironmentSetupError(f"cannot create {variable} folder {path}: {e.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise EnvironmentSetupError(f"{variable} folder {path} is not writable; choose another --root")
    return path


def nnunet_environment(root: Optional[str] = None, environ: Mapping[str, str] = os.environ) -> Dict[str, str]:
    """Values of nnU-Net's variables: ``root/nnUNet_raw`` etc. when ``root`` is given, otherwise
    the values already set in ``environ`` (a variable unset there is an error naming ``--root``).
    ``nnUNet_extTrainer`` gets this package's trainer folder prepended to any folders already
    listed. Data folders are created if missing and must be writable."""
    values = {}
    for variable in DATA_VARIABLES:
        if root is not None:
            values[variable] = _writable_dir(os.path.join(root, variable), variable)
        elif environ.get(variable):
            values[variable] = _writable_dir(environ[variable], variable)
        else:
            raise EnvironmentSetupError(f"{variable} is not set: give a data root with --root DIR "
                                    f"(creates DIR/nnUNet_raw, DIR/nnUNet_preprocessed, DIR/nnUNet_results)")
    ours = trainers_folder()
    others = [p for p in environ.get(TRAINER_VARIABLE, '').split(os.pathsep) if p and os.path.abspath(p) != ours]
    values[TRAINER_VARIABLE] = os.pathsep.join([ours, *others])
    return values


def shell_exports(values: Mapping[str, str]) -> str:
    """POSIX shell ``export`` lines (bash, zsh), values quoted."""
    return '\n'.join(f'export {k}={shlex.quote(v)}' for k, v in values.items())
