"""2D image/mask collections (Kvasir-SEG, ISIC 2018, DRIVE, CVC-ClinicDB, or any ``images/`` + ``masks/``
pair of folders) into nnU-Net raw format, for nnU-Net's ``NaturalImage2DIO``: one image file per case (RGB
kept as its 3 channels R, G, B, or one grey channel with ``--grey``) and a uint8 label file.

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

Two passes. The first (:func:`scan_case`, every case) reads each image's mode (bit depth) and each mask's
values; from all of them together the converter decides what the dataset is, so one odd file cannot flip the
interpretation of the others:

* **Intensities** keep their bit depth: ``--grey`` chooses the channels (colour -> one grey channel), never
  the depth. 8-bit images are written as PNG (RGB, or grey ``L``), 16-bit grey (``I;16``, ``I;16B``, or
  ``I`` within 0..65535) as 16-bit PNG, 32-bit float (``F``) and 32-bit integer ``I`` beyond 0..65535 as
  TIFF (``.tif``, which ``NaturalImage2DIO`` reads with tifffile; PNG holds no float): one file ending per
  dataset (:data:`WRITTEN`). Images of different bit depths in one collection are refused (naming two),
  as is a 16-bit colour PNG (Pillow reads 8 of its 16 bits).
* **Masks** (:class:`MaskRule`): ``--threshold T`` (grey >= T -> 1), ``--mask-values`` (grey values ->
  labels 0, 1, 2, ...) or ``--mask-colours`` (RGB colours -> labels) when given; otherwise the encoding is
  read from the values of all masks (:func:`decide_mask_rule`): 0/x binary (0/255, 0/1, ...), evenly spaced
  grey levels one per label (0/1/2/3, 0/85/170/255, ...), lossy JPEG masks binarised at 128; colour masks
  and anything else (e.g. 0/1/255) are refused naming the values found and the option to pass.
* A dataset whose training masks are all background is refused (naming the values found) unless
  ``allow_empty_labels`` (``--allow-empty-labels``, the writer's own check, ``raw_dataset.py``).

``--resize H W``: images bilinear, masks nearest (after binarisation / mapping). ``--split FILE``: the stems
listed (one per line, or a JSON ``{"test": [...]}``) go to ``imagesTs`` (their masks to ``labelsTs``, for
``nnunet-ext evaluate``).
"""
from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from nnunet_ext.parallel import run_cases
from nnunet_ext.conversion.raw_dataset import ConversionSummary, RawDatasetWriter
from nnunet_ext.conversion.readers import add_unique, label_counts, read_picture
from nnunet_ext.errors import UserInputError

IMAGE_ENDINGS = ('.png', '.jpg', '.jpeg', '.tif', '.tiff', '.gif', '.bmp')

#: Pillow modes of grey images (without ``--grey`` an error: nnU-Net would get one channel where it expects 3)
GREY_MODES = ('1', 'L', 'LA', 'La', 'I', 'I;16', 'I;16B', 'I;16L', 'I;16N', 'F')
_SIXTEEN_BIT = ('I;16', 'I;16B', 'I;16L', 'I;16N')

#: bit depth of a dataset's images -> (file ending, numpy type written); every colour mode is 8-bit
WRITTEN = {'8-bit': ('.png', np.uint8), '16-bit': ('.png', np.uint16), '32-bit integer': ('.tif', np.int32),
           '32-bit float': ('.tif', np.float32)}

#: Pillow's names of lossy formats: their mask values are approximate (JPEG noise), hence binarised
LOSSY_FORMATS = ('JPEG', 'MPO')

#: a mask pixel whose R, G, B differ by more than this is coloured (a grey JPEG's colour noise stays below it)
COLOUR_TOLERANCE = 32

#: at most this many grey levels are read as one label each without --mask-values (more: grey images?)
MAX_AUTO_LABELS = 32

#: mask values kept per case by the first pass (the most frequent; more means noise or an image)
_KEPT_VALUES = 256


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


def _colour(packed: int) -> Tuple[int, int, int]:
    return packed >> 16, (packed >> 8) & 255, packed & 255


def _pack(rgb: np.ndarray) -> np.ndarray:
    rgb = rgb.astype(np.int32)
    return (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]


