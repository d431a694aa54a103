"""``nnunet-ext study``: trainers x configurations x folds x seeds from one spec, locally or on SLURM."""
