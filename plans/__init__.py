"""Experiment planners of nnunet-ext. Run them with ``nnunet-ext plan DATASET -pl NAME`` (the stock
``-pl`` only sees planners inside nnunetv2's own tree)."""
