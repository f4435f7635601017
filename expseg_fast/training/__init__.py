"""Training: `train(config)` runs a TrainConfig (expseg_fast/config.py), resumable, on one device or
several. The run is read in one sitting in trainer.py: start.py sets it up (data, pinned split, model,
optimizer, resume; its subjects from subject_sources.py), epoch.py trains one epoch (step.py one
step), validation.py measures it, selection.py says which figure chooses best.pt, run_state.py writes and
restores its state, reports.py draws its plots; run_folder.py guards its output folder and
distributed.py its processes."""

from expseg_fast.training.trainer import train

__all__ = ["train"]
