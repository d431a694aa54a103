"""`nnunet-ext convert folder2d` on small collections in the public layouts (Kvasir-SEG JPEGs, ISIC PNG
masks with a suffix, DRIVE TIF images + GIF masks, multi-class grey-value masks), checked against the
fixtures' own arrays; nnU-Net's verify_dataset_integrity on the result; bad input refused. Issue 27: 16-bit
and float images keep their values (read back with the reader nnU-Net picks), the mask encoding is read from
all masks (0/1, 0/255, one grey level per label, colours with --mask-colours), ambiguous or all-background
masks are refused."""
from __future__ import annotations

import inspect
import json
import os
import re

import numpy as np
import pytest
from PIL import Image

import SimpleITK as sitk
from nnunetv2.dataset_conversion.generate_dataset_json import generate_dataset_json
from nnunetv2.imageio.natural_image_reader_writer import NaturalImage2DIO
from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

from cli_helpers import assert_refused, run, verify_raw_dataset
from nnunet_ext.conversion.folder2d import PRESETS, Layout, MaskRule, convert_folder2d
from nnunet_ext.errors import UserInputError

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


@pytest.mark.parametrize('breakage, options, message', [
    (lambda s: os.remove(s / 'masks' / 'case1.png'), [], r"no mask for image\(s\) \['case1'\]"),
    (lambda s: Image.fromarray(np.zeros((10, 10), np.uint8)).save(s / 'masks' / 'case2.png'), [],
     r'case2: image \(40, 52\) and mask \(10, 10\) \(rows, columns\) differ in size'),
    (lambda s: (s / 'images' / 'case0.png').write_bytes(b'garbage'), [], r'case0: cannot read .*case0\.png'),
    (lambda s: Image.fromarray(_rgb(1)[..., 0]).save(s / 'images' / 'case1.png'), [],
     r'case1: .*case1\.png is a grey image \(L\) in an RGB conversion; pass --grey'),
    # 16-bit grey without --grey: sent to --grey, which keeps the 16 bits (no longer a lossy path)
    (lambda s: Image.fromarray(_rgb(1)[..., 0].astype(np.uint16) * 257).save(s / 'images' / 'case1.png'), [],
     r'case1: .*case1\.png is a grey image \(I;16, 16-bit\) in an RGB conversion; pass --grey to convert every '
     r'image to one grey channel \(--grey keeps 16-bit and float values\)'),
    (lambda s: sitk.WriteImage(sitk.GetImageFromArray(_rgb(1).astype(np.uint16) * 257, isVector=True),
                               str(s / 'images' / 'case1.png')), [],
     r'case1: .*case1\.png is a 16-bit colour PNG, which Pillow reads as 8 bit'),
    # --grey on 8-bit RGB next to a 16-bit grey image: two bit depths, refused naming one file of each
    (lambda s: Image.fromarray(_rgb(2)[..., 0].astype(np.uint16) * 257).save(s / 'images' / 'case2.png'), ['--grey'],
     r'the images have different bit depths: .*case0\.png is RGB \(8-bit\), .*case2\.png is I;16 \(16-bit\); '
     r'.*export every image at one bit depth'),
    (lambda s: Image.fromarray(_rgb(1)).save(s / 'images' / 'case1.jpg'), [], r"duplicate image for case 'case1'"),
    # issue 27's 0/1 masks binarised at 128 (an explicit --threshold; before, the default): refused with the values
    (lambda s: [Image.fromarray(_binary(i)).save(s / 'masks' / f'case{i}.png') for i in range(3)],
     ['--threshold', '128'], r'all 3 training masks are background \(grey values found \[0, 1\]; read as grey >= '
                             r'128 -> label 1\): .*--threshold 1 for 0/1 masks.*--allow-empty-labels'),
])
def test_bad_collections_are_refused_naming_the_case_and_leave_nothing(tmp_path, env, breakage, options, message):
    src = tmp_path / 'c'
    _pairs(src)
    breakage(src)
    result = run(['nnunet-ext', 'convert', 'folder2d', str(src), '--id', '606', *options], env, check=False)
    assert_refused(result, message, env['nnUNet_raw'])
    assert re.search(message, result.stderr.strip().splitlines()[-1]), result.stderr  # one line, the last


