"""What this machine's processor is and can do, from Linux's /proc/cpuinfo (empty answers elsewhere)."""

from __future__ import annotations

import platform
from pathlib import Path

BF16_UNITS = ("avx512_bf16", "amx_bf16")  # CPU flags of native bf16 multiplication


def _cpuinfo() -> str:
    try:
        return Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""


def _field(cpuinfo: str, name: str) -> str | None:
    return next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines() if line.split(":", 1)[0].strip() == name), None)


def processor_name() -> str:
    """The CPU's model name (Linux), else what platform reports."""
    return _field(_cpuinfo(), "model name") or platform.processor() or platform.machine()


def cpu_bf16_units(cpuinfo: str | None = None) -> list[str]:
    """The BF16_UNITS this processor has (cpuinfo: the text of /proc/cpuinfo, default this machine's)."""
    flags = (_field(_cpuinfo() if cpuinfo is None else cpuinfo, "flags") or "").split()
    return [unit for unit in BF16_UNITS if unit in flags]
