"""Bundles in, applied by the running agent: the inbox the importer fills, and the drop folder it watches.

``edge-runtime import-bundle`` verifies a bundle and leaves this node's part
in ``<state dir>/bundles/inbox`` (:mod:`edge_runtime.airgap.inbound`); the
agent polls the inbox and applies each entry as it applies a sync's answer:
the desired state through :meth:`consider` (stage, smoke-test, swap; the last
good version keeps serving), then the queries, then the receipt of the last
bundle the node sent out. A site where a technician only copies files has
``--drop-folder``: the agent imports what appears there itself, and moves
each file to ``imported/`` or ``refused/`` (with a ``.reason.txt``) beside it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import os
import shutil
import time
from pathlib import Path

from pydantic import ValidationError

from edge_runtime.agent.base import one_line
from edge_runtime.agent.plugins import AnswersQueries
from edge_runtime.agent.sync import Syncing
from edge_runtime.airgap.bundle import BundleRefused, bundle_parts
from edge_runtime.airgap.inbound import Bundles, import_bundle
from edge_runtime.airgap.outbound import forget_sent, save_report, sent_record
from edge_runtime.protocol import AuditAck, TelemetryAck
from edge_runtime.protocol.airgap import BundleReceipt, NodeBundle
from edge_runtime.state import StateError

logger = logging.getLogger("edge_runtime.agent")

BUNDLE_POLL_S = 1.0
# How often the report a bundle out carries is written (and after each bundle applied).
REPORT_EVERY_S = 5.0
BUNDLE_SUFFIXES = (".ewb", ".ewb.001")


class BundleIntake(Syncing):
    """Taking bundles in; :attr:`drop_folder` (None: none watched) is set by whoever builds the agent."""

    drop_folder: Path | None = None
    bundle_poll_s: float = BUNDLE_POLL_S

    async def bundle_loop(self) -> None:
        bundles = Bundles(self.state)
        seen: dict[Path, tuple[int, int]] = {}
        reported = 0.0
        while True:
            try:
                if time.monotonic() - reported >= REPORT_EVERY_S:
                    self.save_report()
                    reported = time.monotonic()
                if self.drop_folder is not None:
                    await self._scan_drop_folder(self.drop_folder, seen)
                for path in bundles.pending():
                    await self.take_bundle(bundles, path)
            except Exception as exc:  # noqa: BLE001 - one bad entry must not stop the node taking bundles
                logger.error("bundle intake error: %s: %s", type(exc).__name__, one_line(exc))
            await asyncio.sleep(self.bundle_poll_s)

    async def take_bundle(self, bundles: Bundles, path: Path) -> None:
        """Apply one inbox entry (a bundle in already verified), then remove it."""
        try:
            sequence = int(path.stem)
            entry = NodeBundle.model_validate_json(path.read_bytes())
        except (ValueError, ValidationError, OSError) as exc:
            logger.error("bundle inbox entry %s cannot be read (%s); set aside", path.name, one_line(exc)[:200])
            _set_aside(path)
            return
        answer = entry.answer
        applied = False
        if answer.desired is not None:
            applied = await self.consider(answer.desired)
        for reconciler in self.reconcilers:
            if isinstance(reconciler, AnswersQueries):
                reconciler.queries_received(list(answer.queries))
        if entry.receipt is not None:
            self.bundle_receipt(entry.receipt, answer.audit)
        with bundles.lock():
            try:
                state = bundles.load()
            except StateError as exc:
                logger.error("%s", exc)
            else:
                state.applied_sequence, state.applied_at = sequence, dt.datetime.now(dt.UTC)
                bundles.save(state)
            path.unlink(missing_ok=True)
        logger.info("bundle %d applied: generation %d%s, %d query(ies)", sequence, self.status.applied_generation,
                    "" if applied else " (unchanged)", len(answer.queries))
        self.record("bundle.applied", {"sequence": sequence, "generation": self.status.applied_generation,
                                       "changed": applied, "queries": len(answer.queries)})
        self._save_status()
        self.save_report()

    def save_report(self) -> None:
        """Write what the next bundle out reports (a failure is logged: the one before stays)."""
        try:
            save_report(self.state, self.report_request())
        except OSError as exc:
            logger.error("cannot write the report for bundles out: %s", one_line(exc))

    def bundle_receipt(self, receipt: BundleReceipt, audit: AuditAck | None) -> None:
        """What the control plane took from this node's bundle out ``receipt.sequence``: forget it here.

        Telemetry up to the receipt's sequence number, the answers it names, the refused desired states that
        bundle reported; the audit answer is kept against the upload that bundle carried. Safe to repeat: every
        bundle in carries the receipt of the last bundle out the control plane imported.
        """
        sent = sent_record(self.state, receipt.sequence)
        if self.telemetry is not None and receipt.telemetry_seq:
            self.telemetry.on_ack(TelemetryAck(seq=receipt.telemetry_seq))
        if receipt.answers:
            for reconciler in self.reconcilers:
                if isinstance(reconciler, AnswersQueries):
                    reconciler.answers_delivered(list(receipt.answers))
        if sent is None:
            return
        if sent.audit is not None and audit is not None:
            self.audit_acknowledged(sent.audit, audit)
        reported = set(sent.refusals)
        self.status.pending_refusals = [r for r in self.status.pending_refusals
                                        if (r.generation, r.at.isoformat()) not in reported]
        forget_sent(self.state, receipt.sequence)
        logger.info("receipt of bundle out %d: telemetry to #%d, %d answer(s) acknowledged", receipt.sequence,
                    receipt.telemetry_seq, len(receipt.answers))

    async def _scan_drop_folder(self, folder: Path, seen: dict[Path, tuple[int, int]]) -> None:
        """Import each bundle file in ``folder`` once its size stopped changing between two polls."""
        if not folder.is_dir():
            return
        for path in sorted(folder.iterdir()):
            if not path.is_file() or not path.name.endswith(BUNDLE_SUFFIXES):
                continue
            try:
                stat = path.stat()
            except OSError:
                continue
            mark = (stat.st_size, stat.st_mtime_ns)
            if seen.get(path) != mark:
                seen[path] = mark  # still being copied, perhaps: look again next poll
                continue
            seen.pop(path, None)
            parts = [path]
            try:
                parts = bundle_parts(path)
                imported = await asyncio.to_thread(import_bundle, self.state, path, audit=self.audit)
            except BundleRefused as exc:
                _file_away(folder, parts, "refused", str(exc))
                continue
            _file_away(folder, parts, "imported", None)
            logger.info("bundle %d from the drop folder verified (%s)", imported.sequence, path.name)


def _file_away(folder: Path, parts: list[Path], where: str, reason: str | None) -> None:
    target = folder / where
    target.mkdir(exist_ok=True)
    for part in parts:
        if part.exists():
            shutil.move(str(part), target / part.name)
    if reason is not None:
        (target / f"{parts[0].name}.reason.txt").write_text(reason + "\n")


def _set_aside(path: Path) -> None:
    aside = path.parent / "unreadable"
    aside.mkdir(exist_ok=True)
    os.replace(path, aside / path.name)
