"""`nnunet-ext convert folder2d` on small collections in the public layouts (Kvasir-SEG JPEGs, ISIC PNG
masks with a suffix, DRIVE TIF images + GIF masks, multi-class grey-value masks), checked against the
fixtures' own arrays; nnU-Net's verify_dataset_integrity on the result; bad input refused."""
from __future__ import annotations

import inspect
import json
import os

import numpy as np
import pytest
from PIL import Image

from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json

from cli_helpers import assert_refused, run, verify_raw_dataset
from nnunet_ext.conversion.folder2d import PRESETS

SIZE = (40, 52)  # rows, columns


def _rgb(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:SIZE[0], :SIZE[1]]
    base = np.stack([rows * 4, cols * 3, (rows + cols) * 2], -1) + rng.integers(0, 40, (*SIZE, 3))
    return np.clip(base, 0, 255).astype(np.uint8)


def _binary(seed: int) -> np.ndarray:
    mask = np.zeros(SIZE, np.uint8)
    r, c = 8 + seed % 5, 10 + seed % 7
    mask[r:r + 16, c:c + 20] = 1
    return mask


def assert_preset_card(dataset: dict, label: str, citation: str, licence: str):
    """A preset names its label and fills reference, citation and licence; nnU-Net's fields stay."""
    assert dataset['labels'] == {'background': 0, label: 1}
    assert citation in dataset['citation'] and licence in dataset['licence'] and dataset['reference'].startswith('https://')
    assert dataset['converted_by'].startswith('nnunet-ext ') and dataset['numTraining'] >= 1
    assert {'channel_names', 'labels', 'numTraining', 'file_ending', 'name', 'description'} <= set(dataset)


def test_every_preset_has_its_label_name():
    assert {name: p.card.label for name, p in PRESETS.items()} == {'kvasir': 'polyp', 'isic': 'lesion',
                                                                   'drive': 'vessel', 'cvc': 'polyp'}
    assert all(p.card.citation and p.card.licence and p.card.reference.startswith('https://')
               for p in PRESETS.values())


def _png(path):
    return np.asarray(Image.open(path))


def test_kvasir_jpegs_keep_rgb_binarise_noisy_masks_and_split_test_cases(tmp_path, env):
    src = tmp_path / 'Kvasir-SEG'
    (src / 'images').mkdir(parents=True)
    (src / 'masks').mkdir()
    stems = [f'cju{i}x' for i in range(4)]
    for i, stem in enumerate(stems):
        Image.fromarray(_rgb(i)).save(src / 'images' / f'{stem}.jpg', quality=95)
        Image.fromarray(_binary(i) * 255).save(src / 'masks' / f'{stem}.jpg', quality=75)  # noisy mask
    (tmp_path / 'test.txt').write_text(f'{stems[3]}\n')
    out = run(['nnunet-ext', 'convert', 'folder2d', str(src), '--preset', 'kvasir', '--id', '601',
               '--split', str(tmp_path / 'test.txt')], env).stdout
    target = os.path.join(env['nnUNet_raw'], 'Dataset601_Images2D')
    assert 'cases: 3 training, 1 test' in out
    verify_raw_dataset(target)
    dataset = json.load(open(os.path.join(target, 'dataset.json')))
    assert dataset['channel_names'] == {'0': 'R', '1': 'G', '2': 'B'} and dataset['file_ending'] == '.png'
    assert_preset_card(dataset, 'polyp', 'Kvasir-SEG', 'simula.no')
    for i, stem in enumerate(stems):
        split = 'Ts' if i == 3 else 'Tr'
        image = _png(os.path.join(target, f'images{split}', f'{stem}_0000.png'))
        np.testing.assert_array_equal(image, np.asarray(Image.open(src / 'images' / f'{stem}.jpg')))
        label = _png(os.path.join(target, f'labels{split}', f'{stem}.png'))
        np.testing.assert_array_equal(label, _binary(i))  # JPEG noise removed by the threshold


def test_isic_suffix_and_grey_conversion(tmp_path, env):
    src = tmp_path / 'ISIC'
    (src / 'ISIC2018_Task1-2_Training_Input').mkdir(parents=True)
    (src / 'ISIC2018_Task1_Training_GroundTruth').mkdir()
    for i in range(2):
        Image.fromarray(_rgb(i)).save(src / 'ISIC2018_Task1-2_Training_Input' / f'ISIC_000000{i}.jpg', quality=95)
        Image.fromarray(_binary(i) * 255).save(src / 'ISIC2018_Task1_Training_GroundTruth' /
                                               f'ISIC_000000{i}_segmentation.png')
    run(['nnunet-ext', 'convert', 'folder2d', str(src), '--preset', 'isic', '--id', '602', '--grey', '-np', '1'], env)
    target = os.path.join(env['nnUNet_raw'], 'Dataset602_Images2D')
    verify_raw_dataset(target)
    assert_preset_card(json.load(open(os.path.join(target, 'dataset.json'))), 'lesion', 'ISIC', 'CC BY-NC 4.0')
    for i in range(2):
        rgb = np.asarray(Image.open(src / 'ISIC2018_Task1-2_Training_Input' / f'ISIC_000000{i}.jpg')).astype(float)
        luma = rgb @ np.array([299, 587, 114]) / 1000  # ITU-R 601-2, PIL's "L"
        grey = _png(os.path.join(target, 'imagesTr', f'ISIC_000000{i}_0000.png'))
        assert grey.ndim == 2 and np.abs(grey - luma).max() <= 1
        np.testing.assert_array_equal(_png(os.path.join(target, 'labelsTr', f'ISIC_000000{i}.png')), _binary(i))


