"""Celery tasks of federated queries: thin, idempotent, one service call each."""

from __future__ import annotations

from celery import shared_task

from queries.services.lifecycle import query_expire


@shared_task(name="queries.query_expire", ignore_result=True)
def query_expire_task() -> int:
    # Beat runs this every few seconds; the service is safe to run twice and beside deliveries and answers.
    return query_expire()
