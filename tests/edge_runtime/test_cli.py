"""``edge-runtime enroll`` and ``status`` as a site technician runs them."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from audit.models import AuditEvent
from audit.services import Actor
from edge_runtime.identity_key import NodeKey
from orchestrator import keys
from sites import services
from sites.models import EnrollmentToken, Node, Site
from tests.fixtures.processes import BIN, ControlPlane, EdgeNode, process_env, wait_until

pytestmark = [pytest.mark.process, pytest.mark.django_db(transaction=True)]


def edge_runtime(*args: str, stdin: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "edge-runtime"), *args], env=process_env(**env), capture_output=True, text=True,
                          timeout=60, input=stdin if stdin is not None else "")


def token(site: Site) -> str:
    return services.token_create(actor=Actor.system("test"), site=site, max_uses=5)[1]


def test_it_enrolls_when_the_fingerprint_matches_and_pins_the_key(
    live_control_plane: ControlPlane, site_berlin: Site, tmp_path: Path
) -> None:
    state_dir = tmp_path / "node"
    fingerprint = keys.public_key_fingerprint()
    result = edge_runtime("enroll", "--url", live_control_plane.url + "/", "--token", token(site_berlin),
                          "--fingerprint", fingerprint.upper(), "--name", "pos-1", "--state-dir", str(state_dir))
    assert result.returncode == 0, result.stderr
    node = Node.objects.get(name="pos-1")
    assert f"enrolled node {node.uuid} (pos-1, device) at site plant-berlin" in result.stdout
    assert f"pinned signing key fingerprint {fingerprint}" in result.stdout
    identity = json.loads((state_dir / "identity.json").read_text())
    assert identity["signing_key_fingerprint"] == fingerprint and identity["node_id"] == str(node.uuid)
    assert identity["url"] == live_control_plane.url
    assert (state_dir / "identity.json").stat().st_mode & 0o077 == 0
    # The node's identity key, created in the state dir, is registered to the node it enrolled.
    node_key = NodeKey.load_or_create(state_dir)
    assert node.identity_fingerprint == node_key.fingerprint and node.identity_key_at is not None
    assert f"identity key fingerprint {node_key.fingerprint}" in result.stdout
    assert AuditEvent.objects.get(action="node.enroll", object_id=str(node.uuid)).after["identity_key"] \
        == node_key.fingerprint


@pytest.mark.parametrize("source", ["env", "stdin"])
def test_it_enrolls_with_a_token_that_is_not_on_its_command_line(
    live_control_plane: ControlPlane, site_berlin: Site, tmp_path: Path, source: str
) -> None:
    value = token(site_berlin)
    options = ["enroll", "--url", live_control_plane.url, "--name", "pos-1", "--state-dir", str(tmp_path / "n")]
    if source == "env":
        result = edge_runtime(*options, EDGEWISE_ENROLLMENT_TOKEN=value)
    else:
        # A pipe adds a line end; the token is the input without it.
        result = edge_runtime(*options, "--token-stdin", stdin=f"{value}\n")
    assert result.returncode == 0, result.stderr
    node = Node.objects.get(name="pos-1")
    assert f"enrolled node {node.uuid} (pos-1, device) at site plant-berlin" in result.stdout
    assert EnrollmentToken.objects.get(site=site_berlin).uses == 1
    assert value not in result.stdout + result.stderr


@pytest.mark.parametrize(
    ("options", "env", "says"),
    [
        ([], {}, "no enrollment token: give it in $EDGEWISE_ENROLLMENT_TOKEN, --token-stdin or --token"),
        (["--token", "ewt_a"], {"EDGEWISE_ENROLLMENT_TOKEN": "ewt_b"},
         "the enrollment token was given more than once ($EDGEWISE_ENROLLMENT_TOKEN and --token); "
         "use exactly one of $EDGEWISE_ENROLLMENT_TOKEN, --token-stdin or --token"),
        (["--token", "ewt_a", "--token-stdin"], {},
         "the enrollment token was given more than once (--token-stdin and --token)"),
        (["--token-stdin"], {"EDGEWISE_ENROLLMENT_TOKEN": "ewt_b"},
         "the enrollment token was given more than once ($EDGEWISE_ENROLLMENT_TOKEN and --token-stdin)"),
        (["--token-stdin"], {}, "--token-stdin: standard input held no enrollment token"),
        ([], {"EDGEWISE_ENROLLMENT_TOKEN": ""}, "$EDGEWISE_ENROLLMENT_TOKEN is set but empty"),
        (["--token", ""], {}, "--token: the enrollment token is empty"),
    ],
)
def test_it_takes_the_token_from_exactly_one_source(
    live_control_plane: ControlPlane, site_berlin: Site, tmp_path: Path, options: list[str], env: dict[str, str],
    says: str,
) -> None:
    # The one stdin input: empty for --token-stdin's own case, a valid token for the others.
    stdin = "" if options == ["--token-stdin"] and not env else token(site_berlin)
    result = edge_runtime("enroll", "--url", live_control_plane.url, *options, "--state-dir", str(tmp_path / "n"),
                          stdin=f"{stdin}\n" if stdin else "  \n", **env)
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"edge-runtime enroll: {says}" in result.stderr
    assert not Node.objects.exists()
    assert not (tmp_path / "n" / "identity.json").exists()


def test_it_names_the_token_source_of_a_malformed_token(
    live_control_plane: ControlPlane, site_berlin: Site, tmp_path: Path
) -> None:
    result = edge_runtime("enroll", "--url", live_control_plane.url, "--token-stdin",
                          "--state-dir", str(tmp_path / "n"), stdin="x" * 5000)
    assert result.returncode == 2
    assert "invalid --token-stdin:" in result.stderr


def test_it_refuses_a_control_plane_with_another_key_and_writes_nothing(
    live_control_plane: ControlPlane, site_berlin: Site, tmp_path: Path
) -> None:
    state_dir = tmp_path / "node"
    result = edge_runtime("enroll", "--url", live_control_plane.url, "--token", token(site_berlin),
                          "--fingerprint", "ab" * 32, "--name", "pos-1", "--state-dir", str(state_dir))
    assert result.returncode == 1
    assert f"signing key fingerprint {keys.public_key_fingerprint()} does not match the expected {'ab' * 32}" \
        in result.stderr
    assert "nothing was written" in result.stderr
    assert not state_dir.exists() or not any(state_dir.iterdir())
    # The check comes before enrollment: the token was not spent, no node exists.
    assert not Node.objects.filter(site=site_berlin).exists()
    assert EnrollmentToken.objects.get(site=site_berlin).uses == 0


def test_it_refuses_a_malformed_fingerprint_before_calling_the_control_plane(
    live_control_plane: ControlPlane, site_berlin: Site, tmp_path: Path
) -> None:
    result = edge_runtime("enroll", "--url", live_control_plane.url, "--token", token(site_berlin),
                          "--fingerprint", "not-hex", "--state-dir", str(tmp_path / "node"))
    assert result.returncode == 2
    assert "--fingerprint must be the 64 hex digits" in result.stderr
    assert not Node.objects.exists()


def test_it_shows_the_control_planes_error_on_a_refused_token(
    live_control_plane: ControlPlane, site_berlin: Site, tmp_path: Path
) -> None:
    result = edge_runtime("enroll", "--url", live_control_plane.url, "--token", "ewt_not-a-real-token",
                          "--state-dir", str(tmp_path / "node"))
    assert result.returncode == 1
    assert "enrollment refused (HTTP 401): unknown enrollment token (field token)" in result.stderr
    assert not (tmp_path / "node" / "identity.json").exists()


def test_it_refuses_to_overwrite_an_identity_unless_forced(
    live_control_plane: ControlPlane, site_berlin: Site, tmp_path: Path
) -> None:
    state_dir = tmp_path / "node"
    value = token(site_berlin)
    first = edge_runtime("enroll", "--url", live_control_plane.url, "--token", value, "--name", "a",
                         "--state-dir", str(state_dir))
    assert first.returncode == 0, first.stderr
    before = (state_dir / "identity.json").read_text()
    again = edge_runtime("enroll", "--url", live_control_plane.url, "--token", value, "--name", "b",
                         "--state-dir", str(state_dir))
    assert again.returncode == 1
    assert "already holds the identity of node" in again.stderr and "--force" in again.stderr
    assert (state_dir / "identity.json").read_text() == before
    assert not Node.objects.filter(name="b").exists()
    forced = edge_runtime("enroll", "--url", live_control_plane.url, "--token", value, "--name", "b", "--force",
                          "--state-dir", str(state_dir))
    assert forced.returncode == 0, forced.stderr
    assert json.loads((state_dir / "identity.json").read_text())["name"] == "b"
    # A new node, so a new identity key: one key belongs to one node.
    a, b = Node.objects.get(name="a"), Node.objects.get(name="b")
    assert b.identity_fingerprint == NodeKey.load_or_create(state_dir).fingerprint != a.identity_fingerprint
    assert a.identity_key and sorted(p.name for p in state_dir.glob("node_key*")) == ["node_key.pem"]


def test_a_failed_enrollment_leaves_only_the_identity_key_which_the_next_attempt_registers(
    live_control_plane: ControlPlane, site_berlin: Site, tmp_path: Path
) -> None:
    state_dir = tmp_path / "node"
    refused = edge_runtime("enroll", "--url", live_control_plane.url, "--token", "ewt_not-a-real-token",
                           "--name", "pos-1", "--state-dir", str(state_dir))
    assert refused.returncode == 1, refused.stderr
    assert [p.name for p in state_dir.iterdir()] == ["node_key.pem"]
    fingerprint = NodeKey.load_or_create(state_dir).fingerprint
    again = edge_runtime("enroll", "--url", live_control_plane.url, "--token", token(site_berlin),
                         "--name", "pos-1", "--state-dir", str(state_dir))
    assert again.returncode == 0, again.stderr
    assert Node.objects.get(name="pos-1").identity_fingerprint == fingerprint


def test_it_refuses_to_enroll_a_second_node_with_the_same_identity_key(
    live_control_plane: ControlPlane, site_berlin: Site, tmp_path: Path
) -> None:
    first = edge_runtime("enroll", "--url", live_control_plane.url, "--token", token(site_berlin),
                         "--name", "pos-1", "--state-dir", str(tmp_path / "one"))
    assert first.returncode == 0, first.stderr
    copy = tmp_path / "two"
    copy.mkdir(mode=0o700)
    (copy / "node_key.pem").write_bytes((tmp_path / "one" / "node_key.pem").read_bytes())
    (copy / "node_key.pem").chmod(0o600)
    second = edge_runtime("enroll", "--url", live_control_plane.url, "--token", token(site_berlin),
                          "--name", "pos-2", "--state-dir", str(copy))
    assert second.returncode == 1
    fingerprint = Node.objects.get(name="pos-1").identity_fingerprint
    assert (f"enrollment refused (HTTP 400): identity key {fingerprint[:16]} is already registered to node pos-1 "
            "at site plant-berlin: one key, one node") in second.stderr
    assert "(field identity_key)" in second.stderr and f"move {copy / 'node_key.pem'} away" in second.stderr
    assert not Node.objects.filter(name="pos-2").exists()
    assert [p.name for p in copy.iterdir()] == ["node_key.pem"]


def test_it_names_a_bad_url_and_an_unreachable_control_plane(tmp_path: Path) -> None:
    bad = edge_runtime("enroll", "--url", "ftp://x", "--token", "ewt_whatever1", "--state-dir", str(tmp_path / "n"))
    assert bad.returncode == 2 and "--url must be an http:// or https:// URL" in bad.stderr
    assert not (tmp_path / "n").exists()
    down = edge_runtime("enroll", "--url", "http://127.0.0.1:9", "--token", "ewt_whatever1",
                        "--state-dir", str(tmp_path / "n"))
    assert down.returncode == 1 and "cannot reach the control plane at http://127.0.0.1:9" in down.stderr
    # Only the identity key, made before the request, for the next attempt to reuse.
    assert [p.name for p in (tmp_path / "n").iterdir()] == ["node_key.pem"]


def test_it_shows_the_status_offline(
    live_control_plane: ControlPlane, edge_node: Callable[..., EdgeNode], site_berlin: Site
) -> None:
    node = edge_node(site_berlin, "gw-1", role="gateway", start=False)
    report = node.status()
    assert report["applied_generation"] == 0 and report["last_sync_at"] is None
    assert report["desired_state"] == {"verified": False, "error": "none received yet"}
    live_control_plane.stop()
    text = node.cli("status", "--state-dir", str(node.state_dir)).stdout
    assert "site:" in text and "plant-berlin" in text and "applied generation:" in text
    assert re.search(rf"^control plane: +{re.escape(live_control_plane.url)}$", text, re.M)
    assert re.search(r"^last sync: +never$", text, re.M)


def test_it_says_when_the_node_is_not_enrolled(tmp_path: Path) -> None:
    for command in ("status", "run"):
        result = edge_runtime(command, "--state-dir", str(tmp_path / "nothing"))
        assert result.returncode == 1
        assert "this node is not enrolled" in result.stderr and "edge-runtime enroll" in result.stderr


def test_it_refuses_a_second_agent_on_the_same_state_dir(
    live_control_plane: ControlPlane, edge_node: Callable[..., EdgeNode], site_berlin: Site
) -> None:
    node = edge_node(site_berlin, "gw-1")
    wait_until(lambda: node.status()["last_sync_at"], what="the first agent to sync")
    second = node.cli("run", "--state-dir", str(node.state_dir), check=False, timeout=30)
    assert second.returncode == 1
    assert "another agent is already running with" in second.stderr
    assert node.proc is not None and node.proc.poll() is None
