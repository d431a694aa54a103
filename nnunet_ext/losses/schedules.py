"""Weight schedules of the multi-level structural loss (Eq. 11 of
``docs/methods/multi-level-structural.md``): ``w_R E_R + alpha E_B + beta E_P`` per epoch.

An epoch here is nnU-Net's (250 iterations by default), counted from 0. ``epochs_per_step``
stretches a schedule: the paper's epochs on NIH Pancreas-CT are passes over all slices of ~60
volumes with batch size 1, many more iterations than one nnU-Net epoch.
"""
from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TermWeights", "PaperSchedule", "KervadecRebalanceSchedule"]


@dataclass(frozen=True)
class TermWeights:
    """Weights of the region, boundary (alpha) and point (beta) terms."""
    region: float
    boundary: float
    point: float


def check_epochs_per_step(epochs_per_step: int) -> None:
    if not isinstance(epochs_per_step, int) or epochs_per_step < 1:
        raise ValueError(f"epochs_per_step must be a positive int, got {epochs_per_step!r}")


def _check_epoch(epoch: int) -> None:
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")


@dataclass(frozen=True)
class PaperSchedule:
    """Section 4.1.1: region weight 1; ``alpha`` starts at 0 and rises by 0.2 per epoch until 1;
    ``beta`` is 0 for the first 12 epochs (0..11) and 1 from epoch 12 on.

    ``alpha(e) = min(alpha_max, alpha_increment * s)``, ``beta(e) = beta if s >= beta_start else 0``
    with ``s = e // epochs_per_step``.
    """
    alpha_increment: float = 0.2
    alpha_max: float = 1.0
    beta_start: int = 12
    beta: float = 1.0
    epochs_per_step: int = 1

    def __post_init__(self):
        check_epochs_per_step(self.epochs_per_step)

    def __call__(self, epoch: int) -> TermWeights:
        _check_epoch(epoch)
        step = epoch // self.epochs_per_step
        return TermWeights(1.0, min(self.alpha_max, self.alpha_increment * step),
                           self.beta if step >= self.beta_start else 0.0)


@dataclass(frozen=True)
class KervadecRebalanceSchedule:
    """Kervadec et al.'s rebalancing ("Boundary loss for highly unbalanced segmentation", Section 3):
    ``a E_R + (1 - a) E_B`` with ``a`` starting at 1 and falling by 0.01 per epoch to 0.01; the
    point term follows the paper's ``beta`` (0 before epoch 12, then 1).
    """
    initial: float = 1.0
    decrement: float = 0.01
    minimum: float = 0.01
    beta_start: int = 12
    beta: float = 1.0
    epochs_per_step: int = 1

    def __post_init__(self):
        check_epochs_per_step(self.epochs_per_step)
        if not 0 <= self.minimum <= self.initial <= 1:
            raise ValueError(f"need 0 <= minimum <= initial <= 1, got minimum={self.minimum}, initial={self.initial}")

    def __call__(self, epoch: int) -> TermWeights:
        _check_epoch(epoch)
        step = epoch // self.epochs_per_step
        region = max(self.minimum, self.initial - self.decrement * step)
        return TermWeights(region, 1.0 - region, self.beta if step >= self.beta_start else 0.0)