def test_drive_tif_images_gif_masks_with_suffixes_and_resize(tmp_path, env):
    src = tmp_path / 'DRIVE'
    (src / 'training' / 'images').mkdir(parents=True)
    (src / 'training' / '1st_manual').mkdir()
    for n in (21, 22):
        Image.fromarray(_rgb(n)).save(src / 'training' / 'images' / f'{n}_training.tif')
        Image.fromarray(_binary(n) * 255).convert('P').save(src / 'training' / '1st_manual' / f'{n}_manual1.gif')
    run(['nnunet-ext', 'convert', 'folder2d', str(src), '--preset', 'drive', '--id', '603', '--resize', '20', '26'],
        env)
    target = os.path.join(env['nnUNet_raw'], 'Dataset603_Images2D')
    verify_raw_dataset(target)
    assert_preset_card(json.load(open(os.path.join(target, 'dataset.json'))), 'vessel', 'Staal', 'research')
    for n in (21, 22):
        assert _png(os.path.join(target, 'imagesTr', f'{n}_0000.png')).shape == (20, 26, 3)
        # nearest-neighbour down-sampling by 2 of the mask: PIL samples the pixel at 2i + 1 of each axis
        np.testing.assert_array_equal(_png(os.path.join(target, 'labelsTr', f'{n}.png')), _binary(n)[1::2, 1::2])


def test_grey_value_masks_map_to_classes_and_an_unlisted_value_is_refused(tmp_path, env):
    src = tmp_path / 'multi'
    (src / 'images').mkdir(parents=True)
    (src / 'masks').mkdir()
    grey = np.zeros(SIZE, np.uint8)
    grey[5:20, 5:20], grey[25:35, 30:45] = 128, 255
    Image.fromarray(_rgb(0)).save(src / 'images' / 'a.png')
    Image.fromarray(grey).save(src / 'masks' / 'a.png')
    run(['nnunet-ext', 'convert', 'folder2d', str(src), '--id', '604', '--mask-values', '0', '128', '255'], env)
    target = os.path.join(env['nnUNet_raw'], 'Dataset604_Images2D')
    expected = np.select([grey == 128, grey == 255], [1, 2], 0)
    np.testing.assert_array_equal(_png(os.path.join(target, 'labelsTr', 'a.png')), expected)
    dataset = json.load(open(os.path.join(target, 'dataset.json')))
    assert dataset['labels'] == {'background': 0, 'grey_128': 1, 'grey_255': 2}
    # no preset: nothing is known about the collection, so nnU-Net's own licence field stays
    assert dataset['licence'] == inspect.signature(generate_dataset_json).parameters['license'].default
    assert 'reference' not in dataset and dataset['converted_by'].startswith('nnunet-ext ')
    grey[0, 0] = 77
    Image.fromarray(grey).save(src / 'masks' / 'a.png')
    result = run(['nnunet-ext', 'convert', 'folder2d', str(src), '--id', '605', '--mask-values', '0', '128', '255'],
                 env, check=False)
    assert result.returncode == 2 and 'a: mask grey values [77] are not in --mask-values' in result.stderr


def _pairs(src, n=3):
    (src / 'images').mkdir(parents=True)
    (src / 'masks').mkdir()
    for i in range(n):
        Image.fromarray(_rgb(i)).save(src / 'images' / f'case{i}.png')
        Image.fromarray(_binary(i) * 255).save(src / 'masks' / f'case{i}.png')


@pytest.mark.parametrize('breakage, message', [
    (lambda s: os.remove(s / 'masks' / 'case1.png'), r"no mask for image\(s\) \['case1'\]"),
    (lambda s: Image.fromarray(np.zeros((10, 10), np.uint8)).save(s / 'masks' / 'case2.png'),
     r'case2: image \(40, 52\) and mask \(10, 10\) \(rows, columns\) differ in size'),
    (lambda s: (s / 'images' / 'case0.png').write_bytes(b'garbage'), r'case0: cannot read .*case0\.png'),
    (lambda s: Image.fromarray(_rgb(1)[..., 0]).save(s / 'images' / 'case1.png'),
     r'case1: .*case1\.png is a grey image \(L\) in an RGB conversion; pass --grey'),
    (lambda s: Image.fromarray(_rgb(1)).save(s / 'images' / 'case1.jpg'), r"duplicate image for case 'case1'"),
])
def test_bad_collections_are_refused_naming_the_case_and_leave_nothing(tmp_path, env, breakage, message):
    src = tmp_path / 'c'
    _pairs(src)
    breakage(src)
    result = run(['nnunet-ext', 'convert', 'folder2d', str(src), '--id', '606'], env, check=False)
    assert_refused(result, message, env['nnUNet_raw'])
