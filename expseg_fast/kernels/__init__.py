"""Triton kernels. Imported lazily: triton is optional on machines that only use the native op."""

from __future__ import annotations

import os

import torch


def triton_available(device: torch.device) -> bool:
    """The Triton backend runs on CUDA, and on the CPU only under TRITON_INTERPRET=1 (for tests)."""
    if device.type == "cuda":
        pass
    elif device.type != "cpu" or os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
