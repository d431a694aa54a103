"""``python -m nnunet_ext.deploy EXPORT_FOLDER -i IN -o OUT [-f FOLDS] [--disable-tta] [--step-size S]
[--save-probabilities] [--threads N] [--providers ...]``: user errors are one line on stderr and exit 2."""
from __future__ import annotations

import argparse
import os
import sys
import threading

from nnunet_ext.errors import UserInputError
from nnunet_ext.signals import acted_as_default_in_forked_child
from nnunet_ext.deploy.commands import DESCRIPTION, add_arguments, run


class _Signalled(KeyboardInterrupt):
    """SIGTERM (a batch system's time limit, ``timeout``, ``kill``) raised like Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def main(argv=None) -> int:
    """The command; SIGTERM raises like Ctrl-C while it runs (the previous handler comes back after it)."""
    import signal
    previous = signal.getsignal(signal.SIGTERM)
    if previous is not signal.SIG_DFL or threading.current_thread() is not threading.main_thread():
        return _main(argv)  # ignored (nohup), someone else's handler, or not settable here: left as it is
    owner = os.getpid()

    def raise_interrupt(signum, frame):
        if acted_as_default_in_forked_child(owner, signum):
            return
        raise _Signalled(signum)

    signal.signal(signal.SIGTERM, raise_interrupt)
    try:
        return _main(argv)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _main(argv) -> int:
    import signal
    parser = argparse.ArgumentParser(prog='python -m nnunet_ext.deploy', description=DESCRIPTION)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        run(args)
    except UserInputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # the conventional status: 128 + the signal's number (130, 143)
        signum = getattr(e, 'signum', signal.SIGINT)
        print(f"interrupted ({signal.Signals(signum).name}); temporary files removed", file=sys.stderr)
        return 128 + signum
    return 0


if __name__ == '__main__':
    sys.exit(main())
