"""Signals that end a study training early: the handler only records them; the training loop acts on them.

* ``SIGUSR1`` (SLURM's warning, ``--signal=B:USR1@N`` forwarded by the batch script): finish the epoch in
  progress, save it, exit 75;
* ``SIGTERM`` (a time limit, ``scancel``), ``SIGINT`` (Ctrl-C), or any second signal: stop after the
  current training iteration, save a checkpoint that restarts the epoch in progress, exit 75.

Nothing is saved from inside a handler. The handler raises only while :attr:`SignalFlags.raise_now` is set
(the final validation: nothing to save there, the next attempt reruns it). A process forked from this one
(nnU-Net's augmentation workers) inherits the handler; there it restores the default action and re-sends
the signal to itself, so workers end as they would without us.
"""
from __future__ import annotations

import os
import signal
from typing import Callable, Dict, List, Optional

from nnunet_ext.signals import acted_as_default_in_forked_child

PREEMPTED_STATUS = 75  # EX_TEMPFAIL: state saved (or nothing lost), run the same command again

WARNING_SIGNALS = (signal.SIGUSR1,)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(BaseException):
    """Ends the attempt with exit status 75 and its one-line ``message``. A ``BaseException``, so that no
    ``except Exception`` on the way out (nnU-Net's, multiprocessing's) swallows it."""

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class SignalFlags:
    """The signals received, in order. :meth:`install` sets the handlers (main thread only)."""

    def __init__(self) -> None:
        self.received: List[int] = []
        self.raise_now = False
        self._pid = os.getpid()
        self._previous: Dict[int, object] = {}

    def install(self) -> 'SignalFlags':
        for signum in (*WARNING_SIGNALS, *STOP_SIGNALS):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if acted_as_default_in_forked_child(self._pid, signum):  # a forked child (augmentation worker)
            return
        self.received.append(signum)
        if self.raise_now:
            self.raise_now = False  # once: cleanup code on the way out is not interrupted again
            raise Interrupted(f"stopped by {self.name} during the final validation: checkpoint_final.pth is kept, "
                              f"the next attempt runs the validation only (exit {PREEMPTED_STATUS})")

    @property
    def any(self) -> bool:
        """A signal came: leave at the next epoch boundary at the latest."""
        return bool(self.received)

    @property
    def stop_now(self) -> bool:
        """Leave after the current training iteration: a stop signal, or a second signal of any kind."""
        return len(self.received) >= 2 or any(s in STOP_SIGNALS for s in self.received)

    @property
    def name(self) -> str:
        """The signal that decides what happens: the first stop signal, else the first signal ('' if none)."""
        if not self.received:
            return ''
        decisive: Optional[int] = next((s for s in self.received if s in STOP_SIGNALS), None)
        if decisive is None:
            decisive = self.received[1] if len(self.received) >= 2 else self.received[0]
        name = signal.Signals(decisive).name
        return f"a second signal ({name})" if decisive in WARNING_SIGNALS and len(self.received) >= 2 else name


def check_before(flags: SignalFlags, what: str, next_step: str) -> Callable[[], None]:
    """A check for the moments before the long work starts: any signal ends the attempt there, nothing to
    save (``next_step``: what the next attempt does)."""
    def check() -> None:
        if flags.any:
            raise Interrupted(f"stopped by {flags.name} before {what}: nothing to save, "
                              f"the next attempt {next_step} (exit {PREEMPTED_STATUS})")
    return check
