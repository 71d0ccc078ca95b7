"""How the node opens its local SQLite stores (query outbox, telemetry queue, audit chain).

Every connection is in autocommit mode (transactions are explicit, see
:func:`immediate`), in WAL journal mode (readers never block the writer, and
separate processes may share a file), with the ``synchronous`` level its
store asks for: ``FULL`` makes each commit durable when it returns,
``NORMAL`` may lose the last commits on a power cut but never corrupts the
file. ``timeout`` is how long a connection waits for another writer's lock.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

Synchronous = Literal["FULL", "NORMAL"]


def connect(path: Path, *, synchronous: Synchronous = "FULL", timeout: float = 30.0,
            schema: str | None = None) -> sqlite3.Connection:
    """A connection to the store at ``path``, set up as the module doc says; ``schema`` run first if given."""
    conn = sqlite3.connect(path, timeout=timeout, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={synchronous}")
        if schema is not None:
            conn.executescript(schema)
    except BaseException:
        conn.close()
        raise
    return conn


@contextlib.contextmanager
def connection(path: Path, *, synchronous: Synchronous = "FULL", timeout: float = 30.0) -> Iterator[sqlite3.Connection]:
    """A connection for one operation, closed afterwards: safe from any thread or process."""
    conn = connect(path, synchronous=synchronous, timeout=timeout)
    try:
        yield conn
    finally:
        conn.close()


@contextlib.contextmanager
def immediate(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction (``BEGIN IMMEDIATE``: writers queue up front); rolled back on any exception."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")
