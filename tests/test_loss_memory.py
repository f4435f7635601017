"""The loss's memory claim (bench/NOTES.md), tested here; bench/cpu_memory.py measures it."""

from __future__ import annotations

from bench.cpu_memory import measure


def test_native_extra_memory_is_at_most_a_quarter_of_the_references():
    """bench/NOTES.md's memory claim: the peak extra host memory of forward + backward at
    (1, 20, 64^3) fp32, each backend in a fresh process. The native op needs little beyond the
    gradient it returns (20 MiB here); the reference keeps several C*V intermediates for autograd."""
    native, reference = measure("native", 1, 20, 64), measure("reference", 1, 20, 64)
    gradient_mib = 20 * 64**3 * 4 / 2**20
    assert native <= reference / 4, (native, reference)
    assert gradient_mib * 0.9 <= native <= gradient_mib * 1.5, native  # the gradient, and little else
