"""Measurements: the pretrain loader alone, the training step alone, Sinkhorn, and report helpers.

``swavctl bench data`` and ``swavctl bench step`` call :func:`swavctl.bench.data.bench_data` and
:func:`swavctl.bench.step.bench_step`; the scripts under ``bench/`` compare them with baselines
and write ``docs/benchmarks.md`` through :mod:`swavctl.bench.report`.
"""
