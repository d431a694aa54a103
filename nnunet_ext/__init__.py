"""nnunet-ext: methods of five medical-image-segmentation papers as nnU-Net v2 trainers.

Sub-packages: ``losses`` and ``nn`` (torch only), ``training`` (trainer mixins, glue to nnU-Net),
``trainers`` (the folder ``nnUNet_extTrainer`` points at), ``architectures``, ``plans``.
"""
__version__ = "0.1.0"
