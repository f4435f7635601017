"""Benchmarks: an importable package (run its scripts as `python -m bench.NAME` from the repository
root). The benchmarks measure, baseline and engine in the same run; the product's claims are tested
under tests/. timing.py is the one timing helper."""
