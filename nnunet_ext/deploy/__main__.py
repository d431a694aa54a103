"""``python -m nnunet_ext.deploy EXPORT_FOLDER -i IN -o OUT [-f FOLDS] [--disable-tta] [--step-size S]
[--save-probabilities] [--threads N] [--providers ...]``: user errors are one line on stderr and exit 2."""
from __future__ import annotations

import argparse
import sys

from nnunet_ext.errors import UserInputError
from nnunet_ext.deploy.commands import DESCRIPTION, add_arguments, run


class _Signalled(KeyboardInterrupt):
    """SIGTERM (a batch system's time limit, ``timeout``, ``kill``) raised like Ctrl-C."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _raise_interrupt(signum, frame):
    raise _Signalled(signum)


def main(argv=None) -> int:
    import signal
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:  # SIGTERM like Ctrl-C: temporary files removed
        signal.signal(signal.SIGTERM, _raise_interrupt)
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
