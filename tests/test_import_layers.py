"""Imports point one way (DESIGN.md section 1): every module imports only from layers below its own, so
inference and training never load each other, the kernels load nothing above them, and reading results
does not load the trainer. Read from the source (every module's imports), and checked in fresh
interpreters for what actually loads."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).parents[1] / "expseg_fast"
# The layers, lowest first; a unit (a package or a root module) imports only from lower layers.
LAYERS = [
    {"_C"},
    {"numerics", "op_contract", "extension", "atomic", "machine", "metrics"},
    {"kernels", "runlog"},
    {"losses", "models", "data"},
    {"config"},
    {"checkpoint"},
    {"training", "inference", "integrations"},
    {"experiments"},
    {"__init__"},
]
RANK = {unit: rank for rank, units in enumerate(LAYERS) for unit in units}


def unit_of(module: str) -> str:
    """expseg_fast.data.cache -> data; expseg_fast.config -> config; expseg_fast -> __init__."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports_of(path: Path) -> set[str]:
    """The expseg_fast modules a file imports (from-imports of the package name their module)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            if node.module == "expseg_fast":
                names |= {f"expseg_fast.{alias.name}" for alias in node.names}
    return {n for n in names if n.startswith("expseg_fast.")}


def test_every_import_points_down_a_layer():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        source = unit_of(module)
        assert source in RANK, f"{path}: {source} is in no layer of this test"
        for imported in imports_of(path):
            target = unit_of(imported)
            if target != source and not RANK[target] < RANK[source]:
                wrong.append(f"{module} imports {imported}")
    assert not wrong, wrong


def test_the_rule_catches_an_upward_import(tmp_path):
    """The check above can fail: a kernel importing the loss API is seen."""
    bad = tmp_path / "bad.py"
    bad.write_text("from expseg_fast.losses import loss\nimport expseg_fast.training.trainer\n")
    assert imports_of(bad) == {"expseg_fast.losses", "expseg_fast.training.trainer"}
    assert not RANK[unit_of("expseg_fast.losses")] < RANK["kernels"]
    assert not RANK[unit_of("expseg_fast.training.trainer")] < RANK["inference"]


def loaded_after(module: str) -> set[str]:
    code = f"import sys, {module}; print(' '.join(m for m in sys.modules if m.startswith('expseg_fast')))"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    return set(out.split())


@pytest.mark.parametrize("module", ["expseg_fast.inference.files", "expseg_fast.inference.evaluation",
                                    "expseg_fast.experiments.table1", "expseg_fast.checkpoint"])
def test_inference_and_results_do_not_load_the_trainer(module):
    assert not {m for m in loaded_after(module) if m.startswith("expseg_fast.training")}
