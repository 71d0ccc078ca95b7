"""Sync throughput at N simulated nodes; see ``benchmarks.sync.run``."""
