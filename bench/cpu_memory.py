"""Peak extra host memory of one loss forward + backward, measured in a fresh process.

Usage: python -m bench.cpu_memory BACKEND N C SIZE [DTYPE]
Prints the peak resident-set growth (MiB) over the inputs alone: the child allocates the inputs, runs
a small call first (kernels, threads), resets the kernel's peak resident set (Linux /proc/self/clear_refs),
runs forward + backward once, and reports the new peak (VmHWM) minus the resident set before (VmRSS).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def measure(backend: str, n: int, c: int, size: int, dtype: str = "float32") -> float:
    """Peak extra MiB of forward + backward of exp_log_loss on (n, c, size^3) logits."""
    out = subprocess.run(
        [sys.executable, "-m", "bench.cpu_memory", backend, str(n), str(c), str(size), dtype],
        cwd=Path(__file__).parents[1],
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
    before = reset_peak_kib()
    exp_log_loss(logits, target, backend=backend).backward()
    print(json.dumps({"peak_extra_mib": (status_kib("VmHWM") - before) / 1024.0}))


def status_kib(field: str, pid: int | str = "self") -> int:
    """A field of /proc/PID/status (VmRSS, VmHWM, RssAnon, ...) in KiB (this process by default)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/{pid}/status")


def reset_peak_kib() -> int:
    """Resets the peak resident set (VmHWM) to the current one and returns that, in KiB."""
    Path("/proc/self/clear_refs").write_text("5")
    return status_kib("VmRSS")


if __name__ == "__main__":
    b, n_, c_, s_ = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    _child(b, n_, c_, s_, sys.argv[5] if len(sys.argv) > 5 else "float32")
