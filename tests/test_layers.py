"""Imports point one way (DESIGN.md section 1): inference and the Table 1 reader do not load the
trainer, and the kernels do not load the loss API above them. Checked in fresh interpreters."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest


def loaded_after(module: str) -> set[str]:
    code = f"import sys, {module}; print(' '.join(m for m in sys.modules if m.startswith('expseg_fast')))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return set(out.split())


@pytest.mark.parametrize("module", ["expseg_fast.infer_files", "expseg_fast.table1", "expseg_fast.checkpoint"])
def test_inference_and_results_do_not_load_the_trainer(module):
    assert "expseg_fast.train" not in loaded_after(module)


def imported_by(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_kernels_do_not_import_the_loss_api_or_anything_above():
    kernels = Path(__file__).parents[1] / "expseg_fast" / "kernels"
    for path in kernels.glob("*.py"):
        above = {m for m in imported_by(path) if m.startswith("expseg_fast.") and not m.startswith(
            ("expseg_fast.kernels", "expseg_fast.numerics"))}
        assert not above, (path.name, above)
