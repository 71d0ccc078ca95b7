"""Benchmarks of Edgewise, run on demand (see ``benchmarks/README.md``).

Each benchmark builds its own environment (database, data dir, processes),
measures against a baseline in the same run, and writes a JSON report to
``benchmarks/results/``.
"""
