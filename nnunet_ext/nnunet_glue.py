"""Small adapters around nnU-Net's own lookups that turn its failures into clear user errors."""
from __future__ import annotations

import os

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
