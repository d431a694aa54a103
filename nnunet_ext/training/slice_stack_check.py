"""The trainer-side check of a 2.5D-stacked dataset (``nnunet-ext stack-slices``): its channels are a slice and
its neighbours, which only a 2d configuration slicing along the stacking axis trains on."""
from __future__ import annotations

import torch

from nnunet_ext.conversion.slice_stack import check_training_configuration
from nnunet_ext.training.composition import TrainerMixin


class SliceStackCheckMixin(TrainerMixin):
    """Right after nnU-Net's ``__init__``, refuses a 2.5D-stacked dataset on a configuration that does not
    slice along its stacking axis (:func:`nnunet_ext.conversion.slice_stack.check_training_configuration`)."""

    cooperative_hooks = frozenset({'__init__'})

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device('cuda')):
        # exact signature of nnUNetTrainer.__init__: it records its arguments by inspecting it
        super().__init__(plans, configuration, fold, dataset_json, device)
        check_training_configuration(dataset_json, self.plans_manager.transpose_forward,
                                     len(self.configuration_manager.patch_size), configuration)
