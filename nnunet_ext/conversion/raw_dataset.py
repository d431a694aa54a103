"""Writing an nnU-Net raw dataset all-or-nothing.

:class:`RawDatasetWriter` is a context manager: cases are written into a hidden temporary folder next
to the target (``nnUNet_raw/.DatasetNNN_NAME.partial-XXXX``), ``dataset.json`` is written with
nnU-Net's own ``generate_dataset_json``, and the folder is moved into place (``os.replace``) only when
the ``with`` block finished without error; on any error -- a signal included: ``nnunet-ext`` turns SIGTERM
and SIGINT into a ``KeyboardInterrupt`` -- the temporary folder is removed, so no half-written dataset is
ever left behind. A dataset id already used in ``nnUNet_raw`` is refused unless ``overwrite=True`` (the old
folder is then replaced at the very end, after success).

Stale partial folders. A process killed without a chance to clean up (SIGKILL, the out-of-memory killer,
power loss) leaves its temporary folder. Its name carries its owner, ``.DatasetNNN_NAME.partial-PID@HOST-XXXX``,
and the next writer of dataset id NNN (:func:`remove_stale_partials`) removes every such folder whose owner
no longer runs: same host, and the process PID is gone, a zombie, or started after the folder's last
change (the PID was reused after a reboot). A partial folder whose owner runs -- another conversion of the
same id -- or may run (another host: a shared ``nnUNet_raw``, where a PID means nothing here) is not
touched, and the new conversion is refused (the two would clash when moving into place).

All-background datasets. :meth:`RawDatasetWriter.finish` refuses a dataset whose training labels hold no
foreground voxel at all (nothing for nnU-Net to learn; usually a wrong ``--threshold``, ``--mask-values``,
``--structures`` or crop label) unless ``allow_empty_labels`` (``--allow-empty-labels``).
"""
from __future__ import annotations

import contextlib
import contextvars
import glob
import json
import os
import re
import shutil
import socket
import sys
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np

from nnunet_ext.errors import UserInputError
from nnunet_ext.parallel import signals_deferred

_NAME = re.compile(r'^[A-Za-z0-9][A-Za-z0-9_\-]*$')


def dataset_folder_name(dataset_id: int, name: str) -> str:
    if not 1 <= dataset_id <= 999:
        raise UserInputError(f"--id must be in 1..999 (nnU-Net's DatasetNNN), got {dataset_id}")
    if not _NAME.match(name):
        raise UserInputError(f"--name {name!r}: use letters, digits, '_' and '-' only")
    return f'Dataset{dataset_id:03d}_{name}'


def case_channel_files(folder: str, file_ending: str, channels: int, expected_by: str) -> Dict[str, List[str]]:
    """``{case: [channel files]}`` of an images folder in nnU-Net naming (``CASE_XXXX<file_ending>``), cases
    sorted; every case must have exactly the channels ``0 .. channels - 1`` (``expected_by`` says who
    expects them, for the error). ``{}`` for a folder without such files."""
    pattern = re.compile(r'^(.+)_(\d{4})' + re.escape(file_ending) + '$')
    found: Dict[str, Dict[int, str]] = {}
    for name in sorted(os.listdir(folder)):
        match = pattern.match(name)
        if match:
            found.setdefault(match.group(1), {})[int(match.group(2))] = os.path.join(folder, name)
    for case, files in found.items():
        if sorted(files) != list(range(channels)):
            raise UserInputError(f"{case}: channels {sorted(files)} in {folder}; {expected_by} expect(s) {channels} "
                                 f"(_0000 .. _{channels - 1:04d})")
    return {case: [files[c] for c in range(channels)] for case, files in found.items()}


def existing_datasets(raw_root: str, dataset_id: int) -> List[str]:
    """The folders ``raw_root/DatasetNNN_*`` of this id, sorted."""
    return sorted(glob.glob(os.path.join(raw_root, f'Dataset{dataset_id:03d}_*')))


# ---------------------------------------------------------------- partial folders and their owners
_OWNER = re.compile(r'\.partial-(?P<pid>\d+)@(?P<host>.+)-[^-]*$')
#: seconds of clock slack when comparing a process's start with a folder's time (/proc gives the boot time
#: in whole seconds)
_CLOCK_SLACK_S = 2.0


