"""``nnunet-ext export``: a trained nnU-Net model folder -> ONNX files (one per fold) and ``model.json``, which
the deploy predictor (``nnunet_ext.deploy``) runs without PyTorch or nnU-Net (``docs/commands/export.md``).

Modules: ``portable`` (our networks in standard ONNX operators), ``onnx_file`` (one network -> one checked
ONNX file), ``model_json`` (what prediction needs from the plans), ``export`` (the folder), ``commands``
(the subcommand).
"""
