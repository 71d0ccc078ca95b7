"""The sync loop: report the actual state, take the desired state and queries the answer carries."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import sqlite3
import time

import httpx
from pydantic import ValidationError

from edge_runtime import __version__
from edge_runtime.agent.backoff import backoff_cap, backoff_ceiling, backoff_delay, jittered_interval
from edge_runtime.agent.base import one_line
from edge_runtime.agent.desired import DesiredStates
from edge_runtime.agent.plugins import AnswersQueries, ReportsModels
from edge_runtime.audit import AuditError, node_log_origin
from edge_runtime.protocol import (
    ActualState,
    AuditAck,
    AuditUpload,
    Health,
    ModelStatus,
    SyncRequest,
    SyncResponse,
    report_digest,
)
from edge_runtime.replies import refusal

logger = logging.getLogger("edge_runtime.agent")


HTTP_TIMEOUT = httpx.Timeout(10.0, connect=5.0)
# Statuses that mean "this credential is not accepted": retrying fast cannot help.
CREDENTIAL_REFUSED = frozenset({401, 403, 404})


class SyncFailed(Exception):
    """A sync that may succeed if retried: no connection, timeout, 5xx, garbled answer."""


class CredentialRefused(Exception):
    """The control plane does not accept this node's credential (revoked or unknown)."""