# --- bit depths and mask encodings (issue 27), through the Python API where the CLI option is new -----------------

def _write_pairs(src, images, masks, image_ext='png', mask_ext='png'):
    """``images``/``masks``: {stem: numpy array or PIL image} written with Pillow into ``src/images``, ``src/masks``."""
    for folder, pictures, ext in (('images', images, image_ext), ('masks', masks, mask_ext)):
        (src / folder).mkdir(parents=True, exist_ok=True)
        for stem, picture in pictures.items():
            picture = picture if isinstance(picture, Image.Image) else Image.fromarray(picture)
            picture.save(src / folder / f'{stem}.{ext}', **({'quality': 75} if ext == 'jpg' else {}))


def _convert(src, raw, dataset_id, rule=None, **options):
    return convert_folder2d(str(src), str(raw), dataset_id, 'Images2D', Layout('images', 'masks'),
                            rule if rule is not None else MaskRule(), num_processes=1, **options)


def _nnunet_read(target, path, seg=False):
    """The file as nnU-Net reads it: the reader nnU-Net picks for the dataset (NaturalImage2DIO), 2D array."""
    dataset = json.load(open(os.path.join(target, 'dataset.json')))
    reader = determine_reader_writer_from_dataset_json(dataset, path, verbose=False)
    assert reader is NaturalImage2DIO
    array, properties = reader().read_seg(path) if seg else reader().read_images([path])
    assert array.shape[:2] == (1, 1) and properties['spacing'] == (999, 1, 1)
    return array[0, 0]


def _labels(target, case, split='Tr'):
    ending = json.load(open(os.path.join(target, 'dataset.json')))['file_ending']
    return _nnunet_read(target, os.path.join(target, f'labels{split}', f'{case}{ending}'), seg=True)


def _sixteen_bit(seed):
    """32 x 32 = 1024 distinct 16-bit values spread over 0..65535 (most of them above 255)."""
    return (np.random.default_rng(seed).permutation(1024).reshape(32, 32) * 64 + 3).astype(np.uint16)


