"""The downloadable installer, rendered and then run for real against a live control plane.

The process tests install offline: the control plane's wheelhouse is filled
with wheels of the runtime's dependencies from ``var/wheelhouse-cache``
(``EDGEWISE_WHEELHOUSE_CACHE`` overrides the folder), and the installer runs
with ``EDGEWISE_OFFLINE=1``, so pip reaches nothing but the control plane.
CI fills that cache once in its setup step with::

    .venv/bin/python -m pip download --only-binary=:all: --dest var/wheelhouse-cache \\
        'httpx>=0.27' 'cryptography>=42' 'pydantic>=2.6' 'websockets>=12' ... 'onnxruntime>=1.18'

(the requirements of ``edge_runtime/pyproject.toml`` and of its ``cpu``
extra, the variant these tests install). When the cache cannot satisfy them,
the session fixture runs that command itself, once. The OpenVINO variant's
wheels (``onnxruntime-openvino``, with its own requirements) go to the
cache's ``openvino/`` folder the same way, the first time its test runs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from django.conf import settings

import edge_runtime
from audit.services import Actor
from orchestrator import keys
from sites import services, wheel
from sites.installer import InstallerError, render_installer
from sites.models import EnrollmentToken, Node, NodeStatus, Site
from tests.fixtures.processes import REPO, ControlPlane, process_env, wait_until

BASE_PYTHON = getattr(sys, "_base_executable", sys.executable)
NOT_A_FINGERPRINT = "0" * 64
# What the edge runtime's wheel requires with the cpu extra: its own distribution's dependencies, stock onnxruntime.
REQUIRES = (*wheel.runtime_wheel().requires, *wheel.runtime_wheel().extras["cpu"])
OPENVINO = "OpenVINOExecutionProvider"
# The control plane's own stack, which a site must never get.
CONTROL_PLANE_ONLY = ("django", "celery", "channels", "edgewise")


# -- fixtures ----------------------------------------------------------------


def _resolves_offline(folder: Path, requires: tuple[str, ...] = REQUIRES) -> bool:
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--no-index", "--quiet",
         "--disable-pip-version-check", "--find-links", str(folder), *requires],
        capture_output=True, text=True,
    )
    return result.returncode == 0


@pytest.fixture(scope="session")
def dependency_wheels() -> Path:
    """A folder of wheels that satisfies the runtime's requirements for this Python, offline."""
    folder = Path(os.environ.get("EDGEWISE_WHEELHOUSE_CACHE", REPO / "var" / "wheelhouse-cache"))
    folder.mkdir(parents=True, exist_ok=True)
    if not _resolves_offline(folder):
        # One-time setup, the same command as CI's; never needed once the cache is filled.
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--quiet",
             "--disable-pip-version-check", "--dest", str(folder), *REQUIRES],
            check=True,
        )
    assert _resolves_offline(folder), f"{folder} does not satisfy {REQUIRES} offline"
    return folder


@pytest.fixture
def wheelhouse(dependency_wheels: Path) -> Path:
    """The control plane's wheelhouse, filled (both processes share settings.DATA_DIR)."""
    target = Path(settings.WHEELHOUSE_DIR)
    target.mkdir(parents=True, exist_ok=True)
    for wheel_file in dependency_wheels.glob("*.whl"):
        if not (target / wheel_file.name).exists():
            shutil.copy2(wheel_file, target / wheel_file.name)
    return target


@pytest.fixture(scope="session")
def openvino_wheels(dependency_wheels: Path) -> Path:
    """Wheels of the OpenVINO variant for this Python (``openvino/`` in the cache), downloaded the first time.

    A package index that cannot provide them skips the test with the reason,
    except under ``CI=true``, where it fails: CI never drops the check silently.
    """
    folder = dependency_wheels / "openvino"
    folder.mkdir(exist_ok=True)
    requires = tuple(wheel.runtime_wheel().extras["openvino"])
    if not _resolves_offline(folder, requires):
        fetched = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--only-binary=:all:", "--quiet", "--disable-pip-version-check",
             "--dest", str(folder), *requires],
            capture_output=True, text=True,
        )
        if fetched.returncode != 0:
            reason = f"no wheels of {requires} for this Python from the package index:\n{fetched.stderr}"
            if os.environ.get("CI") == "true":
                pytest.fail(reason)
            pytest.skip(reason)
    assert _resolves_offline(folder, requires), f"{folder} does not satisfy {requires} offline"
    return folder


