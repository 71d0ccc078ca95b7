"""Plant sensor readings for the query benchmarks, written as Parquet in chunks, and the aggregates they ask for.

The same ``seed`` gives the same file, so the node, federation and end-to-end
benchmarks read reproducible data.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

CHUNK_ROWS = 1_000_000
START = np.datetime64("2024-03-04T00:00:00", "s")
# Per group: count, and mean, std, min and max of temperature (every query benchmark asks for these).
TEMPERATURE_AGGREGATES: list[dict[str, Any]] = [
    {"op": "count"},
    {"op": "mean", "column": "temperature"},
    {"op": "std", "column": "temperature"},
    {"op": "min", "column": "temperature"},
    {"op": "max", "column": "temperature"},
]
SCHEMA = pa.schema([
    ("line", pa.string()), ("machine", pa.string()), ("ts", pa.timestamp("us")), ("temperature", pa.float64()),
    ("vibration", pa.float64()), ("parts", pa.int32()), ("defect", pa.bool_()),
])


def generate(path: Path, rows: int, *, seed: int, lines: int = 8, machines: int = 12, days: int = 14) -> None:
    """Plant sensor readings, written in chunks: each (line, machine) runs at its own temperature and drift."""
    rng = np.random.default_rng(seed)
    line_names = np.array([f"L{seed % 97:02d}-{i + 1}" for i in range(lines)], dtype=object)
    machine_names = np.array([f"M{i + 1:02d}" for i in range(machines)], dtype=object)
    base = rng.normal(60, 6, size=(lines, machines))
    span_s = days * 86_400
    with pq.ParquetWriter(path, SCHEMA, compression="snappy") as writer:
        for start in range(0, rows, CHUNK_ROWS):
            n = min(CHUNK_ROWS, rows - start)
            li = rng.integers(0, lines, n)
            mi = rng.integers(0, machines, n)
            offset = np.sort(rng.integers(0, span_s, n))
            daily = 3 * np.sin(2 * np.pi * (offset % 86_400) / 86_400)
            temperature = base[li, mi] + daily + rng.normal(0, 1.5, n)
            temperature[rng.random(n) < 0.002] = np.nan  # sensor dropouts
            vibration = rng.gamma(2.0, 0.4 + 0.05 * mi, n)
            table = pa.table({
                "line": line_names[li], "machine": machine_names[mi], "ts": START + offset.astype("timedelta64[s]"),
                "temperature": temperature, "vibration": vibration,
                "parts": rng.poisson(12, n).astype(np.int32), "defect": rng.random(n) < 0.01 + 0.002 * li,
            }, schema=SCHEMA)
            writer.write_table(table, row_group_size=CHUNK_ROWS)
