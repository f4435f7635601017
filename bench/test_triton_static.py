"""bench/triton_static.py compiles the Triton kernels for sm_90 without a GPU; this checks two claims
bench/NOTES.md makes from it: packed channels-last logits load as vectors, and the row design's
gradient kernel needs no cross-thread work on contiguous logits."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

PROBE = """
import json
from bench import triton_static
from expseg_fast.kernels import explog
extra = {"NEED_CROSS": True, "DETERMINISTIC": False}
print(json.dumps({
    "tiles_stats_cl3d": triton_static.compile_kernel(explog._stats_kernel, True, 64, 2, 90, extra),
    "rows_grad_ncdhw": triton_static.compile_kernel(explog._grad_rows_kernel, False, 256, 4, 90, extra),
}))
"""


def test_static_profile_of_two_kernels():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # compile, do not interpret
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    run = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    profile = json.loads(run.stdout.strip().splitlines()[-1])
    tiles = profile["tiles_stats_cl3d"]
    assert tiles["loads"].get("LDG.E.64", 0) > 0 and "LDG.E.U16" not in tiles["loads"], tiles["loads"]
    rows = profile["rows_grad_ncdhw"]
    assert rows["SHFL"] == 0 and rows["BAR"] == 0 and rows["spill_bytes"] == 0, rows
    assert rows["stores"], rows