def this_host() -> str:
    """The host name as written into partial folder names (characters other than letters, digits, '.' and '-'
    replaced)."""
    return re.sub(r'[^A-Za-z0-9.-]', '_', socket.gethostname()) or 'localhost'


def owned_temporary_folder(prefix: str, parent: str) -> str:
    """A new folder ``parent/<prefix>PID@HOST-XXXXXXXX`` (``tempfile.mkdtemp``) naming this process as its owner."""
    return tempfile.mkdtemp(prefix=f'{prefix}{os.getpid()}@{this_host()}-', dir=parent)


def _process_state(pid: int) -> Optional[Tuple[str, float]]:
    """(state letter, start time in seconds since the epoch) of a process from Linux's /proc; None elsewhere."""
    try:
        with open(f'/proc/{pid}/stat', encoding='ascii', errors='replace') as f:
            fields = f.read().rsplit(')', 1)[1].split()
        with open('/proc/stat', encoding='ascii') as f:
            boot = next(float(line.split()[1]) for line in f if line.startswith('btime '))
        return fields[0], boot + int(fields[19]) / os.sysconf('SC_CLK_TCK')
    except (OSError, IndexError, ValueError, StopIteration):
        return None


def partial_owner_runs(path: str) -> Optional[bool]:
    """Whether the process that owns the partial folder ``path`` (named by :func:`owned_temporary_folder`)
    still runs: True, False, or None where this cannot be told (another host). A folder without an owner in
    its name (``.partial-XXXX``, written by versions that did not record it) is an old crash's: False."""
    match = _OWNER.search(os.path.basename(path))
    if match is None:
        return False
    pid, host = int(match.group('pid')), match.group('host')
    if host != this_host():
        return None
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    state = _process_state(pid)
    if state is None:
        return True
    letter, started = state
    if letter in ('Z', 'X'):  # exited, not yet reaped
        return False
    try:  # the owner started before it made the folder, and the folder's time is at least its making
        return started <= os.stat(path).st_mtime + _CLOCK_SLACK_S
    except FileNotFoundError:  # it finished meanwhile
        return True


def remove_stale_partials(raw_root: str, dataset_id: int, log: Callable[[str], None] = None) -> List[str]:
    """Removes the partial folders of dataset id ``dataset_id`` (``raw_root/.DatasetNNN_*.partial-*``) whose owner
    no longer runs, saying so through ``log`` (default: stderr); returns them. One of a running (or, on another
    host, possibly running) conversion is refused: it would clash with this one when both move into place."""
    if log is None:
        def log(line: str) -> None:
            print(line, file=sys.stderr)
    removed = []
    for path in sorted(glob.glob(os.path.join(glob.escape(raw_root), f'.Dataset{dataset_id:03d}_*.partial-*'))):
        if not os.path.isdir(path):
            continue
        runs = partial_owner_runs(path)
        if runs is False:
            with signals_deferred():
                shutil.rmtree(path, ignore_errors=True)
            if not os.path.exists(path):
                log(f"removed a partial conversion left by an earlier run: {path}")
                removed.append(path)
            continue
        match = _OWNER.search(os.path.basename(path))
        if runs is None:
            raise UserInputError(f"dataset id {dataset_id} may be being written by process {match.group('pid')} on "
                                 f"host {match.group('host')} (its partial folder: {path}); if nothing runs there, "
                                 f"remove that folder, else wait or choose another --id")
        if match.group('pid') != str(os.getpid()):
            raise UserInputError(f"dataset id {dataset_id} is being written by process {match.group('pid')} (its "
                                 f"partial folder: {path}); wait for it or choose another --id")
    return removed


# ---------------------------------------------------------------- all-background datasets
_ALLOW_EMPTY_LABELS: contextvars.ContextVar[bool] = contextvars.ContextVar('allow_empty_labels', default=False)


@contextlib.contextmanager
def empty_labels_allowed(allowed: bool = True) -> Iterator[None]:
    """The default of :class:`RawDatasetWriter`'s ``allow_empty_labels`` inside the block (the command line's
    ``--allow-empty-labels`` for the writers a converter makes)."""
    token = _ALLOW_EMPTY_LABELS.set(allowed)
    try:
        yield
    finally:
        _ALLOW_EMPTY_LABELS.reset(token)


