"""Distributed running: rank helpers, the device rule, the launcher and its outcomes, stop signals,
the per-step agreement of ranks, synchronised batch norm, CPU cores and scratch folders."""
