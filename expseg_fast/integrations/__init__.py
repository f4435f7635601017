"""The loss family where users already train: MONAI's loss conventions (`monai`, no MONAI import needed)
and an nnU-Net v2 trainer (`nnunet`, needs `pip install expseg_fast[nnunet]`)."""
