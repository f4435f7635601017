"""Peak extra host memory of one loss forward + backward, measured in a fresh process.

Usage: python bench/cpu_memory.py BACKEND N C SIZE [DTYPE]
Prints the peak resident-set growth (MiB) over the inputs alone: the child allocates the inputs,
records ru_maxrss, runs forward + backward once, and reports the new ru_maxrss minus the old.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys


def measure(backend: str, n: int, c: int, size: int, dtype: str = "float32") -> float:
    """Peak extra MiB of forward + backward of exp_log_loss on (n, c, size^3) logits."""
    out = subprocess.run(
        [sys.executable, __file__, backend, str(n), str(c), str(size), dtype],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_extra_mib"]


def _child(backend: str, n: int, c: int, size: int, dtype: str) -> None:
    import torch

    from expseg_fast.losses import exp_log_loss

    torch.manual_seed(0)
    logits = torch.randn(n, c, size, size, size).to(getattr(torch, dtype)).requires_grad_(True)
    target = torch.randint(0, c, (n, size, size, size))
    small = torch.randn(1, c, 4, 4, 4).requires_grad_(True)  # load kernels, start threads
    exp_log_loss(small, target[:, :4, :4, :4], backend=backend).backward()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    exp_log_loss(logits, target, backend=backend).backward()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"peak_extra_mib": (after - before) / 1024.0}))


if __name__ == "__main__":
    b, n_, c_, s_ = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    _child(b, n_, c_, s_, sys.argv[5] if len(sys.argv) > 5 else "float32")
