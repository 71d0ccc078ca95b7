"""The demo's child processes: started in sessions of their own, stopped with SIGTERM then SIGKILL.

Children run in sessions of their own, so a Ctrl-C in the terminal reaches
only the demo process, which stops them itself. On Linux each child also gets
SIGTERM if the demo process dies without cleaning up (``PR_SET_PDEATHSIG``),
so a killed demo leaves nothing running.
"""

from __future__ import annotations

import contextlib
import ctypes
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from django.core.management.base import CommandError

STOP_TIMEOUT_S = 15.0


class Stop(Exception):
    """Raised by the signal handler: leave the supervision loop and clean up."""


def raise_stop(signum: int, frame: Any) -> None:
    raise Stop(signal.Signals(signum).name)


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: ask the kernel to send SIGTERM
    # when the demo process goes away, even by SIGKILL.
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)


@dataclass
class Child:
    name: str
    argv: list[str]
    log: Path
    core: bool  # a core child's death ends the demo; a node's does not
    inference_url: str = ""  # a node's Open Inference Protocol API
    site: str = ""  # a node's site slug
    proc: subprocess.Popen[bytes] | None = None
    reported_exit: bool = False
    _log_fh: IO[bytes] | None = field(default=None, repr=False)

    def start(self, env: dict[str, str], cwd: Path) -> None:
        self._log_fh = self.log.open("ab")
        self.proc = subprocess.Popen(
            self.argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=self._log_fh, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_die_with_parent,  # no threads here, so preexec_fn is safe
        )

    @property
    def pid(self) -> int:
        return self.proc.pid if self.proc is not None else 0

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def close_log(self) -> None:
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def stop_all(children: list[Child]) -> None:
    """SIGTERM every running child, wait, then SIGKILL what is left. Safe to call twice."""
    running = [c.proc for c in children if c.proc is not None and c.proc.poll() is None]
    for proc in running:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
            # A node paused with `kill -STOP` (to fake a lost link) acts on SIGTERM only once continued.
            proc.send_signal(signal.SIGCONT)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for proc in running:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    for child in children:
        child.close_log()


def port_free(port: int) -> bool:
    with socket.socket() as s:
        # As uvicorn binds: connections of a previous run in TIME_WAIT do not count.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True




def free_port_from(port: int, tries: int = 50) -> int:
    """The first port from ``port`` on that 127.0.0.1 lets a server listen on now.

    An outgoing connection's own port blocks a listener on it too, and the
    ports next to the control plane's are often just those.
    """
    for candidate in range(port, min(port + tries, 65536)):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", candidate))
            except OSError:
                continue
            return candidate
    raise CommandError(f"no free port for a demo node's inference API between {port} and {port + tries - 1}")