def parse_colours(texts: Sequence[str]) -> Tuple[Tuple[int, int, int], ...]:
    """``--mask-colours``: ``R,G,B`` strings (0..255 each) -> tuples."""
    colours = []
    for text in texts:
        parts = text.split(',')
        try:
            colour = tuple(int(p) for p in parts)
        except ValueError:
            colour = ()
        if len(colour) != 3 or not all(0 <= c <= 255 for c in colour):
            raise UserInputError(f"--mask-colours {text!r}: give each colour as R,G,B with values 0..255, "
                                 f"e.g. 255,0,0")
        colours.append(colour)
    return tuple(colours)


@dataclass(frozen=True)
class MaskRule:
    """How masks become labels: binarise at ``threshold`` (grey >= threshold -> 1), map grey ``values[i]``
    -> label i, or map RGB ``colours[i]`` -> label i. None of them (the default) means "read the encoding
    from all masks" (:func:`decide_mask_rule` turns it into one of the three). ``binary``: two labels named
    ``background`` and the foreground's name (a threshold always is); ``encoding`` says how the rule was
    decided (``dataset.json``'s description)."""
    threshold: Optional[int] = None
    values: Optional[Tuple[int, ...]] = None
    colours: Optional[Tuple[Tuple[int, int, int], ...]] = None
    binary: bool = False
    encoding: str = ''

    @classmethod
    def from_options(cls, threshold: Optional[int] = None, values: Optional[Sequence[int]] = None,
                     colours: Optional[Sequence[str]] = None) -> 'MaskRule':
        """The rule of ``--threshold``, ``--mask-values`` and ``--mask-colours`` (``R,G,B`` strings); at most
        one of them, none for the encoding read from the masks."""
        given = [name for name, v in (('--threshold', threshold), ('--mask-values', values),
                                      ('--mask-colours', colours)) if v is not None]
        if len(given) > 1:
            raise UserInputError(f"{' and '.join(given)} both say how to read the masks: pass one of them")
        return cls(threshold=threshold, values=None if values is None else tuple(values),
                   colours=None if colours is None else parse_colours(colours))

    def __post_init__(self):
        given = [v for v in (self.threshold, self.values, self.colours) if v is not None]
        if len(given) > 1:
            raise UserInputError("pass only one of --threshold, --mask-values, --mask-colours")
        if self.values is not None:
            if len(set(self.values)) != len(self.values) or any(not 0 <= v <= 65535 for v in self.values) \
                    or not 1 <= len(self.values) <= 256:
                raise UserInputError(f"--mask-values must be 1..256 distinct grey values in 0..65535, got "
                                     f"{list(self.values)}")
        elif self.colours is not None:
            if len(set(self.colours)) != len(self.colours) or not 1 <= len(self.colours) <= 256:
                raise UserInputError(f"--mask-colours must be 1..256 distinct colours, got "
                                     f"{[','.join(map(str, c)) for c in self.colours]}")
        elif self.threshold is not None and not 1 <= self.threshold <= 65535:
            raise UserInputError(f"--threshold must be in 1..65535, got {self.threshold}")

    @property
    def decided(self) -> bool:
        return self.threshold is not None or self.values is not None or self.colours is not None

    @property
    def reading(self) -> str:
        """How :func:`mask_array` reads the masks: ``colour`` (RGB), ``grey`` (colour modes by their luma),
        or ``auto`` (grey, but a coloured mask stays RGB, to be refused)."""
        return 'colour' if self.colours is not None else 'grey' if self.decided else 'auto'

    def describe(self) -> str:
        if self.encoding:
            return self.encoding
        if self.threshold is not None:
            return f"grey >= {self.threshold} -> label 1"
        if self.values is not None:
            return f"grey values {'/'.join(map(str, self.values))} -> labels 0..{len(self.values) - 1}"
        if self.colours is not None:
            return (f"colours {' '.join(','.join(map(str, c)) for c in self.colours)} -> labels "
                    f"0..{len(self.colours) - 1}")
        return 'read from all masks'

    def labels(self, foreground: str = 'foreground') -> Dict[str, int]:
        """nnU-Net's ``labels``: binary masks name label 1 ``foreground`` (a preset's label name); grey
        values ``grey_<value>``, colours ``colour_<R>_<G>_<B>``."""
        if self.threshold is not None or self.binary:
            return {'background': 0, foreground: 1}
        if self.values is not None:
            return {'background': 0, **{f'grey_{v}': i for i, v in enumerate(self.values) if i > 0}}
        if self.colours is not None:
            return {'background': 0, **{'colour_' + '_'.join(map(str, c)): i
                                        for i, c in enumerate(self.colours) if i > 0}}
        raise RuntimeError("MaskRule.labels: the encoding is not decided yet (decide_mask_rule)")

    def apply(self, case: str, mask: np.ndarray) -> np.ndarray:
        """The uint8 label of a mask read by :func:`mask_array` (grey values, or RGB for colours)."""
        if self.threshold is not None:
            return (mask >= self.threshold).astype(np.uint8)
        if self.values is None and self.colours is None:
            raise RuntimeError("MaskRule.apply: the encoding is not decided yet (decide_mask_rule)")
        keys = self.values if self.values is not None else [(r << 16) | (g << 8) | b for r, g, b in self.colours]
        found = mask if self.values is not None else _pack(mask)
        label, listed = np.zeros(found.shape, np.uint8), np.zeros(found.shape, bool)
        for i, key in enumerate(keys):
            hit = found == key
            label[hit], listed = i, listed | hit
        unlisted = np.unique(found[~listed])
        if unlisted.size and self.values is not None:
            raise UserInputError(f"{case}: mask grey values {unlisted[:10].tolist()} are not in --mask-values "
                                 f"{list(self.values)} (noisy JPEG mask? use --threshold instead)")
        if unlisted.size:
            raise UserInputError(f"{case}: mask colours {[_colour(int(c)) for c in unlisted[:10]]} are not in "
                                 f"--mask-colours {[','.join(map(str, c)) for c in self.colours]} (noisy JPEG "
                                 f"mask? store colour masks losslessly, e.g. as PNG)")
        return label


