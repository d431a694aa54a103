"""Adapters around nnU-Net: its file listing runs in this process (no fork from a threaded process)."""
from __future__ import annotations

import os

import pytest


def _touch(folder, names):
    os.makedirs(folder, exist_ok=True)
    for name in names:
        open(os.path.join(folder, name), 'w').close()


def test_file_listing_in_process_lists_what_nnunets_pool_lists_without_starting_a_process(tmp_path, monkeypatch):
    import multiprocessing
    from nnunetv2.utilities import utils
    from nnunet_ext.nnunet_glue import file_listing_in_process

    folder = str(tmp_path)
    _touch(folder, ['a_0000.nii.gz', 'a_0001.nii.gz', 'b_0000.nii.gz', 'ab_0000.nii.gz', 'b_0000.nii.gz.bak',
                    'c_0000.nii.gz'])
    expected = utils.create_lists_from_splitted_dataset_folder(folder, '.nii.gz', num_processes=2)  # nnU-Net's pool
    assert [len(x) for x in expected] == [2, 1, 1, 1]  # a, ab, b, c (sorted identifiers)

    def no_process(*args, **kwargs):
        raise AssertionError('a process was started')

    monkeypatch.setattr(multiprocessing.Process, 'start', no_process)
    monkeypatch.setattr(os, 'fork', no_process)
    with file_listing_in_process():
        listed = utils.create_lists_from_splitted_dataset_folder(folder, '.nii.gz')
    assert listed == expected
    assert utils.Pool is multiprocessing.Pool  # put back after the block


def test_file_listing_in_process_puts_the_pool_back_after_an_error():
    import multiprocessing
    from nnunetv2.utilities import utils
    from nnunet_ext.nnunet_glue import file_listing_in_process

    with pytest.raises(RuntimeError), file_listing_in_process():
        raise RuntimeError('boom')
    assert utils.Pool is multiprocessing.Pool
