"""`nnunet-ext convert ircadb` on 3D-IRCADb-01-shaped fixtures: DICOM series written with SimpleITK in
patient folders (one zipped, one not), file names in an order different from the slice positions."""
from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import SimpleITK as sitk

from cli_helpers import assert_refused, run, verify_raw_dataset
from dicom_helpers import write_dicom_series

SHAPE = (6, 16, 20)  # z, y, x


def _arrays(seed):
    rng = np.random.default_rng(seed)
    liver = np.zeros(SHAPE, np.uint8)
    liver[1:5, 3:13, 4:16] = 1
    tumour1 = np.zeros(SHAPE, np.uint8)
    tumour1[2:4, 5:8, 6:9] = 1
    tumour2 = np.zeros(SHAPE, np.uint8)
    tumour2[3:5, 9:12, 11:14] = 1
    ct = (rng.normal(-300, 100, SHAPE) + 400.0 * liver + 200.0 * tumour1).astype(np.int16)
    return ct, {'liver': liver, 'livertumor01': tumour1, 'livertumor02': tumour2, 'portalvein': tumour2[::-1].copy()}


def _patient(root, number, zipped):
    folder = os.path.join(root, '3Dircadb1', f'3Dircadb1.{number}')
    ct, masks = _arrays(number)
    write_dicom_series(os.path.join(folder, 'PATIENT_DICOM'), ct, shuffle_names=True, seed=number)
    for name, mask in masks.items():
        write_dicom_series(os.path.join(folder, 'MASKS_DICOM', name), mask * 255, shuffle_names=True, seed=number,
                           series_uid=f'1.2.3.{number}.{len(name)}')
    if zipped:
        for sub in ('PATIENT_DICOM', 'MASKS_DICOM'):
            shutil.make_archive(os.path.join(folder, sub), 'zip', folder, sub)
            shutil.rmtree(os.path.join(folder, sub))
    return ct, masks


def _expected(masks, structures):
    label = np.zeros(SHAPE, np.uint8)
    for names, value in structures:
        for name in names:
            label[masks[name] > 0] = value
    return label


def test_patients_zipped_or_not_give_liver_and_merged_tumours_in_position_order(tmp_path, env):
    src = str(tmp_path / 'src')
    data = {1: _patient(src, 1, zipped=True), 2: _patient(src, 2, zipped=False)}
    out = run(['nnunet-ext', 'convert', 'ircadb', src, '--id', '701'], env).stdout
    target = os.path.join(env['nnUNet_raw'], 'Dataset701_IRCADb')
    verify_raw_dataset(target)
    assert 'cases: 2 training, 0 test' in out
    for number, (ct, masks) in data.items():
        image = sitk.ReadImage(os.path.join(target, 'imagesTr', f'ircadb_{number:02d}_0000.nii.gz'))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(image), ct)  # slices in position order
        np.testing.assert_allclose(image.GetSpacing(), (0.7, 0.8, 2.5), atol=1e-4)
        np.testing.assert_allclose(image.GetOrigin(), (-120.0, 30.0, 55.0), atol=1e-4)
        label = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(target, 'labelsTr', f'ircadb_{number:02d}.nii.gz')))
        np.testing.assert_array_equal(label, _expected(masks, [(['liver'], 1), (['livertumor01', 'livertumor02'], 2)]))


def test_structures_option_chooses_other_masks(tmp_path, env):
    src = str(tmp_path / 'src')
    _, masks = _patient(src, 3, zipped=False)
    run(['nnunet-ext', 'convert', 'ircadb', src, '--id', '702', '--structures', 'liver=1', 'portalvein=3'], env)
    label = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(env['nnUNet_raw'], 'Dataset702_IRCADb', 'labelsTr',
                                                                'ircadb_03.nii.gz')))
    np.testing.assert_array_equal(label, _expected(masks, [(['liver'], 1), (['portalvein'], 3)]))


def _drop_liver(folder):
    shutil.rmtree(os.path.join(folder, 'MASKS_DICOM', 'liver'))


def _shift_mask(folder):
    ct, masks = _arrays(4)
    shutil.rmtree(os.path.join(folder, 'MASKS_DICOM', 'livertumor01'))
    write_dicom_series(os.path.join(folder, 'MASKS_DICOM', 'livertumor01'), masks['livertumor01'] * 255,
                       origin=(-120.0, 30.0, 60.0), series_uid='1.2.3.9')


def _empty_series(folder):
    shutil.rmtree(os.path.join(folder, 'PATIENT_DICOM'))
    os.makedirs(os.path.join(folder, 'PATIENT_DICOM'))


def _not_dicom(folder):
    for name in os.listdir(os.path.join(folder, 'PATIENT_DICOM')):
        with open(os.path.join(folder, 'PATIENT_DICOM', name), 'wb') as f:
            f.write(b'not dicom')


@pytest.mark.parametrize('breakage, message', [
    (_drop_liver, r"ircadb_04: no mask 'liver' in .* \(available: livertumor01, livertumor02, portalvein\)"),
    (_shift_mask, r"ircadb_04: image and mask 'livertumor01' origin differ"),
    (_empty_series, r'ircadb_04: empty DICOM series folder .*PATIENT_DICOM'),
    (_not_dicom, r'ircadb_04: no readable DICOM series in .*PATIENT_DICOM'),
])
def test_bad_patients_are_refused_naming_the_case_and_leave_nothing(tmp_path, env, breakage, message):
    src = str(tmp_path / 'src')
    _patient(src, 4, zipped=False)
    breakage(os.path.join(src, '3Dircadb1', '3Dircadb1.4'))
    result = run(['nnunet-ext', 'convert', 'ircadb', src, '--id', '703'], env, check=False)
    assert_refused(result, message, env['nnUNet_raw'])


def test_reading_a_dicom_series_keeps_the_process_locale(tmp_path):
    """GDCM resets the locale to "C" (Python's default text encoding would become ASCII)."""
    import locale
    from nnunet_ext.conversion.dicom import read_series
    ct, _ = _arrays(5)
    write_dicom_series(str(tmp_path / 'series'), ct)
    before = locale.setlocale(locale.LC_ALL)
    image = read_series('case', str(tmp_path / 'series'))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), ct)
    assert locale.setlocale(locale.LC_ALL) == before
