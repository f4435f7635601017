"""The native extension expseg_fast._C (csrc/), loaded once for every op's module: loading it registers
torch.ops.expseg_fast.*. LOAD_ERROR says why it could not be loaded (None where it was)."""

from __future__ import annotations

import torch

try:
    from expseg_fast import _C  # noqa: F401  (loading it registers torch.ops.expseg_fast.*)

    LOAD_ERROR: ImportError | None = None
except ImportError as error:  # not built: each op's module says so when asked for it
    LOAD_ERROR = error


def kernel_device_types(op: str) -> frozenset[str]:
    """The device types ("cpu", "cuda") with a kernel for expseg_fast::op: none where the extension is not
    built or was built before the op. Callers keep the answer from import on, so torch.compile traces a
    constant."""
    if LOAD_ERROR is not None or not hasattr(torch.ops.expseg_fast, op):
        return frozenset()
    has = torch._C._dispatch_has_kernel_for_dispatch_key
    return frozenset(kind for kind, key in (("cpu", "CPU"), ("cuda", "CUDA")) if has(f"expseg_fast::{op}", key))
