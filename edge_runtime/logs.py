"""The node's log lines: one event per line, UTC timestamps (the agent's and its serving workers')."""

from __future__ import annotations

import datetime as dt
import logging


class OneLineFormatter(logging.Formatter):
    """One event per line, whatever the message or traceback contains."""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace("\n", " | ")

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802 - logging API
        return dt.datetime.fromtimestamp(record.created, dt.UTC).isoformat(timespec="milliseconds")