class Syncing(DesiredStates):
    """One sync, and the loop that repeats it with back-off."""

    def sync_request(self) -> SyncRequest:
        """A brief sync when the control plane holds this very report and nothing else waits; else the whole."""
        full, self.full_next = self.full_next, False
        if not full and self.held_digest is not None and not self.status.pending_refusals and self._audit_quiet():
            report = self.report_request()
            digest = report_digest(report)
            if digest == self.held_digest:
                applied = report.actual
                return SyncRequest(brief=True, digest=digest, health=report.health,
                                   actual=ActualState(applied_generation=applied.applied_generation,
                                                      applied_epoch=applied.applied_epoch))
        # The upload first: a log that cannot upload shows in this request's health.
        report = self.report_request(self.audit_upload())
        return report.model_copy(update={"digest": report_digest(report)})

    def _audit_quiet(self) -> bool:
        """Nothing in the audit log the control plane lacks or has not cosigned (no upload needed)."""
        if self.audit is None:
            return True
        try:
            witness, size = self.audit.witness(), self.audit.size()
        except (AuditError, sqlite3.Error):
            return False
        return witness.stored == size and witness.cosigned_size == size

    def report_request(self, audit: AuditUpload | None = None) -> SyncRequest:
        """What this node reports (a sync's request; a bundle out's report, without ``audit``)."""
        return SyncRequest(
            runtime_version=__version__,
            hardware=self.hardware,
            actual=ActualState(applied_generation=self.status.applied_generation, applied_epoch=self.status.epoch,
                               refusing=self.status.refusing, models=self.model_status(),
                               detail={**self.detail, **{r.name: r.report() for r in self.reconcilers
                                                         if isinstance(r, AnswersQueries)}}),
            health=self.health(),
            refusals=list(self.status.pending_refusals),
            identity_key=self.node_key.public_b64,
            audit=audit,
        )

    def audit_upload(self) -> AuditUpload | None:
        """This sync's audit upload (None without an audit log, or when it cannot be built: the sync goes on)."""
        if self.audit is None:
            return None
        try:
            return self.audit.upload(self.node_key.private, node_log_origin(self.identity.node_id))
        except AuditError as exc:
            self._audit_problem(f"the audit log cannot be uploaded: {exc}")
            return None

    def audit_acknowledged(self, upload: AuditUpload, ack: AuditAck) -> None:
        """Keep what the control plane made of ``upload``; a state other than ok shows in health."""
        if self.audit is None:
            return
        try:
            problem = self.audit.acknowledge(upload, ack)
        except AuditError as exc:
            problem = f"the control plane's audit answer cannot be kept: {exc}"
        self._audit_problem(problem)

    def _audit_problem(self, problem: str | None) -> None:
        """Show ``problem`` in health (None: the log is fine); logged when it changes, not on every sync."""
        before = self.problems.get("audit")
        if problem is None:
            if before is not None:
                logger.info("audit log: accepted by the control plane again")
                self.problems.pop("audit")
            return
        problem = one_line(problem)[:300]
        if problem != before:
            logger.error("audit log: %s", problem)
        self.problems["audit"] = problem

    def model_status(self) -> list[ModelStatus]:
        models: list[ModelStatus] = []
        for reconciler in self.reconcilers:
            if isinstance(reconciler, ReportsModels):
                try:
                    models.extend(reconciler.model_status())
                except Exception as exc:  # noqa: BLE001 - a report that fails must not stop the sync
                    logger.error("model status of %s failed: %s", reconciler.name, one_line(exc))
        return models

    def health(self) -> Health:
        problems = dict(self.problems)
        if self.status.pending_refusals:
            problems["refusals"] = f"{len(self.status.pending_refusals)} desired state(s) refused"
        if self.status.refusing is not None:
            problems["desired_state"] = (f"refusing generation {self.status.refusing.generation}: "
                                         f"{self.status.refusing.reason}")
        return Health(
            status="degraded" if problems else "ok",
            uptime_s=round(time.monotonic() - self.started, 3),
            failed_syncs=self.status.consecutive_failures,
            message="; ".join(f"{k}: {v}" for k, v in sorted(problems.items()))[:500],
        )

    async def _post(self, request: SyncRequest) -> SyncResponse:
        """Send ``request``; the control plane's answer, or SyncFailed or CredentialRefused."""
        if self._client is None:
            raise RuntimeError("sync_once needs the HTTP client that run() opens")
        body = request.model_dump_json(exclude_defaults=request.brief)
        try:
            response = await self._client.post(self.sync_url, content=body,
                                               headers={"Content-Type": "application/json"})
        except httpx.TimeoutException as exc:
            raise SyncFailed(f"timed out talking to {self.base_url} ({type(exc).__name__})") from exc
        except httpx.HTTPError as exc:
            raise SyncFailed(f"cannot reach {self.base_url}: {one_line(exc) or type(exc).__name__}") from exc
        if response.status_code in CREDENTIAL_REFUSED:
            raise CredentialRefused(f"HTTP {response.status_code}: {_error_message(response)}")
        if response.status_code != 200:
            raise SyncFailed(f"HTTP {response.status_code}: {_error_message(response)}")
        try:
            return SyncResponse.model_validate_json(response.content)
        except ValidationError as exc:
            raise SyncFailed(f"the control plane's answer is not a valid sync response: {exc.errors()[0]['msg']}"
                             ) from exc

    async def sync_once(self) -> SyncResponse:
        """One sync. Raises SyncFailed or CredentialRefused; applies what the answer carries."""
        request = self.sync_request()
        answer = await self._post(request)
        # The control plane has recorded everything this request carried.
        if request.audit is not None and answer.audit is not None:
            self.audit_acknowledged(request.audit, answer.audit)
        reported = len(request.refusals)
        self.status.pending_refusals = self.status.pending_refusals[reported:]
        failed_before = self.status.consecutive_failures
        self.status.consecutive_failures = 0
        self.status.last_sync_at = dt.datetime.now(dt.UTC)
        self.interval = answer.sync_interval_s
        self.held_digest = answer.report_digest
        if answer.report_wanted:
            # The control plane does not hold this report (or something changed for this node): send it whole.
            self.full_next = True
            logger.info("sync: the control plane asks for this node's whole report")
            return answer
        applied = False
        if answer.desired is not None:
            applied = await self.consider(answer.desired)
        elif self.desired is not None and answer.generation == self.desired.generation:
            # The control plane holds what this node applied: nothing refused is on offer any more.
            self._offered_applied()
        # After the desired state: a query runs under the data policy that came with it.
        for reconciler in self.reconcilers:
            if isinstance(reconciler, AnswersQueries):
                reconciler.queries_received(list(answer.queries))
        level = logging.INFO if applied or failed_before or not self.synced_once or reported else logging.DEBUG
        extra = f" after {failed_before} failed attempts" if failed_before else ""
        extra += f" reported {reported} refusal(s)" if reported else ""
        logger.log(level, "sync ok generation=%d%s", self.status.applied_generation, extra)
        self.synced_once = True
        return answer

    async def sync_loop(self) -> None:
        attempt = 0
        while True:
            self.wake.clear()
            self.status.last_attempt_at = dt.datetime.now(dt.UTC)
            cap = backoff_cap(self.interval)
            try:
                await self.sync_once()
            except CredentialRefused as exc:
                self.status.consecutive_failures += 1
                delay = jittered_interval(cap, self.rng)
                self._note_error(f"credential refused: {exc}")
                logger.error("sync refused: credential not accepted (%s); the node may have been revoked; "
                             "retrying in %.1fs", exc, delay)
            except SyncFailed as exc:
                self.status.consecutive_failures += 1
                delay = backoff_delay(attempt, self.rng, cap=cap)
                self._note_error(f"sync failed: {exc}")
                logger.warning("sync failed attempt=%d: %s; retrying in %.1fs (backoff ceiling %.1fs)",
                               attempt + 1, exc, delay, backoff_ceiling(attempt, cap=cap))
                attempt += 1
            except Exception as exc:  # noqa: BLE001 - a bug in one sync must not kill the node; back off and retry
                self.status.consecutive_failures += 1
                delay = backoff_delay(attempt, self.rng, cap=cap)
                message = f"{type(exc).__name__}: {one_line(exc)}"
                self._note_error(f"sync error: {message}")
                logger.error("sync error attempt=%d: %s; retrying in %.1fs", attempt + 1, message, delay)
                attempt += 1
            else:
                attempt = 0
                # A refusal found in this answer is reported at once, and so is a report the control plane wants.
                delay = (0.0 if self.status.pending_refusals or self.full_next
                         else jittered_interval(self.interval, self.rng))
            self._save_status()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wake.wait(), timeout=delay)


def _error_message(response: httpx.Response) -> str:
    error, _ = refusal(response)
    if error is not None:
        return one_line(error)[:300]
    return one_line(response.reason_phrase) or "no error message"
