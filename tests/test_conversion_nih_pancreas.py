"""`nnunet-ext convert nih-pancreas` on TCIA-shaped fixtures: DICOM series in PANCREAS_NNNN/<study>/<series>/
and label NIfTI files stored in another axis order (z flipped, as the dataset's labels are), which must be
re-oriented by geometry; a label that does not cover the CT is refused."""
from __future__ import annotations

import os
import re

import numpy as np
import pytest
import SimpleITK as sitk

from cli_helpers import assert_refused, run, verify_raw_dataset
from dicom_helpers import write_dicom_series

SHAPE = (5, 14, 18)  # z, y, x


def _case(root, number, label_orientation='LPI', label_shift=0.0, label_value=1):
    rng = np.random.default_rng(number)
    ct = rng.normal(0, 80, SHAPE).astype(np.int16)
    pancreas = np.zeros(SHAPE, np.uint8)
    pancreas[1:4, 4:9, 5:12] = label_value
    pancreas[3, 4:6, 5:7] = 0  # asymmetric along z, so a wrong flip is visible
    series = os.path.join(root, 'Pancreas-CT', f'PANCREAS_{number:04d}', '11-24-2015-PANCREAS-18957', 'Pancreas-99667')
    volume = write_dicom_series(series, ct, names=[f'1-{k + 1:03d}.dcm' for k in range(SHAPE[0])], shuffle_names=True,
                                seed=number, series_uid=f'1.2.840.{number}')
    label = sitk.GetImageFromArray(pancreas)
    label.CopyInformation(volume)
    if label_shift:
        label.SetOrigin(tuple(np.add(label.GetOrigin(), (0, 0, label_shift))))
    stored = sitk.DICOMOrient(label, label_orientation)
    labels = os.path.join(root, 'TCIA_pancreas_labels-02-05-2017')
    os.makedirs(labels, exist_ok=True)
    sitk.WriteImage(stored, os.path.join(labels, f'label{number:04d}.nii.gz'))
    return ct, pancreas, stored


def test_labels_in_another_axis_order_are_reoriented_by_geometry(tmp_path, env):
    src = str(tmp_path / 'src')
    flipped = _case(src, 1, 'LPI')
    aligned = _case(src, 2, 'LPS')
    # the stored label arrays really differ from the CT's voxel order (the mismatch being fixed)
    assert not np.array_equal(sitk.GetArrayFromImage(flipped[2]), flipped[1])
    out = run(['nnunet-ext', 'convert', 'nih-pancreas', src, '--id', '711'], env).stdout
    assert 'pancreas_0001: label re-oriented LPI -> LPS' in out and 'pancreas_0002' not in out.split('re-oriented')[-1]
    target = os.path.join(env['nnUNet_raw'], 'Dataset711_PancreasCT')
    verify_raw_dataset(target)
    for number, (ct, pancreas, _) in ((1, flipped), (2, aligned)):
        np.testing.assert_array_equal(
            sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(target, 'imagesTr',
                                                               f'pancreas_{number:04d}_0000.nii.gz'))), ct)
        np.testing.assert_array_equal(
            sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(target, 'labelsTr', f'pancreas_{number:04d}.nii.gz'))),
            pancreas)


@pytest.mark.parametrize('kwargs, message', [
    (dict(label_shift=7.5), r"pancreas_0003: image and label \(re-oriented LPI -> LPS\) origin differ: .* "
                            r"refusing to guess"),
    (dict(label_value=2), r'pancreas_0003: unexpected label values \[2\]'),
])
def test_a_label_off_the_ct_grid_or_with_wrong_values_is_refused(tmp_path, env, kwargs, message):
    src = str(tmp_path / 'src')
    _case(src, 3, **kwargs)
    result = run(['nnunet-ext', 'convert', 'nih-pancreas', src, '--id', '712'], env, check=False)
    assert_refused(result, message, env['nnUNet_raw'])


def test_a_patient_without_label_is_refused(tmp_path, env):
    src = str(tmp_path / 'src')
    _case(src, 4)
    _case(src, 5)
    os.remove(os.path.join(src, 'TCIA_pancreas_labels-02-05-2017', 'label0005.nii.gz'))
    result = run(['nnunet-ext', 'convert', 'nih-pancreas', src, '--id', '713'], env, check=False)
    assert_refused(result, re.escape('no labelNNNN.nii.gz for patient(s) [5]'), env['nnUNet_raw'])
