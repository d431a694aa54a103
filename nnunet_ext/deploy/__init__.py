"""Run models exported by ``nnunet-ext export`` with numpy, scipy, SimpleITK and onnxruntime only.

No torch, no nnU-Net: this package reproduces nnU-Net 2.8.1's ``nnUNetPredictor.predict_from_files`` (default
options: tile_step_size 0.5, gaussian weighting, mirroring, everything on the device) for an export folder
holding ``model.json`` and one ONNX file per fold.

Public API::

    from nnunet_ext.deploy import load_model, predict_folder, predict_case, find_cases

    model = load_model('export_folder', folds=None, providers=None, threads=None)
    predict_folder(model, 'imagesTs', 'predictions', save_probabilities=False)

Command line: ``python -m nnunet_ext.deploy EXPORT_FOLDER -i IN -o OUT`` (or ``nnunet-ext deploy-predict``).

Modules, one step each: ``model`` (model.json + onnxruntime sessions), ``images`` (nnU-Net's SimpleITKIO /
NaturalImage2DIO, case discovery), ``preprocessing`` (DefaultPreprocessor.run_case_npy), ``resampling``
(default_resampling), ``sliding_window`` (nnUNetPredictor's sliding window), ``segmentation``
(convert_predicted_logits_to_segmentation_with_correct_shape), ``predict`` (the folder loop).
"""
from nnunet_ext.deploy.model import ExportedModel, load_model
from nnunet_ext.deploy.images import find_cases
from nnunet_ext.deploy.predict import predict_case, predict_folder, predict_logits

__all__ = ['ExportedModel', 'load_model', 'find_cases', 'predict_case', 'predict_folder', 'predict_logits']
