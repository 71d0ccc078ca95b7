"""Hardware detection: reads what is there, never fails on what is not."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from edge_runtime import hardware


def test_it_detects_this_machine() -> None:
    profile = hardware.detect_hardware()
    assert profile.cpu_cores == os.cpu_count()
    assert profile.memory_mb > 0 and profile.cpu_model and profile.arch and profile.hostname
    assert profile.os.startswith(os.uname().sysname)


def test_it_reads_cpu_memory_and_nvidia_gpus_from_proc(tmp_path: Path) -> None:
    (tmp_path / "cpuinfo").write_text("processor\t: 0\nvendor_id\t: GenuineIntel\n"
                                      "model name\t: Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz\n")
    (tmp_path / "meminfo").write_text("MemTotal:       16314280 kB\nMemFree:         1234 kB\n")
    for bus, model in (("0000:17:00.0", "NVIDIA H200"), ("0000:65:00.0", "Tesla T4")):
        gpu = tmp_path / "driver" / "nvidia" / "gpus" / bus
        gpu.mkdir(parents=True)
        (gpu / "information").write_text(f"Model: \t\t {model}\nIRQ:   \t\t 150\nBus Type: \t PCIe\n")
    assert hardware.cpu_model(tmp_path) == "Intel(R) Xeon(R) Gold 6338 CPU @ 2.00GHz"
    assert hardware.memory_mb(tmp_path) == 15931
    assert hardware.accelerators(tmp_path) == ["NVIDIA H200", "NVIDIA Tesla T4"]


def test_it_reads_an_arm_cpu_model(tmp_path: Path) -> None:
    (tmp_path / "cpuinfo").write_text("processor\t: 0\nBogoMIPS\t: 108.00\n\nHardware\t: BCM2835\n")
    assert hardware.cpu_model(tmp_path) == "BCM2835"


def test_it_lists_gpus_from_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA H200 (UUID: GPU-1b2c3d4e-0000-1111-2222-333344445555)'\n"
                   "echo 'GPU 1: NVIDIA A2 (UUID: GPU-aaaa)'\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{smi.parent}{os.pathsep}{os.environ['PATH']}")
    assert hardware.accelerators(tmp_path / "no-proc") == ["NVIDIA H200", "NVIDIA A2"]


def test_it_does_not_fail_without_proc_or_drivers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    smi = tmp_path / "bin" / "nvidia-smi"
    smi.parent.mkdir()
    smi.write_text("#!/bin/sh\necho 'NVIDIA-SMI has failed because it could not communicate with the driver' >&2\n"
                   "exit 9\n")
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", str(smi.parent))
    empty = tmp_path / "empty"
    assert hardware.accelerators(empty) == []
    assert hardware.memory_mb(empty) > 0  # falls back to sysconf
    assert hardware.detect_hardware(empty).cpu_cores >= 1
