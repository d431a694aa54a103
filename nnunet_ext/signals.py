"""What our signal handlers do in a process forked after they were installed (no dependencies: the predictor
without PyTorch uses it too).

A child forked from a process with a handler of ours inherits it: nnU-Net's fork pools (export, prediction)
and augmentation workers. The handler's job belongs to the process that installed it; in a child the signal
must act as it would without us, or a pool worker survives ``Pool.terminate()`` (SIGTERM) and hangs its parent.
"""
from __future__ import annotations

import os
import signal


def acted_as_default_in_forked_child(owner_pid: int, signum: int) -> bool:
    """False in ``owner_pid``, the process that installed the handler calling this. In any other process (a
    forked child): restores the signal's default action, re-sends the signal to itself (which ends the process
    unless the default ignores it) and returns True."""
    if os.getpid() == owner_pid:
        return False
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    return True
