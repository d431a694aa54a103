"""Small adapters around nnU-Net's own lookups that turn its failures into clear user errors."""
from __future__ import annotations

import contextlib
import os
from typing import Iterator

from nnunet_ext.errors import UserInputError


def require_paths(*variables: str) -> None:
    missing = [v for v in variables if not os.environ.get(v)]
    if missing:
        raise UserInputError(f"{', '.join(missing)} not set; run: eval \"$(nnunet-ext env --root DIR)\"")


def dataset_name(dataset_id: int | str) -> str:
    """nnU-Net's ``DatasetNNN_NAME`` for an id or name, as a ``UserInputError`` if it does not exist."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name
    require_paths('nnUNet_raw', 'nnUNet_preprocessed', 'nnUNet_results')
    try:
        return maybe_convert_to_dataset_name(dataset_id)
    except RuntimeError as e:  # nnU-Net: "Could not find a dataset with the ID ..."
        raise UserInputError(str(e)) from None
    except ValueError:  # nnU-Net: neither an integer nor a name starting with 'Dataset'
        raise UserInputError(f"{dataset_id!r} is neither a dataset id (an integer such as 501) nor a dataset name "
                             f"(Dataset501_NAME)") from None


class _InProcessPool:
    """What ``create_lists_from_splitted_dataset_folder`` uses of ``multiprocessing.Pool``, run in this process."""

    def __init__(self, processes=None, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        return False

    @staticmethod
    def starmap(function, iterable, chunksize=None):
        return [function(*arguments) for arguments in iterable]


@contextlib.contextmanager
def file_listing_in_process() -> Iterator[None]:
    """nnU-Net 2.8.1 lists a dataset's image files (``utilities.utils.create_lists_from_splitted_dataset_folder``,
    called by fingerprinting, preprocessing and prediction from a folder) with ``multiprocessing.Pool(12)``
    in the default *fork* context, from a process that already runs threads (tqdm's monitor, the handler
    threads of its spawn pools). A forked child that inherits a lock another thread held at the fork (a
    stream's buffer lock, tqdm's) waits forever, and so does the pool: ``nnunet-ext plan`` hung for 900 s
    in CI, twice. The work is a regular expression over a list of file names: run in this process while
    the block runs (the module's ``Pool`` name, which that function looks up when called, is swapped)."""
    from nnunetv2.utilities import utils
    previous = utils.Pool
    utils.Pool = _InProcessPool
    try:
        yield
    finally:
        utils.Pool = previous