def mask_array(case: str, path: str, mask, reading: str) -> Tuple[bool, np.ndarray]:
    """``(coloured, values)`` of a loaded mask: grey values (uint8 for 8-bit modes, their luma for colour
    modes; int64 for 16/32-bit and whole-number float masks) or, with ``reading`` ``colour`` (and ``auto``
    for a mask whose pixels have colour), its RGB values."""
    mode = mask.mode
    if mode in _SIXTEEN_BIT + ('I', 'F'):
        if reading == 'colour':
            raise UserInputError(f"{case}: mask {path} is a grey image ({mode}); --mask-colours needs colour "
                                 f"masks (pass --mask-values for grey values)")
        values = np.asarray(mask)
        if mode == 'F':
            fractional = values[~np.isfinite(values) | (np.mod(values, 1) != 0)]
            if fractional.size:
                raise UserInputError(f"{case}: mask {path} ({mode}) has non-integer values (e.g. "
                                     f"{np.unique(fractional)[:5].tolist()}); masks must hold whole numbers")
        values = values.astype(np.int64)
        if values.size and values.min() < 0:
            raise UserInputError(f"{case}: mask {path} ({mode}) has negative values (e.g. "
                                 f"{np.unique(values[values < 0])[:5].tolist()}); masks must hold values >= 0")
        return False, values
    if reading == 'colour':
        return True, np.asarray(mask.convert('RGB'))
    if reading == 'auto' and mode not in GREY_MODES:
        rgb = np.asarray(mask.convert('RGB'))
        if rgb.size and int((rgb.max(-1).astype(np.int16) - rgb.min(-1)).max()) > COLOUR_TOLERANCE:
            return True, rgb
    return False, np.asarray(mask.convert('L'))


@dataclass(frozen=True)
class CaseScan:
    """What the first pass learns of a case: the image's Pillow mode and bit depth (a key of
    :data:`WRITTEN`), whether the mask is coloured, its values (grey, or packed RGB) -> pixel counts (the
    :data:`_KEPT_VALUES` most frequent), how many distinct values it has, and whether it is a lossy file."""
    image_mode: str
    depth: str
    mask_coloured: bool
    mask_values: Dict[int, int]
    mask_distinct: int
    mask_lossy: bool


def _refuse_16bit_colour_png(case: str, path: str) -> None:
    with open(path, 'rb') as f:
        head = f.read(26)
    kinds = {2: 'colour', 4: 'grey+alpha', 6: 'colour+alpha'}
    if len(head) == 26 and head[12:16] == b'IHDR' and head[24] == 16 and head[25] in kinds:
        raise UserInputError(f"{case}: {path} is a 16-bit {kinds[head[25]]} PNG, which Pillow reads as 8 bit: "
                             f"save it as 16-bit grey without alpha (and pass --grey) or as 8-bit colour")


