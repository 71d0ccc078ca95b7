"""What machine this node runs on: the hardware profile reported at enrollment
and with every sync (:class:`edge_runtime.protocol.Hardware`).

Detection never fails: anything that cannot be read (no ``/proc``, no
``nvidia-smi``, no ONNX Runtime) is simply left out, because a node that
cannot describe its GPU must still be able to enroll and sync.
"""

from __future__ import annotations

import os
import platform
import shutil
import socket
import subprocess
from pathlib import Path

from edge_runtime.protocol import Hardware
from edge_runtime.protocol.providers import NON_COMPUTE_PROVIDERS

PROC = Path("/proc")
# nvidia-smi can hang on a wedged driver; the profile is not worth waiting for.
NVIDIA_SMI_TIMEOUT_S = 5.0


def detect_hardware(proc: Path = PROC) -> Hardware:
    """The hardware profile of this machine; fields that cannot be read stay at their defaults."""
    return Hardware(
        cpu_model=cpu_model(proc)[:200],
        cpu_cores=max(1, min(os.cpu_count() or 1, 4096)),
        memory_mb=memory_mb(proc),
        accelerators=accelerators(proc)[:64],
        execution_providers=execution_providers()[:64],
        os=f"{platform.system()} {platform.release()}".strip()[:100],
        arch=platform.machine()[:50],
        hostname=socket.gethostname()[:255],
    )


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def cpu_model(proc: Path = PROC) -> str:
    # x86 says "model name"; many ARM kernels only say "Hardware" or "Processor".
    wanted = ("model name", "hardware", "processor", "cpu model")
    for line in _read(proc / "cpuinfo").splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in wanted and value.strip() and not value.strip().isdigit():
            return value.strip()
    return platform.processor() or platform.machine()


def memory_mb(proc: Path = PROC) -> int:
    for line in _read(proc / "meminfo").splitlines():
        if line.startswith("MemTotal:"):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                return int(parts[1]) // 1024
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024))
    except (AttributeError, ValueError, OSError):
        return 0


def accelerators(proc: Path = PROC) -> list[str]:
    found = _nvidia_from_proc(proc)
    if not found:
        found = _nvidia_from_smi()
    return found


def _nvidia_from_proc(proc: Path) -> list[str]:
    gpus_dir = proc / "driver" / "nvidia" / "gpus"
    try:
        entries = sorted(gpus_dir.iterdir())
    except OSError:
        return []
    found = []
    for entry in entries:
        model = ""
        for line in _read(entry / "information").splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "Model":
                model = value.strip()
                break
        found.append(f"NVIDIA {model}" if model and not model.startswith("NVIDIA") else model or "NVIDIA GPU")
    return found


def _nvidia_from_smi() -> list[str]:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return []
    try:
        result = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=NVIDIA_SMI_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError):
        return []
    if result.returncode != 0:
        return []
    found = []
    # "GPU 0: NVIDIA H200 (UUID: GPU-...)"
    for line in result.stdout.splitlines():
        _, sep, rest = line.partition(":")
        if sep and line.startswith("GPU"):
            found.append(rest.split("(UUID")[0].strip() or "NVIDIA GPU")
    return found


def execution_providers() -> list[str]:
    try:
        import onnxruntime  # type: ignore[import-not-found,unused-ignore]
    except Exception:  # noqa: BLE001 - a broken install must not stop the node from reporting the rest
        return []
    try:
        # Only providers that compute: Azure's calls a remote endpoint and is never offered to placement.
        return [str(p) for p in onnxruntime.get_available_providers() if p not in NON_COMPUTE_PROVIDERS]
    except Exception:  # noqa: BLE001 - same: the profile is best effort
        return []
