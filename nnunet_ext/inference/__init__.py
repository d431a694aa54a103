"""Prediction workflows built on nnU-Net's own predictor: the liver-then-tumour cascade, fusion of
multi-view 2D predictions, pruned ANU-Net inference."""
