"""Shape rules shared by the networks."""

from __future__ import annotations


def check_spatial_shape(shape, levels: int, name: str = "image") -> None:
    """Raise ValueError unless shape is (N, C, D, H, W) with D, H, W multiples of 2^(levels - 1)."""
    factor = 2 ** (levels - 1)
    if len(shape) != 5 or any(s % factor or s == 0 for s in tuple(shape)[2:]):
        raise ValueError(
            f"{name} must be (N, C, D, H, W) with D, H and W positive multiples of {factor} "
            f"({levels - 1} halvings), got {tuple(shape)}; pad or resize the volume first"
        )
