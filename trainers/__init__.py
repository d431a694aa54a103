"""nnU-Net trainer classes of nnunet-ext (only trainers live here).

``nnUNet_extTrainer`` points at this folder (``eval "$(nnunet-ext env)"``); nnU-Net imports each
module here as a *top-level* module, so modules use absolute imports and distinctive names.
"""
