"""What this machine is and can do: its processor, from Linux's /proc/cpuinfo (empty answers elsewhere),
and the torch device a command runs on."""

from __future__ import annotations

import ctypes
import platform
from pathlib import Path

import torch

BF16_UNITS = ("avx512_bf16", "amx_bf16")  # CPU flags of native bf16 multiplication
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
KEEP_BELOW = 1 << 30  # bytes: allocations under this come from (and return to) the process's own heap


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _field(cpuinfo: str, name: str) -> str | None:
    return next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                 if line.split(":", 1)[0].strip() == name), None)


def processor_name() -> str:
    """The CPU's model name (Linux), else what platform reports."""
    return _field(_cpuinfo(), "model name") or platform.processor() or platform.machine()


def cpu_bf16_units(cpuinfo: str | None = None) -> list[str]:
    """The BF16_UNITS this processor has (cpuinfo: the text of /proc/cpuinfo, default this machine's)."""
    flags = (_field(_cpuinfo() if cpuinfo is None else cpuinfo, "flags") or "").split()
    return [unit for unit in BF16_UNITS if unit in flags]


def torch_device(name: str) -> torch.device:
    """The device a `--device NAME` runs on: `auto` is CUDA where torch sees a GPU, else the CPU; any
    other torch device name as is. ValueError, one line, for a name torch does not know or CUDA where
    torch sees none."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"device must be auto, cpu or cuda, got {name!r}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name}: torch sees no CUDA device on this machine (use cpu or auto)")
    return device


def keep_freed_memory() -> bool:
    """Have glibc's malloc keep what this process frees for its next allocations (allocations under
    KEEP_BELOW from its heap, which is not trimmed until KEEP_BELOW lies free at its top) instead of
    returning every block over 32 MB to the system and faulting fresh zeroed pages in at the next: a
    training step on the CPU allocates and frees the same activations each time (bench/NOTES.md). The
    process then holds its peak memory, as PyTorch's CUDA allocator does on a GPU. Process-wide; True
    where it applied (Linux with glibc), False elsewhere (nothing changed)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, KEEP_BELOW)) and bool(mallopt(_M_TRIM_THRESHOLD, KEEP_BELOW))
