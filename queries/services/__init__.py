"""Writes of federated queries, and the errors they refuse with.

Each write runs in one transaction with its audit events. A query is a
state machine stored in the database (:mod:`queries.models` holds the
states): created (:mod:`.lifecycle`), offered to its nodes on every sync
until they answer, answered once per site (:mod:`.results`: a repeat is
acknowledged and ignored), timed out past its deadline, and merged exactly
when every site is final. The dataset catalog is kept by :mod:`.catalog`.

Lock order, everywhere: the query row, then its sites' rows; so delivery,
answers and expiry of one query never deadlock.
"""

from __future__ import annotations


class QueriesError(Exception):
    """A refused request; ``status`` is the HTTP status a view answers with, ``field`` what is wrong."""

    status = 400

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class QueryForbidden(QueriesError):
    status = 403


class QueryNotFound(QueriesError):
    status = 404