def has_foreground(label_files: Sequence[str], ignore_label: Optional[int] = None) -> bool:
    """Whether any of ``label_files`` has a voxel other than background (0) and the ignore label; reads them
    in order up to the first that has one."""
    import SimpleITK as sitk
    for path in label_files:
        image = sitk.ReadImage(path)  # kept: the view below does not own its memory
        values = sitk.GetArrayViewFromImage(image)
        foreground = values != 0
        if ignore_label is not None:
            foreground &= values != ignore_label
        if foreground.any():
            return True
    return False


@dataclass
class ConversionSummary:
    """What a conversion wrote, printed at the end: cases, label voxel counts, spacings."""
    training_cases: int = 0
    test_cases: int = 0
    label_voxels: Counter = field(default_factory=Counter)
    spacings: List[Sequence[float]] = field(default_factory=list)

    def add(self, split: str, spacing: Sequence[float], label_counts: Optional[Dict[int, int]] = None) -> None:
        if split == 'Tr':
            self.training_cases += 1
        else:
            self.test_cases += 1
        self.spacings.append(tuple(float(s) for s in spacing))
        if label_counts:
            self.label_voxels.update({int(k): int(v) for k, v in label_counts.items()})

    def format(self, labels: Dict[str, int]) -> str:
        names = {v: k for k, v in labels.items() if isinstance(v, int)}
        lines = [f"cases: {self.training_cases} training, {self.test_cases} test"]
        for value in sorted(self.label_voxels):
            lines.append(f"label {value} ({names.get(value, '?')}): {self.label_voxels[value]} voxels")
        if self.spacings:
            s = np.array(self.spacings)
            lines.append("spacing (x, y[, z]) min " + " x ".join(f"{v:.3g}" for v in s.min(0)) +
                         ", median " + " x ".join(f"{v:.3g}" for v in np.median(s, 0)) +
                         ", max " + " x ".join(f"{v:.3g}" for v in s.max(0)))
        return "\n".join(lines)