@pytest.fixture(scope="module")
def prefix(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # One runtime installation for the module's tests: it is software, not state.
    return tmp_path_factory.mktemp("prefix") / "edgewise"


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in {"Z", "X"}


@pytest.fixture
def started_pids() -> Iterator[list[int]]:
    """Nodes the installer started in the background; stopped after the test."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if _alive(pid):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    for pid in pids:
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _run(script: str, tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "edgewise-install.sh"
    path.write_text(script)
    return subprocess.run(["bash", str(path), *args], env=process_env(**env), capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)


def _install_env(prefix: Path, state_dir: Path, name: str) -> dict[str, str]:
    return {
        "EDGEWISE_PREFIX": str(prefix),
        "EDGEWISE_STATE_DIR": str(state_dir),
        "EDGEWISE_NODE_NAME": name,
        "EDGEWISE_PYTHON": BASE_PYTHON,
        "EDGEWISE_OFFLINE": "1",
        # Whatever GPU the test machine has: the wheelhouse holds stock onnxruntime.
        "EDGEWISE_ONNXRUNTIME": "cpu",
        "EDGEWISE_START": "1",
        # The node started in the background picks a free port for its inference API.
        "EDGEWISE_SERVE_PORT": "0",
        # Tests run as root: never write a unit into the machine's systemd.
        "EDGEWISE_SYSTEMD": "0",
    }


def _started_pid(stdout: str) -> int:
    match = re.search(r"started the node in the background: pid (\d+)", stdout)
    assert match, f"the installer started no node:\n{stdout}"
    return int(match.group(1))


# -- running the real installer ----------------------------------------------


@pytest.mark.process
def test_it_installs_enrolls_and_starts_a_node_that_syncs(
    live_control_plane: ControlPlane, site_berlin: Site, wheelhouse: Path, prefix: Path, tmp_path: Path,
    started_pids: list[int],
) -> None:
    # Two uses: a second enrollment would be allowed by the token, so only the
    # installer's own check can keep a re-run from enrolling twice.
    token_row, token = services.token_create(actor=Actor.system("test"), site=site_berlin, max_uses=2)
    script = render_installer(url=live_control_plane.url, token=token, fingerprint=keys.public_key_fingerprint(),
                              site=site_berlin)
    state_dir = tmp_path / "state"
    env = _install_env(prefix, state_dir, "line-3")

    first = _run(script, tmp_path, **env)
    assert first.returncode == 0, first.stdout + first.stderr
    started_pids.append(_started_pid(first.stdout))
    assert "pip check: No broken requirements found." in first.stdout
    assert _onnxruntime_in(prefix)["distributions"] == ["onnxruntime"]
    node = Node.objects.get(site=site_berlin, name="line-3")
    assert node.runtime_version == edge_runtime.__version__
    _assert_runtime_alone(prefix)

    def online() -> bool:
        node.refresh_from_db()
        return node.status == NodeStatus.ONLINE and node.last_seen_at is not None

    wait_until(online, timeout=60, what="the installed node to sync and be online")

    # The runtime came from this control plane's dist page, pinned by the hash
    # written into the script.
    pinned = re.search(r"^RUNTIME_SHA256=([0-9a-f]{64})$", script, re.MULTILINE)
    assert pinned
    (direct_url,) = prefix.glob("lib/python*/site-packages/edge_runtime-*.dist-info/direct_url.json")
    origin = json.loads(direct_url.read_text())
    assert origin["url"] == f"{live_control_plane.url}/agent/v1/dist/{wheel.runtime_wheel().filename}"
    assert origin["archive_info"]["hashes"]["sha256"] == pinned.group(1)

    again = _run(script, tmp_path, **env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "already enrolled" in again.stdout
    assert "already running" in again.stdout
    assert Node.objects.filter(site=site_berlin).count() == 1
    token_row.refresh_from_db()
    assert token_row.uses == 1


def _assert_runtime_alone(prefix: Path) -> None:
    """The site's environment holds the edge runtime and its requirements, none of the control plane."""
    probe = subprocess.run(
        # -I and cwd: the repository's own edge_runtime/ must not be what gets imported.
        [str(prefix / "bin" / "python"), "-I", "-c",
         "import importlib.metadata as m, json, edge_runtime, edge_runtime.cli, edge_runtime.serving;"
         "print(json.dumps(sorted(d.metadata['Name'].lower() for d in m.distributions())))"],
        capture_output=True, text=True, timeout=60, env=process_env(), cwd=prefix,
    )
    assert probe.returncode == 0, probe.stderr
    installed = json.loads(probe.stdout)
    assert "edge-runtime" in installed
    assert [name for name in installed if name.startswith(CONTROL_PLANE_ONLY)] == []
    helped = subprocess.run([str(prefix / "bin" / "edge-runtime"), "--help"], capture_output=True, text=True,
                            timeout=60, env=process_env(), cwd=prefix)
    assert helped.returncode == 0, helped.stderr
    assert "enroll" in helped.stdout


def _processes_holding(secret: str, state_dir: Path) -> tuple[list[list[str]], list[str]]:
    """The running enroll command lines for ``state_dir``, and each process whose command line or environment
    holds ``secret`` (both unique to one test, whatever else runs on the machine)."""
    enrolls: list[list[str]] = []
    leaks: list[str] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes()
            environ = (entry / "environ").read_bytes()
        except OSError:  # gone since the listing
            continue
        args = [a.decode(errors="replace") for a in cmdline.split(b"\0") if a]
        if "enroll" in args and str(state_dir) in args:
            enrolls.append(args)
        for where, text in (("cmdline", cmdline), ("environ", environ)):
            if secret.encode() in text:
                leaks.append(f"pid {entry.name} {where}: {' '.join(args)}")
    return enrolls, leaks


@pytest.mark.process
def test_it_never_puts_the_token_on_a_command_line_or_in_an_environment(
    live_control_plane: ControlPlane, site_berlin: Site, wheelhouse: Path, prefix: Path, tmp_path: Path,
) -> None:
    _, token = services.token_create(actor=Actor.system("test"), site=site_berlin)
    script = render_installer(url=live_control_plane.url, token=token, fingerprint=keys.public_key_fingerprint(),
                              site=site_berlin)
    path = tmp_path / "edgewise-install.sh"
    path.write_text(script)
    state_dir = tmp_path / "state"
    env = {**_install_env(prefix, state_dir, "gw-9"), "EDGEWISE_START": "0"}
    installer = subprocess.Popen(["sh", str(path)], env=process_env(**env), cwd=tmp_path, text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    enrolls: list[list[str]] = []
    leaks: list[str] = []
    try:
        # Polled while the installer runs: enrollment takes a Python start and two requests, many sweeps.
        while installer.poll() is None:
            seen, leaked = _processes_holding(token, state_dir)
            enrolls += seen
            leaks += leaked
            time.sleep(0.005)
        stdout, stderr = installer.communicate(timeout=10)
    finally:
        if installer.poll() is None:
            installer.kill()
    assert installer.returncode == 0, stdout + stderr
    assert Node.objects.filter(site=site_berlin, name="gw-9").exists()
    # The sweep did see the enrollment run, with its token on stdin.
    assert enrolls, "no sweep saw `edge-runtime enroll` running"
    assert all("--token-stdin" in args and "--token" not in args for args in enrolls), enrolls
    assert leaks == []
    assert token not in stdout + stderr


@pytest.mark.process
def test_it_refuses_a_control_plane_with_another_key_without_spending_the_token(
    live_control_plane: ControlPlane, site_ohio: Site, wheelhouse: Path, prefix: Path, tmp_path: Path,
    started_pids: list[int],
) -> None:
    token_row, token = services.token_create(actor=Actor.system("test"), site=site_ohio)
    script = render_installer(url=live_control_plane.url, token=token, fingerprint=NOT_A_FINGERPRINT,
                              site=site_ohio)
    state_dir = tmp_path / "state"
    result = _run(script, tmp_path, **_install_env(prefix, state_dir, "pos-1"))
    assert result.returncode != 0
    assert (f"the control plane's signing key fingerprint {keys.public_key_fingerprint()} does not match "
            f"the expected {NOT_A_FINGERPRINT}") in result.stderr
    assert "the token was not used" in result.stderr
    assert "started the node" not in result.stdout
    assert not Node.objects.filter(site=site_ohio).exists()
    token_row.refresh_from_db()
    assert token_row.uses == 0
    assert not (state_dir / "identity.json").exists()


def _onnxruntime_in(prefix: Path) -> dict[str, Any]:
    """The distributions that provide onnxruntime in ``prefix``, its providers, and what ``pip check`` says."""
    probe = subprocess.run(
        [str(prefix / "bin" / "python"), "-I", "-c",
         "import importlib.metadata as m, json, subprocess, sys, onnxruntime;"
         "check = subprocess.run([sys.executable, '-m', 'pip', 'check'], capture_output=True, text=True);"
         "print(json.dumps({'distributions': sorted(set(m.packages_distributions()['onnxruntime'])),"
         " 'providers': onnxruntime.get_available_providers(), 'pip_check': [check.returncode, check.stdout]}))"],
        capture_output=True, text=True, timeout=120, env=process_env(), cwd=prefix,
    )
    assert probe.returncode == 0, probe.stderr
    found: dict[str, Any] = json.loads(probe.stdout)
    return found


@pytest.mark.process
def test_it_installs_the_openvino_variant_and_keeps_it_through_upgrades(
    live_control_plane: ControlPlane, site_berlin: Site, wheelhouse: Path, openvino_wheels: Path, tmp_path: Path,
) -> None:
    for wheel_file in openvino_wheels.glob("*.whl"):
        if not (wheelhouse / wheel_file.name).exists():
            shutil.copy2(wheel_file, wheelhouse / wheel_file.name)
    _, token = services.token_create(actor=Actor.system("test"), site=site_berlin)
    script = render_installer(url=live_control_plane.url, token=token, fingerprint=keys.public_key_fingerprint(),
                              site=site_berlin)
    prefix = tmp_path / "openvino-node"
    env = {**_install_env(prefix, tmp_path / "state", "ipc-7"), "EDGEWISE_START": "0"}
    del env["EDGEWISE_ONNXRUNTIME"]
    clean = [0, "No broken requirements found.\n"]

    first = _run(script, tmp_path, "--onnxruntime", "openvino", **env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "installing edge-runtime[openvino] " in first.stdout
    assert "pip check: No broken requirements found." in first.stdout
    installed = _onnxruntime_in(prefix)
    assert installed["distributions"] == ["onnxruntime-openvino"]
    assert OPENVINO in installed["providers"] and installed["pip_check"] == clean

    # The upgrade (no option: auto) keeps the variant; stock onnxruntime is not put back over it.
    again = _run(script, tmp_path, **env)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "keeping the onnxruntime variant installed: openvino (onnxruntime-openvino)" in again.stdout
    assert "already enrolled" in again.stdout
    kept = _onnxruntime_in(prefix)
    assert kept["distributions"] == ["onnxruntime-openvino"]
    assert OPENVINO in kept["providers"] and kept["pip_check"] == clean

    # What an older runtime (which required stock onnxruntime) did to such a node: stock over the variant.
    subprocess.run([str(prefix / "bin" / "python"), "-m", "pip", "install", "--quiet", "--no-index",
                    "--disable-pip-version-check", "--find-links", str(wheelhouse), "onnxruntime"], check=True)
    assert OPENVINO not in _onnxruntime_in(prefix)["providers"]
    repaired = _run(script, tmp_path, **env)
    assert repaired.returncode == 0, repaired.stdout + repaired.stderr
    assert "removing onnxruntime onnxruntime-openvino before installing onnxruntime-openvino" in repaired.stdout
    fixed = _onnxruntime_in(prefix)
    assert fixed["distributions"] == ["onnxruntime-openvino"]
    assert OPENVINO in fixed["providers"] and fixed["pip_check"] == clean


# -- checks that stop the installer early ------------------------------------


@pytest.fixture
def script(site_berlin: Site) -> str:
    _, token = services.token_create(actor=Actor.system("test"), site=site_berlin)
    return render_installer(url="http://127.0.0.1:9", token=token, fingerprint=NOT_A_FINGERPRINT, site=site_berlin)


def _old_python(tmp_path: Path) -> Path:
    # An interpreter that reports 3.9: fails the version probe, prints its version.
    stub = tmp_path / "python3.9"
    stub.write_text('#!/bin/sh\ncase "$2" in *print*) echo 3.9.18 ;; *) exit 1 ;; esac\n')
    stub.chmod(0o755)
    return stub


@pytest.mark.parametrize(
    ("overrides", "says"),
    [
        ({"EDGEWISE_PYTHON": "/nonexistent/python3"}, "EDGEWISE_PYTHON=/nonexistent/python3 is not an executable"),
        ({"EDGEWISE_PYTHON": "OLD"}, "is Python 3.9.18; the edge runtime needs Python 3.11 or newer"),
        ({"EDGEWISE_NODE_ROLE": "boss"}, "EDGEWISE_NODE_ROLE=boss is not a node role"),
        ({"EDGEWISE_ONNXRUNTIME": "tpu"}, "--onnxruntime tpu is not an onnxruntime variant (use cpu, gpu, "
                                          "openvino, directml or auto)"),
    ],
)
def test_it_stops_with_a_clear_message_before_installing_anything(
    script: str, tmp_path: Path, overrides: dict[str, str], says: str
) -> None:
    env = _install_env(tmp_path / "prefix", tmp_path / "state", "gw-1")
    env.update({k: str(_old_python(tmp_path)) if v == "OLD" else v for k, v in overrides.items()})
    result = _run(script, tmp_path, **env)
    assert result.returncode == 1
    assert says in result.stderr
    assert not (tmp_path / "prefix").exists()


@pytest.mark.parametrize(
    ("listing", "status", "variant", "why"),
    [
        ("GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-5b1e2c4d-0000-4000-8000-000000000000)", 0, "gpu",
         "nvidia-smi lists a GPU"),
        ("No devices were found", 6, "cpu", "no GPU listed by nvidia-smi"),
    ],
)
def test_it_picks_the_gpu_variant_where_nvidia_smi_lists_a_gpu(
    script: str, tmp_path: Path, listing: str, status: int, variant: str, why: str
) -> None:
    tools = tmp_path / "bin"
    tools.mkdir()
    (tools / "nvidia-smi").write_text(f'#!/bin/sh\n[ "$1" = -L ] && echo "{listing}"\nexit {status}\n')
    (tools / "nvidia-smi").chmod(0o755)
    # The prefix cannot be created (a file is in the way): the run stops right after choosing.
    (tmp_path / "in-the-way").write_text("")
    env = _install_env(tmp_path / "in-the-way" / "prefix", tmp_path / "state", "gw-2")
    env.update(EDGEWISE_ONNXRUNTIME="auto", PATH=f"{tools}{os.pathsep}{os.environ['PATH']}")
    result = _run(script, tmp_path, **env)
    assert result.returncode == 1
    assert f"onnxruntime variant: {variant} ({why}; choose another with --onnxruntime)" in result.stdout
    assert "could not create a virtual environment" in result.stderr


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--onnxruntime", "rocm"], "--onnxruntime rocm is not an onnxruntime variant"),
        (["--onnxruntime=cuda"], "--onnxruntime cuda is not an onnxruntime variant"),
        (["--onnxruntime"], "--onnxruntime needs a value: cpu, gpu, openvino, directml or auto"),
        (["--gpu"], "unknown option '--gpu' (usage: sh "),
    ],
)
def test_it_refuses_an_onnxruntime_option_it_cannot_use(
    script: str, tmp_path: Path, args: list[str], says: str
) -> None:
    result = _run(script, tmp_path, *args, **_install_env(tmp_path / "prefix", tmp_path / "state", "gw-3"))
    assert result.returncode == 1
    assert says in result.stderr
    assert not (tmp_path / "prefix").exists()


# -- rendering ---------------------------------------------------------------


def test_it_names_the_site_and_the_token_terms_in_the_header(site_berlin: Site) -> None:
    token_row, token = services.token_create(actor=Actor.system("test"), site=site_berlin)
    text = render_installer(url="https://edgewise.example.org/", token=token, fingerprint=NOT_A_FINGERPRINT,
                            site=site_berlin)
    assert text.startswith("#!/bin/sh\n")
    header = text.split("set -eu", 1)[0]
    assert "site Plant Berlin (plant-berlin)" in header
    assert "single-purpose" in header
    assert f"expires at {token_row.expires_at:%Y-%m-%d %H:%M} UTC" in header
    assert "CONTROL_PLANE_URL=https://edgewise.example.org\n" in text
    assert "edge-runtime$extra @ $DIST_URL$RUNTIME_WHEEL#sha256=$RUNTIME_SHA256" in text
    assert f"RUNTIME_SHA256={wheel.runtime_wheel().sha256}\n" in text
    for shell in ("sh", "bash"):
        check = subprocess.run([shell, "-n"], input=text, capture_output=True, text=True)
        assert check.returncode == 0, (shell, check.stderr)


def test_it_quotes_every_value_so_none_runs_as_shell(site_berlin: Site, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    site_berlin.name = f"Plant\n touch {marker}\n# Berlin"
    url = f"http://127.0.0.1:8000/x'$(touch {marker})`touch {marker}`"
    token = f"ew_tok_'; touch {marker}; '"
    text = render_installer(url=url, token=token, fingerprint=NOT_A_FINGERPRINT, site=site_berlin)
    header = text.split("set -eu", 1)[0]
    assert all(line.startswith("#") for line in header.strip().splitlines())
    assignments = "\n".join(line for line in text.splitlines()
                            if re.match(r"^(CONTROL_PLANE_URL|ENROLLMENT_TOKEN|SITE)=", line))
    shown = subprocess.run(
        ["sh", "-c", assignments + '\nprintf "%s\\n%s\\n%s" "$CONTROL_PLANE_URL" "$ENROLLMENT_TOKEN" "$SITE"'],
        capture_output=True, text=True, check=True,
    ).stdout
    assert shown.split("\n") == [url, token, "plant-berlin"]
    assert not marker.exists()


@pytest.mark.parametrize(
    ("kwargs", "names"),
    [
        ({"url": "ftp://edgewise.example.org"}, "url"),
        ({"url": "edgewise.example.org"}, "url"),
        ({"url": "https://edgewise.example.org/?next=1"}, "url"),
        ({"fingerprint": "ABC"}, "fingerprint"),
        ({"fingerprint": "g" * 64}, "fingerprint"),
        ({"token": ""}, "token"),
        ({"token": "ew_tok_abc\ndef"}, "token"),
    ],
)
def test_it_refuses_a_value_that_cannot_go_into_an_installer(
    site_berlin: Site, kwargs: dict[str, Any], names: str
) -> None:
    values: dict[str, Any] = {"url": "https://edgewise.example.org", "token": "ew_tok_abcdefgh",
                              "fingerprint": NOT_A_FINGERPRINT, **kwargs}
    with pytest.raises(InstallerError, match=f"^{names}:"):
        render_installer(site=site_berlin, **values)


def test_it_states_remaining_uses_for_a_multi_use_token(site_berlin: Site) -> None:
    row, token = services.token_create(actor=Actor.system("test"), site=site_berlin, max_uses=5)
    EnrollmentToken.objects.filter(pk=row.pk).update(uses=2)
    text = render_installer(url="https://edgewise.example.org", token=token, fingerprint=NOT_A_FINGERPRINT,
                            site=site_berlin)
    assert "(3 more of 5 nodes)" in text
