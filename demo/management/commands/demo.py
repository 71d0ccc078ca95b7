"""``manage.py demo``: the control plane and a small fleet of real edge runtimes on loopback.

It migrates, resets the ``admin`` password, makes sure the demo regions and
sites exist (``demo.fleet``) and the demo models are trained, valid and
deployed (``demo.training``), then starts as child processes
(``demo.processes``) the control plane (uvicorn), a Celery worker and beat,
and for each demo site one or two ``edge-runtime`` processes, each enrolled
with a fresh one-use token and kept in ``DATA_DIR/demo-nodes/<site>/<node>``
so that the next run reuses it (with the site's demo datasets and
``datasets.json`` written there for the node that keeps its data, see
``demo.datasets.node_datasets_ensure``), and prints each node's inference URL
and a ``curl`` command that calls a demo model on one of them. Without
``EDGEWISE_SECRET_KEY`` the children get the key the settings generated in
``DATA_DIR/secret_key``, the same on every run. Then it supervises until
Ctrl-C or SIGTERM and stops every child it started: the nodes first, the
control plane last.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import connections

from demo import datasets, fleet, training
from demo.processes import Child, Stop, free_port_from, port_free, raise_stop, stop_all
from orchestrator import keys
from sites.models import Site

DEMO_SYNC_INTERVAL_S = "5"
DEMO_SWEEP_INTERVAL_S = "5"
HEALTH_TIMEOUT_S = 60.0


def _default_port() -> int:
    raw = os.environ.get("EDGEWISE_DEMO_PORT", "8000")
    try:
        return int(raw)
    except ValueError as exc:
        raise CommandError(f"EDGEWISE_DEMO_PORT={raw!r} is not a port number") from exc


def _seconds(env: dict[str, str], name: str, default: float) -> float:
    raw = env.get(name, "")
    return float(raw) if raw else default


class Command(BaseCommand):
    help = "Run the control plane, Celery and a small fleet of real edge runtimes on loopback, with demo sites."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--port", type=int, default=None,
                            help="port of the control plane on 127.0.0.1 (default $EDGEWISE_DEMO_PORT or 8000)")
        parser.add_argument("--no-nodes", action="store_true", help="start no edge runtimes")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Model slug → the sites its demo version is deployed to (empty: not deployable).
        self.deployed: dict[str, tuple[str, ...]] = {}

    def say(self, text: str = "") -> None:
        self.stdout.write(text)
        self.stdout.flush()

    def handle(self, *args: Any, **options: Any) -> None:
        # The health polls would otherwise log one line each into the demo's output.
        logging.getLogger("httpx").setLevel(logging.WARNING)
        port = options["port"] or _default_port()
        url = f"http://127.0.0.1:{port}"
        self.banner_mode()
        if not port_free(port):
            raise CommandError(f"port {port} on 127.0.0.1 is in use; pass --port or set EDGEWISE_DEMO_PORT")

        data_dir = Path(settings.DATA_DIR)
        logs = _folders_ensure(data_dir)

        self.say("Migrating the database ...")
        call_command("migrate", interactive=False, verbosity=0)
        password = fleet.admin_reset()
        sites = fleet.sites_ensure()
        self.say(f"Demo sites: {', '.join(f'{s.slug} ({s.region.name})' for s in sites)}")
        self.ensure_models(sites)
        # What the demo nodes may answer to federated queries (kept if an operator wrote their own).
        datasets.data_policy_ensure()

        env = self.child_env(url)
        children: list[Child] = []
        previous = {sig: signal.signal(sig, raise_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        reason = "stopped"
        try:
            self.start_core(children, env, port, logs, data_dir)
            self.wait_healthy(url, children)
            nodes = [] if options["no_nodes"] else self.start_nodes(children, env, url, sites, logs, data_dir)
            # This process only supervises from here on; an idle connection
            # would hold SQLite readers and PostgreSQL slots for nothing.
            connections.close_all()
            self.banner_ready(url, password, logs, env, nodes)
            self.supervise(children, env)
        except Stop as stop:
            reason = f"received {stop}"
        finally:
            for sig in previous:
                signal.signal(sig, signal.SIG_IGN)
            if children:
                self.say(f"\nStopping the demo ({reason}) ...")
            # Nodes first, so the control plane sees them go; the control plane last.
            stop_all([c for c in children if not c.core])
            stop_all([c for c in children if c.core])
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        self.say("Every demo process has stopped.")

    def ensure_models(self, sites: list[Site]) -> None:
        self.say("Demo models (trained with scikit-learn when missing, validated, deployed) ...")
        # onnxruntime's quantizer logs advice for model authors while it makes the int8
        # variant; the outcome of every check is in the version's validation log anyway.
        logging.disable(logging.WARNING)
        try:
            states = training.models_ensure(sites)
        finally:
            logging.disable(logging.NOTSET)
        for state in states:
            version = state.version
            self.deployed[version.model.slug] = state.sites
            if state.sites:
                self.say(f"  {version.model.slug} {version.version} ({version.get_status_display().lower()}): "
                         f"deployed to {', '.join(state.sites)}")
            else:
                last = next((e for e in reversed(version.validation_log) if not e.get("ok")), None)
                why = f": {last['step']}: {last['detail']}" if last else ""
                self.say(self.style.WARNING(
                    f"  {version.model.slug} {version.version} is {version.get_status_display().lower()}{why}; "
                    "not deployed"))

    def banner_mode(self) -> None:
        if settings.EMBEDDED:
            db = settings.DATABASES["default"]["NAME"]
            self.say(self.style.WARNING(
                "=" * 78 + "\n"
                "EMBEDDED MODE: neither DATABASE_URL nor REDIS_URL is set.\n"
                f"  database:      SQLite at {db}\n"
                "  channel layer: in-process (live updates reach only the web process's clients)\n"
                f"  Celery broker: filesystem queue in {settings.CELERY_BROKER_TRANSPORT_OPTIONS['data_folder_in']}\n"
                "Fine for a demo on one machine; production sets DATABASE_URL and REDIS_URL.\n" + "=" * 78
            ))
        else:
            db = settings.DATABASES["default"]
            where = f"database {db['NAME']!r} on {db.get('HOST') or 'localhost'}:{db.get('PORT') or 5432}"
            if settings.DATABASE_URL:
                self.say(self.style.SUCCESS(f"Using PostgreSQL from DATABASE_URL: {where}"))
            else:
                self.say(self.style.WARNING(f"DATABASE_URL is not set: SQLite at {db['NAME']}"))
            if settings.REDIS_URL:
                self.say(self.style.SUCCESS("Using Redis from REDIS_URL (Celery broker and channel layer)"))
            else:
                self.say(self.style.WARNING("REDIS_URL is not set: in-process channel layer, filesystem broker"))

    def child_env(self, url: str) -> dict[str, str]:
        env = dict(os.environ)
        bin_dir = str(Path(sys.executable).parent)
        env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
        env["PYTHONUNBUFFERED"] = "1"
        env["DJANGO_SETTINGS_MODULE"] = os.environ.get("DJANGO_SETTINGS_MODULE", "orchestrator.settings")
        # Spelled out so every child resolves the same folder (and signing key)
        # whatever its working directory.
        env["EDGEWISE_DATA_DIR"] = str(settings.DATA_DIR)
        if settings.SECRET_KEY_GENERATED_PATH is not None:
            # No key was set, so this process generated (or reused) one in the
            # data dir; naming its file makes every child sign sessions and
            # CSRF tokens with it, also one whose settings would not generate.
            env["EDGEWISE_SECRET_KEY_FILE"] = str(settings.SECRET_KEY_GENERATED_PATH)
        # A quick pulse so that the demo shows liveness changes within a minute;
        # values set by the caller win.
        env.setdefault("EDGEWISE_SYNC_INTERVAL", DEMO_SYNC_INTERVAL_S)
        env.setdefault("EDGEWISE_LIVENESS_SWEEP_INTERVAL", DEMO_SWEEP_INTERVAL_S)
        env.setdefault("EDGEWISE_PUBLIC_URL", url)
        return env

    def start_child(self, children: list[Child], child: Child, env: dict[str, str]) -> Child:
        child.start(env, Path(settings.BASE_DIR))
        children.append(child)
        self.say(f"  started {child.name} (pid {child.pid}), log: {child.log}")
        return child

    def start_core(self, children: list[Child], env: dict[str, str], port: int, logs: Path, data_dir: Path) -> None:
        py = sys.executable
        self.say("Starting the control plane, the Celery worker and beat ...")
        self.start_child(children, Child(
            "control plane",
            [py, "-m", "uvicorn", "orchestrator.asgi:application", "--host", "127.0.0.1", "--port", str(port),
             "--lifespan", "off"],
            logs / "control-plane.log", core=True), env)
        self.start_child(children, Child(
            "celery worker",
            [py, "-m", "celery", "-A", "orchestrator", "worker", "-l", "info", "--concurrency", "2",
             "-n", f"demo-{os.getpid()}@%h"],
            logs / "celery-worker.log", core=True), env)
        self.start_child(children, Child(
            "celery beat",
            [py, "-m", "celery", "-A", "orchestrator", "beat", "-l", "info",
             "-s", str(data_dir / "celerybeat-schedule")],
            logs / "celery-beat.log", core=True), env)

    def check_core(self, children: list[Child]) -> None:
        for child in children:
            code = child.exited()
            if child.core and code is not None:
                raise CommandError(
                    f"the {child.name} exited with code {code}; its log ({child.log}) ends with:\n{child.log_tail()}"
                )

    def wait_healthy(self, url: str, children: list[Child]) -> None:
        deadline = time.monotonic() + HEALTH_TIMEOUT_S
        while time.monotonic() < deadline:
            self.check_core(children)
            try:
                if httpx.get(f"{url}/agent/v1/health", timeout=2).status_code == 200:
                    self.say(f"Control plane is up at {url}")
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise CommandError(f"the control plane did not answer {url}/agent/v1/health within {HEALTH_TIMEOUT_S:.0f} s")

    def start_nodes(self, children: list[Child], env: dict[str, str], url: str, sites: list[Site], logs: Path,
                    data_dir: Path) -> list[Child]:
        # The console script when the project is installed, else the package run
        # from this checkout: the same code either way.
        script = shutil.which("edge-runtime", path=env["PATH"])
        exe = [script] if script else [sys.executable, "-m", "edge_runtime"]
        fingerprint = keys.public_key_fingerprint()
        self.say("Enrolling and starting the demo nodes ...")
        nodes: list[Child] = []
        # Each node's inference API gets a port of its own, counting up from
        # the control plane's port + 100 (the order of the demo's sites),
        # skipping any that something on this machine already holds.
        serve_port = int(urlsplit(url).port or 8000) + 99
        for site in sites:
            for spec in fleet.site_spec(site.slug).nodes:
                state_dir = data_dir / "demo-nodes" / site.slug / spec.name
                if not self.enrolled(site, spec.name, state_dir, url):
                    if not self.enroll(exe, env, site, spec, state_dir, url, fingerprint):
                        continue
                serve_port = free_port_from(serve_port + 1)
                written = datasets.node_datasets_ensure(state_dir, site.slug, spec.name)
                if written:
                    self.say(f"  wrote demo datasets for {site.slug}/{spec.name}: {', '.join(written)}")
                nodes.append(self.start_child(children, Child(
                    f"node {site.slug}/{spec.name}",
                    [*exe, "run", "--state-dir", str(state_dir), "--serve-port", str(serve_port)],
                    logs / f"node-{site.slug}-{spec.name}.log", core=False,
                    inference_url=f"http://127.0.0.1:{serve_port}", site=site.slug), env))
        return nodes

    def enrolled(self, site: Site, name: str, state_dir: Path, url: str) -> bool:
        """Whether ``state_dir`` holds the credential of the active node ``name`` for this control plane.

        Otherwise the old node, if any, is revoked (its state directory is gone
        or belongs to another database or port) so the name can enroll again.
        """
        marker = _marker(state_dir)
        node = fleet.node_active(site, name)
        try:
            record = json.loads(marker.read_text())
        except (OSError, ValueError):
            record = {}
        if node is not None and state_dir.is_dir() and record == {"node": str(node.uuid), "url": url}:
            self.say(f"  reusing {site.slug}/{name} (enrolled before, state in {state_dir})")
            return True
        if node is not None:
            fleet.node_retire(node)
        return False

    def enroll(self, exe: list[str], env: dict[str, str], site: Site, spec: fleet.DemoNode, state_dir: Path, url: str,
               fingerprint: str) -> bool:
        shutil.rmtree(state_dir, ignore_errors=True)
        _marker(state_dir).unlink(missing_ok=True)
        state_dir.parent.mkdir(parents=True, exist_ok=True)
        token = fleet.enrollment_token(site)
        # The token goes in on stdin: it is on no process's command line.
        argv = [*exe, "enroll", "--url", url, "--token-stdin", "--fingerprint", fingerprint, "--name", spec.name,
                "--role", spec.role, "--state-dir", str(state_dir)]
        result = subprocess.run(argv, cwd=settings.BASE_DIR, env=env, input=f"{token}\n", capture_output=True,
                                text=True, timeout=120, check=False)
        node = fleet.node_active(site, spec.name)
        if result.returncode != 0 or node is None:
            # One node that fails to enroll should not take the demo down; say why.
            self.say(self.style.ERROR(
                f"  could not enroll {site.slug}/{spec.name} (exit {result.returncode}):\n"
                f"{result.stdout}{result.stderr}".rstrip()
            ))
            return False
        _marker(state_dir).write_text(json.dumps({"node": str(node.uuid), "url": url}))
        self.say(f"  enrolled {site.slug}/{spec.name} as a {spec.role}")
        return True

    def banner_ready(self, url: str, password: str, logs: Path, env: dict[str, str], nodes: list[Child]) -> None:
        interval = _seconds(env, "EDGEWISE_SYNC_INTERVAL", 10.0)
        stale = _seconds(env, "EDGEWISE_NODE_STALE_AFTER", 3 * interval)
        offline = _seconds(env, "EDGEWISE_NODE_OFFLINE_AFTER", 12 * interval)
        lines = [
            "",
            self.style.SUCCESS("Edgewise demo is running."),
            f"  Console:  {url}/",
            f"  Admin:    {url}/admin/",
            f"  Login:    {fleet.ADMIN_USERNAME} / {password}   (a new password on every run)",
            f"  Logs:     {logs}",
        ]
        if nodes:
            width = max(len(n.name) for n in nodes)
            lines.append("  Nodes (each serves the Open Inference Protocol v2 at its inference URL):")
            lines += [f"    {n.name.removeprefix('node '):<{width - 5}}  {n.inference_url}  pid {n.pid}"
                      for n in nodes]
            example = self.curl_example(nodes)
            if example:
                lines.append(f"  Try it: {example[0]} (it serves a few seconds after the node comes online):")
                lines.append(f"    {example[1]}")
            lines.append(
                f"  Nodes sync every {interval:g} s. Pause one (kill -STOP <pid>; resume with kill -CONT <pid>)\n"
                f"  or stop it (kill <pid>): it turns stale after {stale:g} s and offline after {offline:g} s "
                "without a sync."
            )
        lines.append("Press Ctrl-C to stop the demo and every process it started.")
        self.say("\n".join(lines))

    def curl_example(self, nodes: list[Child]) -> tuple[str, str] | None:
        """(what it does, the command): the defect classifier called on the first node that should serve it."""
        model = training.MODELS[0]
        node = next((n for n in nodes if n.site in self.deployed.get(model.slug, ())), None)
        if node is None:
            return None
        what = f"{model.slug} on {node.name.removeprefix('node ')} scores one sensor reading"
        return what, training.curl_command(node.inference_url, model.slug)

    def supervise(self, children: list[Child], env: dict[str, str]) -> None:
        interval = _seconds(env, "EDGEWISE_SYNC_INTERVAL", 10.0)
        stale = _seconds(env, "EDGEWISE_NODE_STALE_AFTER", 3 * interval)
        offline = _seconds(env, "EDGEWISE_NODE_OFFLINE_AFTER", 12 * interval)
        while True:
            self.check_core(children)
            for child in children:
                code = child.exited()
                if not child.core and code is not None and not child.reported_exit:
                    child.reported_exit = True
                    self.say(self.style.WARNING(
                        f"{child.name} (pid {child.pid}) exited with code {code}; the console shows it stale "
                        f"after {stale:g} s and offline after {offline:g} s. Log: {child.log}"
                    ))
            time.sleep(0.5)


def _folders_ensure(data_dir: Path) -> Path:
    """The demo's log folder, and in embedded mode the broker's folders, made if missing; returns the log folder."""
    logs = data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    if settings.EMBEDDED:
        # Kombu's filesystem transport expects its folders to exist.
        for key in ("data_folder_in", "processed_folder", "control_folder"):
            folder = settings.CELERY_BROKER_TRANSPORT_OPTIONS.get(key)
            if isinstance(folder, str) and folder:  # the settings write each folder as a str
                Path(folder).mkdir(parents=True, exist_ok=True)
    return logs


def _marker(state_dir: Path) -> Path:
    # Beside the state directory, not in it: that directory belongs to the edge runtime.
    return state_dir.parent / f"{state_dir.name}.demo.json"
