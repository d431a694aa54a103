"""2D image/mask collections (Kvasir-SEG, ISIC 2018, DRIVE, CVC-ClinicDB, or any ``images/`` + ``masks/``
pair of folders) into nnU-Net raw format, written as PNG for nnU-Net's ``NaturalImage2DIO``: one image
file per case (RGB kept as its 3 channels R, G, B, or converted to grey with ``--grey``) and a uint8
label PNG.

Pairing: an image ``<stem><image_suffix>.<ext>`` goes with the mask ``<stem><mask_suffix>.<ext'>`` (any
of PNG, JPG, TIF, GIF, BMP on either side). Presets give the public layouts, and what ``dataset.json``
records of each collection (:class:`DatasetCard`: the label name -- kvasir and cvc ``polyp``, isic
``lesion``, drive ``vessel`` -- reference, citation and licence):

=============  ================================================  ==========================================
preset         images / masks (below INPUT)                      suffixes (image / mask)
=============  ================================================  ==========================================
``kvasir``     ``images`` / ``masks``                            none
``isic``       ``ISIC2018_Task1-2_Training_Input`` /             none / ``_segmentation``
               ``ISIC2018_Task1_Training_GroundTruth``
``drive``      ``training/images`` / ``training/1st_manual``     ``_training`` / ``_manual1``
``cvc``        ``Original`` / ``Ground Truth``                   none
=============  ================================================  ==========================================

Masks: converted to grey (PIL's ``L``), then either binarised, ``value >= threshold`` -> 1 (default 128;
JPEG masks are noisy), or mapped from listed grey values (``--mask-values 0 128 255`` -> labels 0, 1, 2;
a grey value not listed is an error naming the case). ``--resize H W``: images bilinear, masks nearest
(after binarisation / mapping). ``--split FILE``: the stems listed (one per line, or a JSON
``{"test": [...]}``) go to ``imagesTs`` (their masks to ``labelsTs``, for ``nnunet-ext evaluate``).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from nnunet_ext.parallel import run_cases
from nnunet_ext.conversion.raw_dataset import ConversionSummary, RawDatasetWriter
from nnunet_ext.conversion.readers import add_unique, label_counts, read_picture
from nnunet_ext.errors import UserInputError

IMAGE_ENDINGS = ('.png', '.jpg', '.jpeg', '.tif', '.tiff', '.gif', '.bmp')


@dataclass(frozen=True)
class Layout:
    images: str
    masks: str
    image_suffix: str = ''
    mask_suffix: str = ''


@dataclass(frozen=True)
class DatasetCard:
    """What a preset knows about its public collection, written into ``dataset.json``: the name of the
    foreground label (binary masks) and nnU-Net's ``reference``, ``citation`` and ``licence`` fields
    (``generate_dataset_json``'s ``license``; check the source's current terms before sharing)."""
    label: str
    reference: str
    citation: str
    licence: str


@dataclass(frozen=True)
class Preset:
    layout: Layout
    card: DatasetCard


PRESETS = {
    'kvasir': Preset(Layout('images', 'masks'), DatasetCard(
        'polyp', 'https://datasets.simula.no/kvasir-seg/',
        'Jha D, Smedsrud PH, Riegler MA, Halvorsen P, de Lange T, Johansen D, Johansen HD. Kvasir-SEG: A Segmented '
        'Polyp Dataset. MultiMedia Modeling (MMM 2020), LNCS 11962, pp. 451-462, 2020.',
        'research and educational use; other uses need the authors\' prior written permission (terms of use at '
        'https://datasets.simula.no/kvasir-seg/)')),
    'isic': Preset(Layout('ISIC2018_Task1-2_Training_Input', 'ISIC2018_Task1_Training_GroundTruth', '',
                          '_segmentation'), DatasetCard(
        'lesion', 'https://challenge.isic-archive.com/landing/2018/45/',
        'Codella N, Rotemberg V, Tschandl P, et al. Skin Lesion Analysis Toward Melanoma Detection 2018: A Challenge '
        'Hosted by the International Skin Imaging Collaboration (ISIC). arXiv:1902.03368, 2019. Tschandl P, '
        'Rosendahl C, Kittler H. The HAM10000 dataset. Sci Data 5, 180161, 2018.',
        'CC BY-NC 4.0 (ISIC 2018 challenge data, https://challenge.isic-archive.com/data/)')),
    'drive': Preset(Layout(os.path.join('training', 'images'), os.path.join('training', '1st_manual'), '_training',
                           '_manual1'), DatasetCard(
        'vessel', 'https://drive.grand-challenge.org/',
        'Staal J, Abramoff MD, Niemeijer M, Viergever MA, van Ginneken B. Ridge-based vessel segmentation in color '
        'images of the retina. IEEE Transactions on Medical Imaging 23(4), 501-509, 2004.',
        'free of charge for research and educational purposes; copying, redistribution and unauthorised commercial '
        'use are prohibited; publications must cite Staal et al. 2004 (DRIVE terms of use)')),
    'cvc': Preset(Layout('Original', 'Ground Truth'), DatasetCard(
        'polyp', 'https://polyp.grand-challenge.org/CVCClinicDB/',
        'Bernal J, Sanchez FJ, Fernandez-Esparrach G, Gil D, Rodriguez C, Vilarino F. WM-DOVA maps for accurate '
        'polyp highlighting in colonoscopy: Validation vs. saliency maps from physicians. Computerized Medical '
        'Imaging and Graphics 43, 99-111, 2015.',
        'research use under the terms of the CVC-ClinicDB page (https://polyp.grand-challenge.org/CVCClinicDB/); '
        'publications must cite Bernal et al. 2015')),
}


@dataclass(frozen=True)
class MaskRule:
    """Binarise at ``threshold`` (grey >= threshold -> 1) or map ``values[i]`` -> label i."""
    threshold: Optional[int] = 128
    values: Optional[Tuple[int, ...]] = None

    def __post_init__(self):
        if self.values is not None:
            if len(set(self.values)) != len(self.values) or any(not 0 <= v <= 255 for v in self.values):
                raise UserInputError(f"--mask-values must be distinct grey values in 0..255, got {list(self.values)}")
        elif self.threshold is None or not 1 <= self.threshold <= 255:
            raise UserInputError(f"--threshold must be in 1..255, got {self.threshold}")

    def labels(self, foreground: str = 'foreground') -> Dict[str, int]:
        """nnU-Net's ``labels``: binary masks name label 1 ``foreground`` (a preset's label name); grey
        values ``grey_<value>``."""
        if self.values is None:
            return {'background': 0, foreground: 1}
        return {'background': 0, **{f'grey_{v}': i for i, v in enumerate(self.values) if i > 0}}

    def apply(self, case: str, grey: np.ndarray) -> np.ndarray:
        if self.values is None:
            return (grey >= self.threshold).astype(np.uint8)
        label = np.full(grey.shape, 255, np.uint8)
        for i, v in enumerate(self.values):
            label[grey == v] = i
        unlisted = np.unique(grey[label == 255])
        if unlisted.size:
            raise UserInputError(f"{case}: mask grey values {unlisted[:10].tolist()} are not in --mask-values "
                                 f"{list(self.values)} (noisy JPEG mask? use --threshold instead)")
        return label


def _index(folder: str, suffix: str, what: str) -> Dict[str, str]:
    if not os.path.isdir(folder):
        raise UserInputError(f"{what} folder {folder!r} does not exist")
    found: Dict[str, str] = {}
    for name in sorted(os.listdir(folder)):
        stem, ext = os.path.splitext(name)
        if ext.lower() not in IMAGE_ENDINGS or name.startswith('.'):
            continue
        if suffix:
            if not stem.endswith(suffix):
                continue
            stem = stem[:-len(suffix)]
        add_unique(found, stem, os.path.join(folder, name), f'{what} for case {stem!r}')
    return found


def _case_id(stem: str) -> str:
    safe = ''.join(c if c.isalnum() or c in '-_' else '_' for c in stem)
    return safe if safe[:1].isalnum() else f'c{safe}'


def _read_test_stems(path: str) -> List[str]:
    if not os.path.isfile(path):
        raise UserInputError(f"--split {path!r} does not exist")
    with open(path, encoding='utf-8') as f:
        text = f.read()
    if path.endswith('.json'):
        content = json.loads(text)
        if not isinstance(content, dict) or not isinstance(content.get('test'), list):
            raise UserInputError(f"--split {path}: expected a JSON object with a 'test' list of case stems")
        return [str(s) for s in content['test']]
    return [line.strip() for line in text.splitlines() if line.strip()]


def convert_case(case: str, image_path: str, mask_path: str, image_out: str, label_out: str, grey: bool,
                 rule: MaskRule, resize: Optional[Tuple[int, int]]) -> Tuple[int, Dict[int, int]]:
    """Converts one image/mask pair (runs in a worker). Returns (channels, label voxel counts)."""
    from PIL import Image
    image, mask = read_picture(case, image_path), read_picture(case, mask_path)
    if image.size != mask.size:
        raise UserInputError(f"{case}: image {image.size[::-1]} and mask {mask.size[::-1]} (rows, columns) differ "
                             f"in size ({image_path}, {mask_path})")
    if grey:
        image = image.convert('L')
    elif image.mode != 'RGB':
        if image.mode in ('L', 'I', 'I;16', 'F', '1'):
            raise UserInputError(f"{case}: {image_path} is a grey image ({image.mode}) in an RGB conversion; "
                                 f"pass --grey to convert every image to grey")
        image = image.convert('RGB')  # palette / RGBA / CMYK -> the 3 colour channels
    label = rule.apply(case, np.asarray(mask.convert('L')))
    if resize is not None:
        rows, cols = resize
        image = image.resize((cols, rows), Image.BILINEAR)
        label = np.asarray(Image.fromarray(label).resize((cols, rows), Image.NEAREST))
    image.save(image_out)
    Image.fromarray(label).save(label_out)
    return (1 if grey else 3), label_counts(label)


def convert_folder2d(input_folder: str, raw_root: str, dataset_id: int, name: str, layout: Layout,
                     rule: MaskRule = MaskRule(), grey: bool = False, resize: Optional[Sequence[int]] = None,
                     split_file: Optional[str] = None, overwrite: bool = False,
                     num_processes: int = 2, card: Optional[DatasetCard] = None
                     ) -> Tuple[str, ConversionSummary, Dict[str, int]]:
    """Converts the collection; ``card`` (a preset's) names the label and fills ``dataset.json``'s reference,
    citation and licence (without one, nnU-Net's defaults stay). Returns (folder, summary, labels)."""
    images = _index(os.path.join(input_folder, layout.images), layout.image_suffix, 'image')
    masks = _index(os.path.join(input_folder, layout.masks), layout.mask_suffix, 'mask')
    no_mask, no_image = sorted(set(images) - set(masks)), sorted(set(masks) - set(images))
    if no_mask:
        raise UserInputError(f"no mask for image(s) {no_mask[:10]} (looked for <stem>{layout.mask_suffix}.* in "
                             f"{os.path.join(input_folder, layout.masks)})")
    if no_image:
        raise UserInputError(f"no image for mask(s) {no_image[:10]} (looked for <stem>{layout.image_suffix}.* in "
                             f"{os.path.join(input_folder, layout.images)})")
    if not images:
        raise UserInputError(f"no image/mask pairs in {os.path.join(input_folder, layout.images)} and "
                             f"{os.path.join(input_folder, layout.masks)}")
    test = set(_read_test_stems(split_file)) if split_file else set()
    unknown = sorted(test - set(images))
    if unknown:
        raise UserInputError(f"--split lists case(s) not in the collection: {unknown[:10]}")
    if resize is not None and (len(resize) != 2 or min(resize) < 1):
        raise UserInputError(f"--resize needs two positive sizes (rows, columns), got {list(resize)}")
    summary = ConversionSummary()
    with RawDatasetWriter(raw_root, dataset_id, name, overwrite, file_ending='.png') as writer:
        jobs, splits = [], []
        for stem in sorted(images):
            case, split = _case_id(stem), ('Ts' if stem in test else 'Tr')
            writer.claim_case(case, images[stem])
            jobs.append((case, images[stem], masks[stem], writer.image_path(case, split=split),
                         writer.label_path(case, split=split), grey, rule, tuple(resize) if resize else None))
            splits.append(split)
        for split, (_, counts) in zip(splits, run_cases(convert_case, jobs, num_processes, 'images')):
            summary.add(split, (1.0, 1.0), counts)
        channels = {0: 'grey'} if grey else {0: 'R', 1: 'G', 2: 'B'}
        labels = rule.labels(card.label) if card is not None else rule.labels()
        about = {} if card is None else {'reference': card.reference, 'citation': card.citation,
                                         'license': card.licence}
        writer.finish(channels, labels, description=f'2D collection converted by nnunet-ext from {input_folder}',
                      **about)
    return writer.target, summary, labels
