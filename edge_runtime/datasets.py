"""The node's side of federated queries: receive, run once, answer, and keep the answer until it is delivered.

:class:`DatasetService` plugs into the agent in two ways:

* as a :class:`~edge_runtime.agent.Reconciler` named ``datasets``: each
  applied desired state brings the site's data policy and facts (the signed
  ``policy["data"]`` part, see :func:`data_policy_from_bundle`), and the node
  reports its catalog (schemas and row counts, never rows) as
  ``actual.detail["datasets"]`` on every sync;
* as what the agent hands the queries of each sync answer to
  (:meth:`DatasetService.queries_received`).

Each query runs in a worker thread (``run_query`` is synchronous and
CPU-bound), at most ``workers`` at a time, under the policy in force when it
starts; the engine writes the query and its decision to the node's audit
chain. Guarantees:

* **at most once per query id, across restarts**: an id is written to the
  outbox (``<state_dir>/queries.sqlite3``) before it runs. The control plane
  offers a query on every sync until it has the answer, so a repeated offer
  is ignored; a query that was running when the node stopped is not run
  again but answered with an error saying so;
* **store and forward**: the answer is written to the outbox before it is
  posted; posting retries with back-off while the control plane is out of
  reach, and every successful sync (the control plane is back) posts what
  waits at once. The control plane stores an answer once however often it
  arrives; a 404 (the query is closed or unknown) ends the retries.

Answered ids are kept for :data:`KEEP_ANSWERED_S` after delivery, long enough
for any offer already on its way to be recognised.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from pydantic import ValidationError

from edge_runtime import __version__, sqlite
from edge_runtime.audit import NodeAudit
from edge_runtime.data.catalog import Catalog
from edge_runtime.data.compute import Scorer
from edge_runtime.data.engine import run_query, spec_digest
from edge_runtime.data.wire import QueryResult
from edge_runtime.policy.data import DataPolicy, SiteFacts
from edge_runtime.protocol import API_PREFIX, DesiredState, QueryRequest

logger = logging.getLogger("edge_runtime.datasets")

OUTBOX_FILE = "queries.sqlite3"
KEEP_ANSWERED_S = 7 * 86_400
RETRY_BASE_S = 1.0
RETRY_MAX_S = 60.0
# A catalog report older than this is read again (row counts change as files grow).
REPORT_MAX_AGE_S = 30.0
HTTP_TIMEOUT = httpx.Timeout(30.0, connect=5.0)
# Statuses after which posting again cannot help: the query is gone (404, 410) or the answer can never be taken.
FINAL_REFUSALS = frozenset({400, 404, 409, 410, 413, 422})

_SCHEMA = """
CREATE TABLE IF NOT EXISTS queries (
    query_id TEXT PRIMARY KEY,
    -- running: started, no answer yet; waiting: answered, not delivered; delivered: the control plane has it
    state TEXT NOT NULL,
    result TEXT,
    received_at REAL NOT NULL,
    delivered_at REAL
);
"""


def data_policy_from_bundle(policy: dict[str, Any], site: str) -> tuple[DataPolicy, SiteFacts, dict[str, Any]]:
    """The data policy, site facts and policy reference in a desired state's ``policy`` bundle.

    ``policy["data"]`` is ``{"policy": DataPolicy, "facts": SiteFacts, "version": n, "rule": name}``. A bundle
    without it (a control plane that has no data policy yet) gives the default policy, which lets no dataset be
    queried: a node never answers more than its site's policy says.
    """
    part = policy.get("data")
    if not isinstance(part, dict):
        return DataPolicy(), SiteFacts(site=site), {"version": 0, "rule": None}
    data_policy = DataPolicy.model_validate(part.get("policy") or {})
    facts = SiteFacts.model_validate({"site": site, **(part.get("facts") or {})})
    return data_policy, facts, {"version": part.get("version", 0), "rule": part.get("rule")}


class Outbox:
    """Query ids this node has taken, and answers waiting for delivery, in a SQLite file of the state dir."""

    def __init__(self, path: Path) -> None:
        self.path = path
        sqlite.connect(self.path, synchronous="FULL", schema=_SCHEMA).close()

    def _connect(self) -> contextlib.AbstractContextManager[sqlite3.Connection]:
        return sqlite.connection(self.path, synchronous="FULL")

    def take(self, query_id: str) -> bool:
        """Record that ``query_id`` starts now; False if this node took it before (it must not run again)."""
        with self._connect() as conn:
            cursor = conn.execute("INSERT OR IGNORE INTO queries (query_id, state, received_at) VALUES (?, ?, ?)",
                                  (query_id, "running", time.time()))
            return cursor.rowcount == 1

    def answer(self, result: QueryResult) -> None:
        with self._connect() as conn:
            conn.execute("UPDATE queries SET state = 'waiting', result = ? WHERE query_id = ?",
                         (result.model_dump_json(), result.query_id))

    def interrupted(self) -> list[str]:
        """Ids that were running when the node last stopped."""
        with self._connect() as conn:
            return [r[0] for r in conn.execute("SELECT query_id FROM queries WHERE state = 'running'")]

    def waiting(self) -> list[QueryResult]:
        with self._connect() as conn:
            rows = conn.execute("SELECT result FROM queries WHERE state = 'waiting' ORDER BY received_at").fetchall()
        return [QueryResult.model_validate_json(r[0]) for r in rows]

    def delivered(self, query_id: str) -> None:
        now = time.time()
        with self._connect() as conn:
            conn.execute("UPDATE queries SET state = 'delivered', result = NULL, delivered_at = ? WHERE query_id = ?",
                         (now, query_id))
            conn.execute("DELETE FROM queries WHERE state = 'delivered' AND delivered_at < ?",
                         (now - KEEP_ANSWERED_S,))

    def state(self, query_id: str) -> str | None:
        with self._connect() as conn:
            row = conn.execute("SELECT state FROM queries WHERE query_id = ?", (query_id,)).fetchone()
        return None if row is None else str(row[0])


class DatasetService:
    """The agent's ``datasets`` plug-in: reports this node's datasets and runs its federated queries (see the
    module doc); one per agent.
    """

    name = "datasets"

    def __init__(self, *, state_dir: Path, catalog: Catalog, audit: NodeAudit, base_url: str, node_id: str,
                 credential: str, site: str, scorer: Scorer | None = None, workers: int = 2,
                 client: httpx.AsyncClient | None = None, rng: random.Random | None = None,
                 offline: bool = False) -> None:
        if workers < 1:
            raise ValueError(f"workers must be at least 1, not {workers}")
        self.catalog = catalog
        self.audit = audit
        self.scorer = scorer
        self.outbox = Outbox(state_dir / OUTBOX_FILE)
        self.result_url = f"{base_url.rstrip('/')}{API_PREFIX}/nodes/{node_id}/queries/{{query_id}}/result"
        self.credential = credential
        self.policy = DataPolicy()
        self.facts = SiteFacts(site=site)
        self.policy_ref: dict[str, Any] = {"version": 0, "rule": None}
        self.workers = workers
        # Offline (an air-gapped node): answers wait in the outbox for the next bundle out, never posted.
        self.offline = offline
        self.rng = rng or random.Random()  # noqa: S311 - jitter, not secrets
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="query")
        self._slots: asyncio.Semaphore | None = None
        self._running: dict[str, asyncio.Task[None]] = {}
        self._client = client
        self._owns_client = client is None
        self._flush_wake: asyncio.Event | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._report: dict[str, Any] = {"datasets": [], "errors": {}}
        self._report_at = 0.0
        self._refresh: asyncio.Task[None] | None = None
        self._recovered = False

    # the agent's hooks ------------------------------------------------------------

    async def reconcile(self, desired: DesiredState) -> dict[str, Any]:
        """Adopt the data policy of ``desired`` (refused whole if malformed: the last good one stays)."""
        try:
            policy, facts, ref = data_policy_from_bundle(desired.policy, desired.site)
        except ValidationError as exc:
            raise ValueError(f"the data policy in desired state {desired.generation} is not valid: "
                             f"{exc.errors()[0]['msg']}") from exc
        self.policy, self.facts, self.policy_ref = policy, facts, ref
        await self._read_report()
        self._recover()
        return self.report()

    def report(self) -> dict[str, Any]:
        """What ``actual.detail["datasets"]`` carries: schemas and errors by dataset, and the policy in force."""
        if time.monotonic() - self._report_at > REPORT_MAX_AGE_S and self._refresh is None:
            with contextlib.suppress(RuntimeError):  # no running loop: the cached report will do
                self._refresh = asyncio.get_running_loop().create_task(self._read_report())
                self._refresh.add_done_callback(self._refreshed)
        return {**self._report, "policy": dict(self.policy_ref)}

    def queries_received(self, queries: list[QueryRequest]) -> None:
        """The queries of a sync answer: start the new ones. Called after every successful sync, which also
        means the control plane is reachable, so answers waiting in the outbox go out now."""
        self._recover()
        for query in queries:
            if query.query_id in self._running:
                continue
            if not self.outbox.take(query.query_id):
                logger.debug("query %s offered again; this node has taken it already", query.query_id)
                continue
            logger.info("query %s received (spec %s)", query.query_id, spec_digest(query.spec)[:12])
            self._running[query.query_id] = asyncio.get_running_loop().create_task(
                self._run(query), name=f"query-{query.query_id}")
        self._wake_flusher()

    def answers_delivered(self, query_ids: list[str]) -> None:
        """The control plane holds these answers (a bundle's receipt said so): they leave the outbox."""
        for query_id in query_ids:
            if self.outbox.state(query_id) == "waiting":
                self.outbox.delivered(query_id)
                logger.info("answer to query %s delivered by bundle", query_id)

    async def aclose(self) -> None:
        tasks = [*self._running.values(), *(t for t in (self._flusher, self._refresh) if t is not None)]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # A query still in a worker thread finishes there; its id stays "running" and is answered as interrupted
        # after the restart.
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self._client is not None and self._owns_client:
            await self._client.aclose()

    # running ----------------------------------------------------------------------

    def _recover(self) -> None:
        """Once per process: queries that were running when the node stopped are answered, never re-run."""
        if self._recovered:
            return
        self._recovered = True
        for query_id in self.outbox.interrupted():
            if query_id in self._running:
                continue
            logger.warning("query %s was running when the node stopped; answering with an error", query_id)
            self.outbox.answer(QueryResult(query_id=query_id, site=self.facts.site, status="error",
                                           reason="the node stopped while running this query; it is not run "
                                                  "twice"))

    async def _run(self, query: QueryRequest) -> None:
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.workers)
        try:
            async with self._slots:
                job = functools.partial(run_query, query.spec, catalog=self.catalog, policy=self.policy,
                                        site_facts=self.facts, scorer=self.scorer, audit=self.audit,
                                        query_id=query.query_id, deadline=query.deadline)
                result = await asyncio.get_running_loop().run_in_executor(self._pool, job)
            self.outbox.answer(result)
            logger.info("query %s %s%s in %.0f ms", query.query_id, result.status,
                        f" ({result.rule or result.field}: {result.reason})" if result.status != "answered" else "",
                        result.elapsed_ms)
        finally:
            self._running.pop(query.query_id, None)
        self._wake_flusher()

    # delivering -------------------------------------------------------------------

    def _wake_flusher(self) -> None:
        if self.offline:
            return
        if self._flush_wake is None:
            self._flush_wake = asyncio.Event()
        self._flush_wake.set()
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush_loop(), name="query-answers")

    async def _flush_loop(self) -> None:
        assert self._flush_wake is not None
        attempt = 0
        while True:
            await self._flush_wake.wait()
            self._flush_wake.clear()
            if await self.flush():
                attempt = 0
                continue
            # Full jitter, as the agent's sync back-off; a successful sync wakes this sooner.
            delay = self.rng.uniform(0.0, min(RETRY_MAX_S, RETRY_BASE_S * 2 ** min(attempt, 16)))
            attempt += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._flush_wake.wait(), timeout=delay)
            self._flush_wake.set()

    async def flush(self) -> bool:
        """Post every answer waiting in the outbox; True when none is left to retry."""
        for result in self.outbox.waiting():
            if not await self._post(result):
                return False
        return True

    async def _post(self, result: QueryResult) -> bool:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=HTTP_TIMEOUT, headers={
                "Authorization": f"Bearer {self.credential}", "User-Agent": f"edgewise-edge-runtime/{__version__}"})
        url = self.result_url.format(query_id=result.query_id)
        try:
            response = await self._client.post(url, content=result.model_dump_json(),
                                               headers={"Content-Type": "application/json"})
        except httpx.HTTPError as exc:
            logger.warning("answer to query %s not delivered (%s); kept for later", result.query_id,
                           str(exc) or type(exc).__name__)
            return False
        if response.status_code in (200, 201):
            self.outbox.delivered(result.query_id)
            logger.info("answer to query %s delivered", result.query_id)
            return True
        if response.status_code in FINAL_REFUSALS:
            self.outbox.delivered(result.query_id)
            logger.error("answer to query %s refused by the control plane (HTTP %d: %s); not sent again",
                         result.query_id, response.status_code, response.text[:300])
            return True
        logger.warning("answer to query %s not delivered (HTTP %d); kept for later", result.query_id,
                       response.status_code)
        return False

    # the catalog ------------------------------------------------------------------

    async def _read_report(self) -> None:
        # Reading a schema may scan a CSV file: off the event loop.
        self._report = await asyncio.to_thread(self.catalog.report)
        self._report_at = time.monotonic()

    def _refreshed(self, task: asyncio.Task[None]) -> None:
        self._refresh = None
        if not task.cancelled() and task.exception() is not None:
            logger.error("reading the dataset catalog failed: %s", task.exception())
