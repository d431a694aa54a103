"""What every trainer of this package does besides its method, as one mixin listed first in each trainer."""
from __future__ import annotations

from nnunet_ext.memory_check import MemoryCheckMixin
from nnunet_ext.training.schedule import TrainingLengthFromEnvMixin
from nnunet_ext.training.slice_stack_check import SliceStackCheckMixin


class LengthAndChecksMixin(TrainingLengthFromEnvMixin, SliceStackCheckMixin, MemoryCheckMixin):
    """The training length from ``nnUNet_ext_num_epochs`` etc. (:class:`TrainingLengthFromEnvMixin`), the
    refusal of a 2.5D-stacked dataset on a configuration that does not slice along its stacking axis
    (:class:`SliceStackCheckMixin`) and the start-up memory check (:class:`MemoryCheckMixin`). Each is its own
    mixin, for a trainer that wants only some of them."""


__all__ = ['LengthAndChecksMixin', 'MemoryCheckMixin', 'SliceStackCheckMixin', 'TrainingLengthFromEnvMixin']
