import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

# Without a GPU the Triton kernels run (and are tested) in Triton's interpreter. Set before any
# kernel is defined: triton.jit reads it when it wraps a function.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(autouse=True)
def _default_triton_tuning():
    """Every test starts and ends with the Triton kernels' default launch configuration."""
    if importlib.util.find_spec("triton") is None:
        yield
        return
    from expseg_fast.kernels import explog

    saved = dict(explog.TUNING)
    yield
    explog.TUNING.clear()
    explog.TUNING.update(saved)
