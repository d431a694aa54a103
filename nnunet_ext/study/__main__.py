"""A study job's command line (what the executors run and the SLURM scripts show):

    python -m nnunet_ext.study train DATASET CONFIGURATION FOLD TRAINER [-p PLANS] [--seed S] ...
    python -m nnunet_ext.study plan|test|report SPEC ...
"""
from __future__ import annotations

import sys


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == 'train':
        from nnunet_ext.study.train import main as train
        return train(sys.argv[2:])
    from nnunet_ext.study.jobs import main as other_job
    return other_job(sys.argv[1:])


if __name__ == '__main__':
    sys.exit(main())
