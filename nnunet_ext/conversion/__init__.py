"""Dataset converters: the papers' datasets into nnU-Net's raw format (``nnunet-ext convert SOURCE``).

Every converter writes through :class:`RawDatasetWriter`: a hidden temporary folder inside
``nnUNet_raw``, moved into place only when every case converted and ``dataset.json`` is written.
"""
from nnunet_ext.conversion.ct_intensity import CTIntensity, equalize_histogram, window
from nnunet_ext.conversion.raw_dataset import ConversionSummary, RawDatasetWriter, dataset_folder_name

__all__ = ['CTIntensity', 'equalize_histogram', 'window', 'ConversionSummary', 'RawDatasetWriter',
           'dataset_folder_name']