def test_16bit_png_and_tiff_keep_all_1024_values_with_grey(tmp_path, env):
    src = tmp_path / 'xray'
    png, tif = _sixteen_bit(0), _sixteen_bit(1)
    mask = np.zeros((32, 32), np.uint8)
    mask[4:20, 6:30] = 255
    _write_pairs(src, {'png16': png}, {'png16': mask, 'tif16': mask})
    Image.frombytes('I;16B', (32, 32), tif.astype('>u2').tobytes()).save(src / 'images' / 'tif16.tif')  # big-endian
    assert Image.open(src / 'images' / 'png16.png').mode == 'I;16'
    assert Image.open(src / 'images' / 'tif16.tif').mode == 'I;16B'
    run(['nnunet-ext', 'convert', 'folder2d', str(src), '--id', '611', '--grey'], env)
    target = os.path.join(env['nnUNet_raw'], 'Dataset611_Images2D')
    verify_raw_dataset(target)
    dataset = json.load(open(os.path.join(target, 'dataset.json')))
    assert dataset['file_ending'] == '.png' and dataset['channel_names'] == {'0': 'grey'}
    for case, written in (('png16', png), ('tif16', tif)):
        path = os.path.join(target, 'imagesTr', f'{case}_0000.png')
        assert Image.open(path).mode == 'I;16'  # a 16-bit PNG, --grey did not reduce it
        read = _nnunet_read(target, path)
        np.testing.assert_array_equal(read, written.astype(np.float32))
        assert np.unique(read).size == 1024 and read.max() > 255
        np.testing.assert_array_equal(_labels(target, case), mask // 255)


def test_float_tiff_keeps_its_values_as_tif(tmp_path):
    src, raw = tmp_path / 'float', tmp_path / 'raw'
    raw.mkdir()
    values = np.array([[-1024.5, 0.0, 1e-3, 3.25e6], [np.pi, -np.e, 65535.75, 1e-30]], np.float32)
    image = np.tile(values, (8, 8))  # 16 x 32
    mask = np.zeros(image.shape, np.uint8)
    mask[3:9, 5:20] = 1
    _write_pairs(src, {'f': image}, {'f': mask}, image_ext='tif')
    assert Image.open(src / 'images' / 'f.tif').mode == 'F'
    target, summary, labels = _convert(src, raw, 612, grey=True)
    verify_raw_dataset(target)
    dataset = json.load(open(os.path.join(target, 'dataset.json')))
    assert dataset['file_ending'] == '.tif' and labels == {'background': 0, 'foreground': 1}
    assert sorted(os.listdir(os.path.join(target, 'imagesTr'))) == ['f_0000.tif']
    np.testing.assert_array_equal(_nnunet_read(target, os.path.join(target, 'imagesTr', 'f_0000.tif')), image)
    np.testing.assert_array_equal(_labels(target, 'f'), mask)
    assert summary.label_voxels == {0: 16 * 32 - 6 * 15, 1: 6 * 15}


def test_resize_keeps_16_bit(tmp_path):
    src, raw = tmp_path / 'r', tmp_path / 'raw'
    image = np.full((32, 32), 1000, np.uint16)
    image[:, 16:] = 60000
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 1
    _write_pairs(src, {'a': image}, {'a': mask})
    target, _, _ = _convert(src, raw, 613, grey=True, resize=(16, 16))
    written = Image.open(os.path.join(target, 'imagesTr', 'a_0000.png'))
    pixels = np.asarray(written)
    assert written.mode == 'I;16' and pixels.shape == (16, 16)
    assert (pixels[:, :6] == 1000).all() and (pixels[:, 10:] == 60000).all()  # away from the edge: unchanged
    assert pixels.min() == 1000 and pixels.max() == 60000


def test_8bit_colour_modes_with_grey_become_8bit_grey(tmp_path):
    src, raw = tmp_path / 'modes', tmp_path / 'raw'
    rgb = _rgb(3)
    rgba = np.dstack([rgb, np.full(SIZE, 90, np.uint8)])
    bilevel = _binary(2).astype(bool)
    grey_alpha = Image.merge('LA', [Image.fromarray(rgba[..., 0]), Image.fromarray(rgba[..., 3])])
    images = {'rgba': Image.fromarray(rgba), 'one': Image.fromarray(bilevel), 'la': grey_alpha}
    masks = {stem: _binary(i) * 255 for i, stem in enumerate(images)}
    _write_pairs(src, images, masks)
    assert [Image.open(src / 'images' / f'{s}.png').mode for s in images] == ['RGBA', '1', 'LA']
    target, _, _ = _convert(src, raw, 614, grey=True)
    assert json.load(open(os.path.join(target, 'dataset.json')))['file_ending'] == '.png'
    luma = rgb.astype(float) @ np.array([299, 587, 114]) / 1000  # ITU-R 601-2, alpha ignored
    expected = {'rgba': luma, 'one': bilevel * 255.0, 'la': rgba[..., 0].astype(float)}
    for stem, grey in expected.items():
        written = Image.open(os.path.join(target, 'imagesTr', f'{stem}_0000.png'))
        assert written.mode == 'L'
        assert np.abs(np.asarray(written) - grey).max() <= 1


@pytest.mark.parametrize('foreground', [1, 255, 37])
def test_binary_masks_any_foreground_value_give_label_1(tmp_path, foreground):
    """0/1, 0/255 (and 0/x): label 1 with the exact pixel count; an empty mask does not change the reading."""
    src, raw = tmp_path / 'bin', tmp_path / 'raw'
    masks = {f'case{i}': _binary(i) * foreground for i in range(3)}
    masks['empty'] = np.zeros(SIZE, np.uint8)
    _write_pairs(src, {stem: _rgb(i) for i, stem in enumerate(masks)}, masks)
    target, summary, labels = _convert(src, raw, 615, card=PRESETS['kvasir'].card)
    verify_raw_dataset(target)
    assert labels == {'background': 0, 'polyp': 1}
    for stem, mask in masks.items():
        np.testing.assert_array_equal(_labels(target, stem), (mask > 0).astype(np.float32))
    assert summary.label_voxels[1] == 3 * 16 * 20  # three 16 x 20 rectangles


def test_noisy_jpeg_masks_are_binarised_at_128_without_options(tmp_path):
    src, raw = tmp_path / 'jpeg', tmp_path / 'raw'
    _write_pairs(src, {f'c{i}': _rgb(i) for i in range(2)}, {f'c{i}': _binary(i) * 255 for i in range(2)},
                 mask_ext='jpg')
    assert len(np.unique(np.asarray(Image.open(src / 'masks' / 'c0.jpg')))) > 2  # noisy
    target, _, labels = _convert(src, raw, 616)
    assert labels == {'background': 0, 'foreground': 1}
    for i in range(2):
        np.testing.assert_array_equal(_labels(target, f'c{i}'), _binary(i))


@pytest.mark.parametrize('levels', [(0, 85, 170, 255), (0, 1, 2, 3), (0, 128, 255), (0, 21845, 43690, 65535)])
def test_one_grey_level_per_label_maps_in_sorted_order(tmp_path, levels):
    src, raw = tmp_path / 'levels', tmp_path / 'raw'
    classes = np.zeros(SIZE, np.uint8)
    classes[2:12, 3:30], classes[15:25, 10:40], classes[30:38, :] = 1, 2, len(levels) - 1
    grey = np.array(levels, np.uint16 if max(levels) > 255 else np.uint8)[classes]
    # the top level is in one mask only: decided from all masks, not per file
    top_elsewhere = np.where(classes == len(levels) - 1, 0, grey).astype(grey.dtype)
    _write_pairs(src, {'a': _rgb(0), 'b': _rgb(1)}, {'a': grey, 'b': top_elsewhere})
    target, summary, labels = _convert(src, raw, 617)
    verify_raw_dataset(target)
    assert labels == {'background': 0, **{f'grey_{v}': i for i, v in enumerate(levels) if i}}
    np.testing.assert_array_equal(_labels(target, 'a'), classes)
    np.testing.assert_array_equal(_labels(target, 'b'), np.where(classes == len(levels) - 1, 0, classes))


def test_colour_masks_map_with_mask_colours(tmp_path):
    src, raw = tmp_path / 'colour', tmp_path / 'raw'
    classes = np.zeros(SIZE, np.uint8)
    classes[5:15, 5:25], classes[20:35, 30:50] = 1, 2
    palette = np.array([[0, 0, 0], [255, 0, 0], [0, 255, 0]], np.uint8)
    _write_pairs(src, {'a': _rgb(0)}, {'a': palette[classes]})
    target, _, labels = _convert(src, raw, 618, MaskRule.from_options(colours=['0,0,0', '255,0,0', '0,255,0']))
    assert labels == {'background': 0, 'colour_255_0_0': 1, 'colour_0_255_0': 2}
    np.testing.assert_array_equal(_labels(target, 'a'), classes)


def _mix_binary_encodings(src):
    _write_pairs(src, {'case0': _rgb(0), 'case1': _rgb(1)}, {'case0': _binary(0), 'case1': _binary(1) * 255})


def _colour_masks(src):
    red = np.zeros((*SIZE, 3), np.uint8)
    red[_binary(0) == 1] = (255, 0, 0)
    _write_pairs(src, {'case0': _rgb(0)}, {'case0': red})


def _all_background(src):
    _write_pairs(src, {f'case{i}': _rgb(i) for i in range(3)}, {f'case{i}': np.zeros(SIZE, np.uint8) for i in range(3)})


def _float_with_nan(src):
    image = np.ones((16, 16), np.float32)
    image[3, 4] = np.nan
    _write_pairs(src, {'case0': image}, {'case0': np.eye(16, dtype=np.uint8)}, image_ext='tif')


@pytest.mark.parametrize('make, options, message', [
    (_mix_binary_encodings, {}, r'mask grey values \[0, 1, 255\] are no encoding .*case0\.png holds \[0, 1\], '
                                r'.*case1\.png holds \[0, 255\]; pass --mask-values .*'
                                r'\(e\.g\. --mask-values 0 1 255\)'),
    (_colour_masks, {}, r'1 of 1 masks are colour images .*colours found, most frequent first: \(0, 0, 0\), '
                        r'\(255, 0, 0\); pass --mask-colours .*--mask-colours 0,0,0 255,0,0\)'),
    (lambda s: _write_pairs(s, {'case0': _rgb(0)}, {'case0': _binary(0) + 1}), {},
     r'no mask has the grey value 0 \(background\): values found in the 1 masks \[1, 2\]; pass --mask-values'),
    (lambda s: _write_pairs(s, {'case0': _rgb(0)}, {'case0': _rgb(1)[..., 0]}), {},
     r'the masks hold \d+ or more distinct grey values .*pass --mask-values'),
    (lambda s: (_write_pairs(s, {'case0': _rgb(0), 'case1': _rgb(1)}, {'case0': _binary(0) * 255}),
                _write_pairs(s, {}, {'case1': _binary(1) * 255}, mask_ext='jpg')), {},
     r'the masks mix lossy JPEG \(.*case1\.jpg\) and lossless \(.*case0\.png\) files'),
    (lambda s: _write_pairs(s, {'case0': _rgb(0)}, {'case0': np.select([_binary(0) == 1], [85], 170).astype(np.uint8)},
                            mask_ext='jpg'), {}, r'lossy JPEG files with \d+% of their pixels between grey 64 and 191'),
    (_all_background, {}, r'all 3 training masks are background \(grey values found \[0\]; read as masks hold grey '
                          r'0 only \(background\)\): nnU-Net would learn nothing; .*--allow-empty-labels'),
    (_float_with_nan, {'grey': True}, r'case0: .*case0\.tif has 1 pixels that are NaN or infinite'),
])
def test_unreadable_masks_and_images_are_refused_naming_the_values_and_leave_nothing(tmp_path, make, options,
                                                                                       message):
    src, raw = tmp_path / 'bad', tmp_path / 'raw'
    raw.mkdir()
    make(src)
    with pytest.raises(UserInputError, match=message) as refused:
        _convert(src, raw, 619, **options)
    assert '\n' not in str(refused.value)
    assert os.listdir(raw) == []  # nothing half-written in nnUNet_raw


def test_all_background_masks_are_accepted_with_allow_empty_labels(tmp_path):
    src, raw = tmp_path / 'empty', tmp_path / 'raw'
    _all_background(src)
    target, summary, labels = _convert(src, raw, 620, allow_empty_labels=True)
    verify_raw_dataset(target)
    assert labels == {'background': 0, 'foreground': 1} and summary.label_voxels == {0: 3 * SIZE[0] * SIZE[1]}
    np.testing.assert_array_equal(_labels(target, 'case1'), np.zeros(SIZE))


def test_mask_options_exclude_each_other():
    with pytest.raises(UserInputError, match='--threshold and --mask-values both say how to read the masks'):
        MaskRule.from_options(threshold=128, values=[0, 255])
    with pytest.raises(UserInputError, match=r"--mask-colours '255,0': give each colour as R,G,B"):
        MaskRule.from_options(colours=['255,0'])
