"""The Triton kernels' offset arithmetic where products of sizes pass 2^31 (N * C * V >= 2^31, e.g.
8 samples x 20 labels x 256^3), checked on the offsets alone (no such tensor is allocated): a probe
kernel calls the kernels' own offset helpers with the program id as the sample index, as they do.
On the CPU under the Triton interpreter (int32 products wrap there as on a GPU), on CUDA otherwise."""

from __future__ import annotations

import pytest
import torch
from helpers import needs_triton_cpu

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")
from expseg_fast.kernels.explog import _label_offsets  # noqa: E402  (after the skip)

N, C, D, H, W = 8, 20, 256, 256, 256
V = D * H * W
BLOCK_V = 16


@triton.jit
def _probe_kernel(out_ptr, v0, H, W, sn, sc, sd, sh, sw, C: tl.constexpr, PACKED: tl.constexpr,
                  BLOCK_C: tl.constexpr, BLOCK_V: tl.constexpr):
    n = tl.program_id(1)  # int32, as in the kernels
    c = tl.arange(0, BLOCK_C)
    k = tl.arange(0, BLOCK_V)
    offs = _label_offsets(n, c, v0 + k, C, H, W, sn, sc, sd, sh, sw, False, PACKED)
    mask = (c[:, None] < C) & (k[None, :] < BLOCK_V)
    tl.store(out_ptr + (n * C + c[:, None]) * BLOCK_V + k[None, :], offs, mask=mask)


def probe(device: str, strides: tuple[int, ...], packed: bool, last_voxels: bool) -> torch.Tensor:
    """Offsets (N, C, BLOCK_V) int64 of labels 0..C-1 at BLOCK_V voxels of each sample, as the kernels
    compute them for logits of these strides; the first voxels, or the last ones."""
    kernel = _probe_kernel
    out = torch.full((N, C, BLOCK_V), -1, dtype=torch.int64, device=device)
    v0 = V - BLOCK_V if last_voxels else 0
    kernel[(1, N)](out, v0, H, W, *strides, C=C, PACKED=packed, BLOCK_C=32, BLOCK_V=BLOCK_V)
    return out


def expected(strides: tuple[int, ...], last_voxels: bool) -> torch.Tensor:
    sn, sc, sd, sh, sw = strides
    v = torch.arange(BLOCK_V, dtype=torch.int64) + (V - BLOCK_V if last_voxels else 0)
    voxel = (v // (H * W)) * sd + ((v // W) % H) * sh + (v % W) * sw
    n = torch.arange(N, dtype=torch.int64)[:, None, None]
    c = torch.arange(C, dtype=torch.int64)[None, :, None]
    return n * sn + c * sc + voxel[None, None, :]


@needs_triton_cpu
@pytest.mark.parametrize("layout", ["ncdhw", "cl3d-packed", "cl3d-strided"])
@pytest.mark.parametrize("last_voxels", [False, True], ids=["first", "last"])
def test_offsets_past_two_to_the_31(layout, last_voxels):
    contiguous = (C * V, V, H * W, W, 1)
    channels_last = (C * V, 1, H * W * C, W * C, C)
    strides = contiguous if layout == "ncdhw" else channels_last
    got = probe("cpu", strides, layout == "cl3d-packed", last_voxels)
    want = expected(strides, last_voxels)
    assert int(want.max()) > 2**31  # the case the test is about
    assert torch.equal(got, want)


def test_voxels_per_sample_beyond_the_bound_are_refused():
    from expseg_fast.kernels.explog import MAX_VOXELS, _geometry

    logits = torch.empty((1, 2, 1, 1, MAX_VOXELS + 1), device="meta")
    with pytest.raises(ValueError, match="exceed the Triton kernels' bound"):
        _geometry(logits, torch.empty((1, 1, 1, MAX_VOXELS + 1), device="meta", dtype=torch.long))