def _image_header(case: str, path: str) -> Tuple[str, str, Tuple[int, int]]:
    """(mode, bit depth, size) of an image, from its header (``I`` images are loaded: their range decides)."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as image:
            mode, image_format, size = image.mode, image.format, image.size
    except (OSError, UnidentifiedImageError):
        image = read_picture(case, path)  # raises, naming the case and the file
        mode, image_format, size = image.mode, image.format, image.size
    if image_format == 'PNG':
        _refuse_16bit_colour_png(case, path)
    if mode in _SIXTEEN_BIT:
        return mode, '16-bit', size
    if mode == 'F':
        return mode, '32-bit float', size
    if mode == 'I':
        values = np.asarray(read_picture(case, path))
        fits = values.size == 0 or (values.min() >= 0 and values.max() <= 65535)
        return mode, '16-bit' if fits else '32-bit integer', size
    return mode, '8-bit', size


def scan_case(case: str, image_path: str, mask_path: str, reading: str) -> CaseScan:
    """The first pass over one case (runs in a worker): see :class:`CaseScan`; refuses an image and mask of
    different sizes."""
    mode, depth, size = _image_header(case, image_path)
    mask = read_picture(case, mask_path)
    if size != mask.size:
        raise UserInputError(f"{case}: image {size[::-1]} and mask {mask.size[::-1]} (rows, columns) differ "
                             f"in size ({image_path}, {mask_path})")
    coloured, values = mask_array(case, mask_path, mask, reading)
    keys, counts = np.unique(_pack(values) if coloured else values, return_counts=True)
    kept = np.argsort(-counts, kind='stable')[:_KEPT_VALUES]
    return CaseScan(mode, depth, coloured, {int(keys[i]): int(counts[i]) for i in kept}, int(keys.size),
                    mask.format in LOSSY_FORMATS)


def _values_text(values: Sequence[int], limit: int = 12) -> str:
    shown = ', '.join(map(str, values[:limit]))
    return f"[{shown}{f', ... ({len(values)} values)' if len(values) > limit else ''}]"


def _evenly_spaced(values: Sequence[int]) -> bool:
    """0, 1, 2, ..., k, or k + 1 levels 0 .. top a step of at least 2 apart (each rounded either way)."""
    k, top = len(values) - 1, values[-1]
    if list(values) == list(range(k + 1)):
        return True
    return top >= 2 * k and all(int(np.floor(i * top / k)) <= v <= int(np.ceil(i * top / k))
                                for i, v in enumerate(values))


def decide_mask_rule(scans: Sequence[CaseScan], masks: Sequence[str]) -> MaskRule:
    """The encoding of the masks, from the values of all of them (``scans`` and the mask files, in the same
    order), when no option gave it; refuses what it cannot read unambiguously, naming the values found and
    the option to pass (see the module docstring)."""
    n = len(scans)
    coloured = [i for i, s in enumerate(scans) if s.mask_coloured]
    if coloured:
        hist: Counter = Counter()
        for i in coloured:
            hist.update(scans[i].mask_values)
        total = sum(hist.values())
        common = [c for c, count in hist.most_common(8) if count >= total / 1000]
        distinct = len(hist)
        raise UserInputError(
            f"{len(coloured)} of {n} masks are colour images (e.g. {masks[coloured[0]]}); colours found, most "
            f"frequent first: {', '.join(str(_colour(c)) for c in common)}"
            f"{f' ({distinct} distinct: a lossy JPEG?)' if distinct > 16 else ''}; pass --mask-colours with the "
            f"colour of each label, background first (e.g. --mask-colours "
            f"{' '.join(','.join(map(str, _colour(c))) for c in common)})")
    lossy = [i for i, s in enumerate(scans) if s.mask_lossy]
    if lossy and len(lossy) < n:
        lossless = next(i for i, s in enumerate(scans) if not s.mask_lossy)
        raise UserInputError(f"the masks mix lossy JPEG ({masks[lossy[0]]}) and lossless ({masks[lossless]}) "
                             f"files, whose values cannot be read the same way; pass --threshold T to binarise "
                             f"them all, or --mask-values with the grey value of each label")
    hist = Counter()
    for s in scans:
        hist.update(s.mask_values)
    values = sorted(hist)
    if lossy:
        total = sum(hist.values())
        middle = sum(count for v, count in hist.items() if 64 <= v <= 191)
        if middle > 0.05 * total:
            raise UserInputError(f"the {n} masks are lossy JPEG files with {middle / total:.0%} of their pixels "
                                 f"between grey 64 and 191, so no binary 0/255 masks; pass --threshold T to "
                                 f"binarise them anyway, or store multi-class masks losslessly (PNG) and pass "
                                 f"--mask-values")
        return MaskRule(threshold=128, encoding='lossy JPEG masks, grey >= 128 -> label 1')
    if any(s.mask_distinct > len(s.mask_values) for s in scans) or len(values) > MAX_AUTO_LABELS:
        distinct = max([len(values)] + [s.mask_distinct for s in scans])
        raise UserInputError(f"the masks hold {distinct} or more distinct grey values ({values[0]}..{values[-1]}), "
                             f"more than the {MAX_AUTO_LABELS} labels read without being told (grey images in the "
                             f"mask folder?); pass --mask-values with the grey value of each label, background "
                             f"first, or --threshold T to binarise")
    if values[0] != 0:
        raise UserInputError(f"no mask has the grey value 0 (background): values found in the {n} masks "
                             f"{_values_text(values)}; pass --mask-values with the background's grey value first "
                             f"(e.g. --mask-values {' '.join(map(str, values))}) or --threshold T")
    if values == [0]:
        return MaskRule(threshold=1, encoding='masks hold grey 0 only (background)')
    if len(values) == 2:
        return MaskRule(values=(0, values[1]), binary=True,
                        encoding=f'binary masks 0/{values[1]}, grey {values[1]} -> label 1')
    if _evenly_spaced(values):
        return MaskRule(values=tuple(values), encoding=f"one grey level per label, "
                                                        f"{'/'.join(map(str, values))} -> labels 0..{len(values) - 1}")
    first = set(scans[0].mask_values)
    other = next((i for i, s in enumerate(scans) if set(s.mask_values) != first), None)
    examples = f"{masks[0]} holds {sorted(first)}" + \
        ('' if other is None else f", {masks[other]} holds {sorted(scans[other].mask_values)}")
    raise UserInputError(f"mask grey values {_values_text(values)} are no encoding folder2d reads without being "
                         f"told (binary 0/x such as 0/255 or 0/1, or evenly spaced levels one per label such as "
                         f"0/1/2/3 or 0/85/170/255): {examples}; pass --mask-values with the grey value of each "
                         f"label, background first (e.g. --mask-values {' '.join(map(str, values))}), or "
                         f"--threshold T to binarise")


def _image_depth_of_dataset(cases: Sequence[str], images: Sequence[str], scans: Sequence[CaseScan],
                            grey: bool) -> str:
    """The one bit depth of the dataset's images (a key of :data:`WRITTEN`); refuses a grey image in an RGB
    conversion and, with ``grey``, images of different bit depths (naming one of each)."""
    if not grey:
        for case, path, s in zip(cases, images, scans):
            if s.image_mode in GREY_MODES:
                depth = '' if s.depth == '8-bit' else f', {s.depth}'
                raise UserInputError(f"{case}: {path} is a grey image ({s.image_mode}{depth}) in an RGB conversion; "
                                     f"pass --grey to convert every image to one grey channel (--grey keeps "
                                     f"16-bit and float values)")
        return '8-bit'
    first: Dict[str, Tuple[str, str]] = {}
    for path, s in zip(images, scans):
        first.setdefault(s.depth, (path, s.image_mode))
    if len(first) > 1:
        (d1, (p1, m1)), (d2, (p2, m2)) = list(first.items())[:2]
        raise UserInputError(f"the images have different bit depths: {p1} is {m1} ({d1}), {p2} is {m2} ({d2}); "
                             f"folder2d does not rescale one to the other (grey 200 is not the same brightness "
                             f"in both): export every image at one bit depth")
    return next(iter(first))

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
                 depth: str, rule: MaskRule, resize: Optional[Tuple[int, int]]) -> Dict[int, int]:
    """Converts one image/mask pair (runs in a worker) after the first pass checked it (:func:`scan_case`):
    colour images as RGB, or grey ones at ``depth`` (:data:`WRITTEN`); the mask by the decided ``rule``.
    Returns the label voxel counts."""
    from PIL import Image
    image, mask = read_picture(case, image_path), read_picture(case, mask_path)
    if not grey:
        image = image if image.mode == 'RGB' else image.convert('RGB')  # palette / RGBA / CMYK -> 3 channels
    elif depth == '8-bit':
        image = image.convert('L')
    else:  # 16/32-bit and float: as Pillow's 32-bit 'I' or 'F' (which it resamples), written at the depth
        values = np.asarray(image)
        if depth == '32-bit float' and not np.isfinite(values).all():
            bad = int(values.size - np.isfinite(values).sum())
            raise UserInputError(f"{case}: {image_path} has {bad} pixels that are NaN or infinite; fix or mask "
                                 f"them before converting")
        image = Image.fromarray(values.astype(np.float32 if depth == '32-bit float' else np.int32))
    label = rule.apply(case, mask_array(case, mask_path, mask, rule.reading)[1])
    if resize is not None:
        rows, cols = resize
        image = image.resize((cols, rows), Image.BILINEAR)
        label = np.asarray(Image.fromarray(label).resize((cols, rows), Image.NEAREST))
    if grey and depth != '8-bit':
        dtype = WRITTEN[depth][1]
        values = np.asarray(image)
        if depth == '16-bit':
            values = np.clip(values, 0, 65535)
        image = Image.fromarray(values.astype(dtype))
    image.save(image_out)
    Image.fromarray(label).save(label_out)
    return label_counts(label)


def _found_text(scans: Sequence[CaseScan]) -> str:
    hist: Counter = Counter()
    for s in scans:
        hist.update(s.mask_values)
    if any(s.mask_coloured for s in scans):
        return 'colours found ' + ', '.join(str(_colour(c)) for c, _ in hist.most_common(8))
    return f'grey values found {_values_text(sorted(hist))}'


def convert_folder2d(input_folder: str, raw_root: str, dataset_id: int, name: str, layout: Layout,
                     rule: MaskRule = MaskRule(), grey: bool = False, resize: Optional[Sequence[int]] = None,
                     split_file: Optional[str] = None, overwrite: bool = False,
                     num_processes: int = 2, card: Optional[DatasetCard] = None,
                     allow_empty_labels: Optional[bool] = None) -> Tuple[str, ConversionSummary, Dict[str, int]]:
    """Converts the collection; ``card`` (a preset's) names the label and fills ``dataset.json``'s reference,
    citation and licence (without one, nnU-Net's defaults stay). ``rule``: how masks become labels (default:
    read from all masks). ``allow_empty_labels``: write the dataset even when every training mask is background
    (default None: ``RawDatasetWriter``'s, i.e. ``--allow-empty-labels``). Returns (folder, summary, labels)."""
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
    RawDatasetWriter(raw_root, dataset_id, name, overwrite)  # a taken id or a bad name: refused before reading
    stems = sorted(images)
    cases = [_case_id(stem) for stem in stems]
    scans = run_cases(scan_case, [(case, images[stem], masks[stem], rule.reading) for case, stem in zip(cases, stems)],
                      num_processes, 'checking')
    depth = _image_depth_of_dataset(cases, [images[s] for s in stems], scans, grey)
    if not rule.decided:
        rule = decide_mask_rule(scans, [masks[s] for s in stems])
    summary = ConversionSummary()
    with RawDatasetWriter(raw_root, dataset_id, name, overwrite, file_ending=WRITTEN[depth][0],
                          allow_empty_labels=allow_empty_labels) as writer:
        jobs, splits = [], []
        for case, stem in zip(cases, stems):
            split = 'Ts' if stem in test else 'Tr'
            writer.claim_case(case, images[stem])
            jobs.append((case, images[stem], masks[stem], writer.image_path(case, split=split),
                         writer.label_path(case, split=split), grey, depth, rule, tuple(resize) if resize else None))
            splits.append(split)
        foreground = False
        for split, counts in zip(splits, run_cases(convert_case, jobs, num_processes, 'images')):
            summary.add(split, (1.0, 1.0), counts)
            foreground |= split == 'Tr' and any(count for value, count in counts.items() if value > 0)
        if not foreground and not writer.allow_empty_labels:  # said with the values found, before the writer would
            training = [s for s, split in zip(scans, splits) if split == 'Tr']
            raise UserInputError(f"all {len(training)} training masks are background ({_found_text(training)}; read "
                                 f"as {rule.describe()}): nnU-Net would learn nothing; pass --threshold T (e.g. "
                                 f"--threshold 1 for 0/1 masks), --mask-values or --mask-colours if the foreground "
                                 f"is stored differently, or --allow-empty-labels to write the dataset anyway")
        channels = {0: 'grey'} if grey else {0: 'R', 1: 'G', 2: 'B'}
        labels = rule.labels(card.label) if card is not None else rule.labels()
        about = {} if card is None else {'reference': card.reference, 'citation': card.citation,
                                         'license': card.licence}
        writer.finish(channels, labels, description=f'2D collection converted by nnunet-ext from {input_folder}; '
                                                    f'images {depth}; masks: {rule.describe()}', **about)
    return writer.target, summary, labels
