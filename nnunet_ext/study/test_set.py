"""The test set of a study: ``imagesTs`` cases with a label in ``labelsTs``."""
from __future__ import annotations

import json
import os


def labelled_test_cases(dataset: str) -> dict:
    """``{case: [image files]}`` of ``imagesTs`` that have a label in ``labelsTs``."""
    from nnunetv2.utilities.utils import get_identifiers_from_splitted_dataset_folder
    raw = os.path.join(os.environ['nnUNet_raw'], dataset)
    with open(os.path.join(raw, 'dataset.json'), encoding='utf-8') as f:
        dataset_json = json.load(f)
    ending, channels = dataset_json['file_ending'], len(dataset_json.get('channel_names', dataset_json.get('modality')))
    images, labels = os.path.join(raw, 'imagesTs'), os.path.join(raw, 'labelsTs')
    cases = {}
    for case in sorted(get_identifiers_from_splitted_dataset_folder(images, ending)):
        if os.path.isfile(os.path.join(labels, case + ending)):
            cases[case] = [os.path.join(images, f'{case}_{c:04d}{ending}') for c in range(channels)]
    return cases
