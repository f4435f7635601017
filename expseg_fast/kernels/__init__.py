"""Triton kernels. Imported lazily: triton is optional on machines that only use the native op."""

from __future__ import annotations

import importlib.util
import os

import torch


def triton_available(device: torch.device) -> bool:
    """The Triton backend runs on CUDA, and on the CPU only under TRITON_INTERPRET=1 (for tests)."""
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    if device.type not in ("cpu", "cuda"):
        return False
    return importlib.util.find_spec("triton") is not None
