"""The embedded demo: a synthetic CT-like phantom dataset and the ``nnunet-ext demo`` pipeline."""
