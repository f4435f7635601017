"""Experiments run with the engine: the paper's Table 1 (table1.py describes and reads it, table1_run.py
runs it) and the collector of the ablation runs' figures (ablations.py)."""
