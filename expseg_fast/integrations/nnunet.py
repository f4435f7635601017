"""nnU-Net v2 with the exponential logarithmic loss (needs `pip install expseg_fast[nnunet]`).

`nnUNetTrainerExpLog`: nnU-Net's default trainer with its loss replaced by L_Exp (the paper's weights,
gamma 0.3, the fused op: expseg_fast.integrations.monai.ExpLogLoss), label weights from the voxel counts
of the fold's training cases (paper eq. 3), nnU-Net's own deep-supervision level weights and ignore label.
Region-based training (sigmoid outputs) is refused: the loss is a softmax over classes.

Command line, nnU-Net's own options and layout (nnUNet_raw / nnUNet_preprocessed / nnUNet_results), nothing
copied into nnU-Net's package:
    python -m expseg_fast.integrations.nnunet DATASET CONFIGURATION FOLD [nnUNetv2_train's options]
    python -m expseg_fast.integrations.nnunet predict [nnUNetv2_predict's options]
Both take -tr nnUNetTrainerExpLog unless told otherwise. Trainers are found by name among this module's,
then in the folders of nnUNet_extTrainer, then in nnU-Net's package (nnU-Net's own search walks its whole
package first, importing every trainer, some of which need timm and torchvision).
"""

from __future__ import annotations

import os
import sys

import numpy as np
import torch

try:
    from nnunetv2.inference import predict_from_raw_data
    from nnunetv2.run import run_training
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name
except ModuleNotFoundError as missing:
    _NEEDS = f"expseg_fast.integrations.nnunet needs nnU-Net v2 ({missing}): pip install 'expseg_fast[nnunet]'"
    if __name__ == "__main__":  # the command line: one line, no traceback
        raise SystemExit(f"error: {_NEEDS}") from None
    raise ModuleNotFoundError(_NEEDS, name=missing.name) from None

from expseg_fast.integrations.monai import ExpLogLoss
from expseg_fast.losses import label_weights

DEFAULT_TRAINER = "nnUNetTrainerExpLog"


def training_label_counts(trainer: nnUNetTrainer) -> torch.Tensor:
    """Voxels of each class (num_segmentation_heads,) int64 over the fold's training cases, as the trainer
    sees them (nnU-Net's -1 outside the non-zero region counts as background; the ignore label not at all)."""
    train_keys, _ = trainer.do_split()
    folder = trainer.preprocessed_dataset_folder
    dataset = infer_dataset_class(folder)(folder, train_keys,
                                          folder_with_segs_from_previous_stage=trainer.folder_with_segs_from_previous_stage)
    classes = trainer.label_manager.num_segmentation_heads
    counts = np.zeros(classes, dtype=np.int64)
    for key in train_keys:
        seg = np.asarray(dataset.load_case(key)[1][:]).reshape(-1)
        counts += np.bincount(np.clip(seg, 0, classes).astype(np.int64), minlength=classes + 1)[:classes]
    return torch.from_numpy(counts)


class nnUNetTrainerExpLog(nnUNetTrainer):  # noqa: N801 (nnU-Net's naming)
    """nnU-Net's default trainer with L_Exp (w_dice 0.8, w_cross 0.2, gamma 0.3) through the fused op."""

    def _build_loss(self) -> torch.nn.Module:
        if self.label_manager.has_regions:
            raise ValueError(f"{type(self).__name__}: region-based training (sigmoid outputs per region) is not "
                             "supported: the exponential logarithmic loss is a softmax over classes")
        try:  # label_weights names the classes that never occur
            weights = label_weights(training_label_counts(self))
        except ValueError as error:
            raise ValueError(f"{type(self).__name__}, the training cases of fold {self.fold}: {error}") from None
        self.print_to_log_file(f"L_Exp label weights from the training cases' voxel counts: {weights.tolist()}")
        ours = ExpLogLoss(weights, ignore_index=self.label_manager.ignore_label, validate="labels").to(self.device)
        default = super()._build_loss()  # nnU-Net's own: kept for its deep-supervision level weights
        if isinstance(default, DeepSupervisionWrapper):
            default.loss = ours
            return default
        return ours


def find_trainer(name: str) -> type:
    """The trainer class called `name`: this module's, then nnUNet_extTrainer's folders, then nnU-Net's."""
    if name in globals() and isinstance(globals()[name], type) and issubclass(globals()[name], nnUNetTrainer):
        return globals()[name]
    for folder in filter(None, os.environ.get("nnUNet_extTrainer", "").split(os.pathsep)):
        if os.path.isdir(folder):
            found = recursive_find_python_class(folder, name, None, base_folder=folder,
                                                cleanup_imports_from_base_folder=True)
            if found is not None:
                return found
    return recursive_find_trainer_class_by_name(name)


def main(argv: list[str]) -> None:
    """Trains (DATASET CONFIGURATION FOLD [options]) or predicts (predict [options]) with nnU-Net's entry
    points, -tr defaulting to nnUNetTrainerExpLog and trainers found by find_trainer."""
    predicting = bool(argv) and argv[0] == "predict"
    args = argv[1:] if predicting else argv
    if "-tr" not in args:
        args = [*args, "-tr", DEFAULT_TRAINER]
    run_training.recursive_find_trainer_class_by_name = find_trainer
    predict_from_raw_data.recursive_find_trainer_class_by_name = find_trainer
    sys.argv = [f"{__name__} {'predict' if predicting else ''}".strip(), *args]
    (predict_from_raw_data.predict_entry_point if predicting else run_training.run_training_entry)()


if __name__ == "__main__":
    main(sys.argv[1:])
