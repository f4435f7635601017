import os
import sys
from pathlib import Path

import torch

# Without a GPU the Triton kernels run (and are tested) in Triton's interpreter. Set before any
# kernel is defined: triton.jit reads it when it wraps a function.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).parent))
