"""Inference: the Predictor (one fixed input shape, mixed precision, channels-last, CUDA graph), sliding
windows over whole scans, the NIfTI pipeline of segment.py (files.py) and the evaluation of a run on its
validation subjects' own grids (evaluation.py)."""

from expseg_fast.inference.predictor import Predictor

__all__ = ["Predictor"]