class RawDatasetWriter:
    """All-or-nothing writer of ``nnUNet_raw/DatasetNNN_NAME`` (see the module docstring).

    Inside the ``with`` block use :meth:`image_path` / :meth:`label_path` to get the file names to write
    (workers may write them in parallel), :meth:`claim_case` to reserve a case id (duplicates are an
    error) and :meth:`finish` to write ``dataset.json``. ``finish`` must be called for the dataset to
    be moved into place. Entering the block removes the stale partial folders of the dataset id
    (:func:`remove_stale_partials`). ``allow_empty_labels``: write a dataset whose training labels are all
    background (default: refused by ``finish``; None: the :func:`empty_labels_allowed` setting).
    """

    def __init__(self, raw_root: str, dataset_id: int, name: str, overwrite: bool = False,
                 file_ending: str = '.nii.gz', allow_empty_labels: Optional[bool] = None):
        if not raw_root:
            raise UserInputError("nnUNet_raw is not set: eval \"$(nnunet-ext env --root DIR)\" first")
        self.raw_root = os.path.abspath(raw_root)
        self.folder_name = dataset_folder_name(dataset_id, name)
        self.target = os.path.join(self.raw_root, self.folder_name)
        self.dataset_id = dataset_id
        self.overwrite = overwrite
        self.file_ending = file_ending
        self.allow_empty_labels = _ALLOW_EMPTY_LABELS.get() if allow_empty_labels is None else allow_empty_labels
        self.existing = existing_datasets(self.raw_root, dataset_id)
        if self.existing and not overwrite:
            raise UserInputError(f"dataset id {dataset_id} is already taken in nnUNet_raw: "
                                 f"{', '.join(map(os.path.basename, self.existing))} (choose another --id or "
                                 f"pass --overwrite to replace it)")
        self.tmp: Optional[str] = None
        self._cases: Dict[str, str] = {}
        self._finished = False

    def __enter__(self) -> 'RawDatasetWriter':
        os.makedirs(self.raw_root, exist_ok=True)
        remove_stale_partials(self.raw_root, self.dataset_id)
        try:
            with signals_deferred():  # the folder and its name in self.tmp, for __exit__ to remove
                self.tmp = owned_temporary_folder(f'.{self.folder_name}.partial-', self.raw_root)
            for sub in ('imagesTr', 'labelsTr', 'imagesTs', 'labelsTs'):
                os.makedirs(os.path.join(self.tmp, sub))
        except BaseException:
            self._remove_tmp()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                if not self._finished:
                    raise RuntimeError("RawDatasetWriter: finish() was not called; nothing was written")
                with signals_deferred():  # the old dataset removed and the new one in place, or neither
                    self._move_into_place()
        finally:
            self._remove_tmp()

    def _remove_tmp(self) -> None:
        with signals_deferred():  # a signal now (SIGTERM after Ctrl-C) must not leave half of it
            if self.tmp is not None and os.path.isdir(self.tmp):
                shutil.rmtree(self.tmp)
            self.tmp = None

    # --- paths
    def claim_case(self, case_id: str, source: str) -> None:
        """Reserves ``case_id``; a second claim (two sources mapping to one id) is an error naming both."""
        if not _NAME.match(case_id):
            raise UserInputError(f"case id {case_id!r} (from {source}) has characters nnU-Net cannot use")
        if case_id in self._cases:
            raise UserInputError(f"duplicate case id {case_id!r}: {self._cases[case_id]} and {source}")
        self._cases[case_id] = source

    def image_path(self, case_id: str, channel: int = 0, split: str = 'Tr') -> str:
        return os.path.join(self._tmp(), f'images{split}', f'{case_id}_{channel:04d}{self.file_ending}')

    def label_path(self, case_id: str, split: str = 'Tr') -> str:
        """``labelsTr`` (training) or ``labelsTs`` (reference labels of test cases, for evaluation)."""
        return os.path.join(self._tmp(), f'labels{split}', f'{case_id}{self.file_ending}')

    def _tmp(self) -> str:
        if self.tmp is None:
            raise RuntimeError("RawDatasetWriter must be used as a context manager")
        return self.tmp

    # --- the end
    def finish(self, channel_names: Dict[int, str], labels: Dict[str, object], **dataset_json_kwargs) -> str:
        """Writes ``dataset.json`` with nnU-Net's ``generate_dataset_json`` (training cases counted from
        ``labelsTr``; ``converted_by`` names this package unless given). Returns the final dataset folder."""
        from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
        from nnunet_ext import __version__
        dataset_json_kwargs.setdefault('converted_by', f'nnunet-ext {__version__} (nnunet-ext convert)')
        tmp = self._tmp()
        training_labels = sorted(os.path.join(tmp, 'labelsTr', f) for f in os.listdir(os.path.join(tmp, 'labelsTr'))
                                 if f.endswith(self.file_ending))
        num_training = len(training_labels)
        if num_training == 0:
            raise UserInputError("no training case was converted (no image/label pair found)")
        ignore = labels.get('ignore')
        if not self.allow_empty_labels and not has_foreground(training_labels, ignore if isinstance(ignore, int)
                                                              else None):
            raise UserInputError(f"the labels of all {num_training} training case(s) are background only (no voxel of "
                                 f"any label > 0): nnU-Net would learn nothing; check the source's labels and the "
                                 f"options that make them (e.g. --threshold, --mask-values, --structures, the crop "
                                 f"label), or pass --allow-empty-labels to write it anyway")
        citation = dataset_json_kwargs.pop('citation', None)
        generate_dataset_json(tmp, channel_names, labels, num_training, self.file_ending,
                              dataset_name=self.folder_name, **dataset_json_kwargs)
        if citation is not None:  # nnU-Net 2.8.1's generate_dataset_json writes `release` as the citation
            path = os.path.join(tmp, 'dataset.json')
            with open(path, encoding='utf-8') as f:
                content = json.load(f)
            content['citation'] = citation
            with open(path, 'w', encoding='utf-8') as f:
                json.dump(content, f, indent=4)
        self._finished = True
        return self.target

    def _move_into_place(self) -> None:
        tmp = self._tmp()
        for sub in ('imagesTs', 'labelsTs'):
            if not os.listdir(os.path.join(tmp, sub)):
                os.rmdir(os.path.join(tmp, sub))
        for old in self.existing:  # --overwrite: only now, after everything succeeded
            shutil.rmtree(old)
        os.replace(tmp, self.target)
        self.tmp = None
