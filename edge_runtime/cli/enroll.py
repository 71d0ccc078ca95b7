"""``edge-runtime enroll``: the node's identity, written only once the control plane proved its signing key.

Nothing is written unless the answer's signing key is the one it names and,
with ``--fingerprint``, the one the installer was issued with; with
``--fingerprint`` the control plane must also prove it holds that key before
the one-time token leaves this machine.

The one file written before the answer is the node's identity key
(:mod:`edge_runtime.identity_key`), whose public half the request carries:
an attempt that fails leaves it for the next attempt to reuse. Enrolling an
enrolled directory again (``--force``) makes it a new node with a new key,
put in place only once the enrollment succeeded.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import datetime as dt
import os
import re
import secrets
import socket
import sys
from collections.abc import Mapping
from typing import TextIO
from urllib.parse import urlsplit

import httpx
from cryptography.exceptions import InvalidSignature
from pydantic import ValidationError

from edge_runtime import __version__, signing
from edge_runtime.cli.common import CliError
from edge_runtime.hardware import detect_hardware
from edge_runtime.identity_key import NodeKey, promote_next_key
from edge_runtime.protocol import API_PREFIX, EnrollRequest, EnrollResponse
from edge_runtime.replies import refusal
from edge_runtime.state import Identity, StateDir, StateError

ENROLL_TIMEOUT = httpx.Timeout(30.0, connect=10.0)
FINGERPRINT_RE = re.compile(r"^[0-9a-f]{64}$")
TOKEN_ENV = "EDGEWISE_ENROLLMENT_TOKEN"
TOKEN_SOURCES = f"${TOKEN_ENV}, --token-stdin or --token"


def normalize_url(value: str) -> str:
    parts = urlsplit(value.strip())
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise CliError(f"--url must be an http:// or https:// URL with a host, not {value!r}", 2)
    if parts.query or parts.fragment:
        raise CliError(f"--url must not carry a query or fragment: {value!r}", 2)
    return value.strip().rstrip("/")


def normalize_fingerprint(value: str) -> str:
    cleaned = value.strip().lower().replace(":", "")
    if not FINGERPRINT_RE.match(cleaned):
        raise CliError(f"--fingerprint must be the 64 hex digits of a sha256 fingerprint, not {value!r}", 2)
    return cleaned


def default_node_name() -> str:
    # Host names may hold characters a node name may not (the protocol allows [A-Za-z0-9._-]).
    name = re.sub(r"[^A-Za-z0-9._-]", "-", socket.gethostname()).lstrip("._-")[:100]
    return name or "node"


def enrollment_token(args: argparse.Namespace, environ: Mapping[str, str], stdin: TextIO) -> tuple[str, str]:
    """The token and the name of where it came from; exactly one source may be given."""
    given = [name for name, present in ((f"${TOKEN_ENV}", TOKEN_ENV in environ),
                                        ("--token-stdin", args.token_stdin),
                                        ("--token", args.token is not None)) if present]
    if not given:
        raise CliError(f"no enrollment token: give it in {TOKEN_SOURCES}", 2)
    if len(given) > 1:
        raise CliError(f"the enrollment token was given more than once ({' and '.join(given)}); "
                       f"use exactly one of {TOKEN_SOURCES}", 2)
    source = given[0]
    if source == "--token-stdin":
        # Like `docker login --password-stdin`: the whole input, without the line end a pipe adds.
        value = stdin.read().strip()
        if not value:
            raise CliError("--token-stdin: standard input held no enrollment token", 2)
    elif source == "--token":
        value = args.token.strip()
        if not value:
            raise CliError("--token: the enrollment token is empty", 2)
    else:
        value = environ[TOKEN_ENV].strip()
        if not value:
            raise CliError(f"${TOKEN_ENV} is set but empty; set it to the enrollment token or unset it", 2)
    return value, source


def cmd_enroll(args: argparse.Namespace) -> int:
    url = normalize_url(args.url)
    token, token_source = enrollment_token(args, os.environ, sys.stdin)
    expected = normalize_fingerprint(args.fingerprint) if args.fingerprint else None
    state = StateDir(args.state_dir)
    if state.has_identity() and not args.force:
        _refuse_to_overwrite(state)
    request = _enroll_request(args, token, token_source)
    if expected is not None:
        # Before the one-time token leaves this machine: the control plane at
        # this URL must prove it holds the key the installer was issued with.
        check_signing_key(url, expected)
    # On disk before its public half is registered, so a registered key always
    # has its private half here; an attempt that fails leaves it to the next.
    renew = args.force and state.has_identity()
    node_key = _node_key(state, renew=renew)
    answer = _post_enrollment(url, request.model_copy(update={"identity_key": node_key.public_b64}), node_key)
    actual = _answer_fingerprint(answer, expected)
    identity = Identity(
        node_id=answer.node_id, site=answer.site, name=request.name, role=request.role,
        credential=answer.credential, url=url, signing_public_key=answer.signing_public_key,
        signing_key_fingerprint=actual, sync_interval_s=answer.sync_interval_s,
        enrolled_at=dt.datetime.now(dt.UTC),
    )
    if renew:
        try:
            promote_next_key(state.path)
        except StateError as exc:
            raise CliError(f"node {answer.node_id} was enrolled, but {exc}; nothing else was written") from exc
    if args.force:
        state.clear()
    state.save_identity(identity)
    print(f"enrolled node {identity.node_id} ({identity.name}, {identity.role}) at site {identity.site}")
    print(f"pinned signing key fingerprint {actual}")
    print(f"identity key fingerprint {node_key.fingerprint}")
    print(f"state dir {state.path}")
    return 0


def _refuse_to_overwrite(state: StateDir) -> None:
    try:
        current = state.load_identity()
        who = f"node {current.node_id} ({current.name}) at site {current.site}"
    except StateError:
        who = "a node (its identity file is unreadable)"
    raise CliError(f"{state.path} already holds the identity of {who}; pass --force to enroll again")


def _enroll_request(args: argparse.Namespace, token: str, token_source: str) -> EnrollRequest:
    try:
        return EnrollRequest(
            token=token, name=args.name or default_node_name(), role=args.role,
            runtime_version=__version__, hardware=detect_hardware(),
        )
    except ValidationError as exc:
        first = exc.errors()[0]
        option = {"token": token_source, "name": "--name", "role": "--role"}.get(str(first["loc"][0]), "request")
        raise CliError(f"invalid {option}: {first['msg']}", 2) from exc


def _node_key(state: StateDir, *, renew: bool) -> NodeKey:
    """The node's identity key; a new one, staged beside the enrolled node's, when enrolling again (--force)."""
    try:
        return NodeKey.load_or_create(state.path, next_key=renew)
    except StateError as exc:
        raise CliError(f"{exc}; the token was not used") from exc


def _post_enrollment(url: str, request: EnrollRequest, node_key: NodeKey) -> EnrollResponse:
    endpoint = f"{url}{API_PREFIX}/enroll"
    try:
        response = httpx.post(endpoint, content=request.model_dump_json(),
                              headers={"Content-Type": "application/json"}, timeout=ENROLL_TIMEOUT)
    except httpx.HTTPError as exc:
        raise CliError(f"cannot reach the control plane at {url}: {exc or type(exc).__name__}") from exc
    if response.status_code != 201:
        hint = ""
        if refusal(response)[1] == "identity_key":
            hint = f"; to enroll with a new identity key, move {node_key.path} away"
        raise CliError(f"enrollment refused (HTTP {response.status_code}): {_error_message(response)}{hint}")
    try:
        return EnrollResponse.model_validate_json(response.content)
    except ValidationError as exc:
        raise CliError(f"the control plane's answer is not a valid enrollment: {exc.errors()[0]['msg']}") from exc


def _answer_fingerprint(answer: EnrollResponse, expected: str | None) -> str:
    """The fingerprint of the key the answer sends, once it is the one to pin."""
    # The key must be the one the answer names, and (when the installer says
    # which key to expect) the one the installer was issued with: a different
    # key means a different control plane, or someone in between.
    try:
        raw_key = base64.b64decode(answer.signing_public_key, validate=True)
        signing.public_key_from_b64(answer.signing_public_key)
    except (binascii.Error, signing.SignatureError) as exc:
        raise CliError(f"the control plane sent an unusable signing key: {exc}; nothing was written") from exc
    actual = signing.fingerprint(raw_key)
    if actual != answer.signing_key_fingerprint.lower():
        raise CliError(f"the control plane's signing key has fingerprint {actual}, not the "
                       f"{answer.signing_key_fingerprint} it claims; nothing was written")
    if expected is not None and actual != expected:
        raise CliError(f"the control plane's signing key fingerprint {actual} does not match the expected "
                       f"{expected}; refusing to trust it, nothing was written")
    return actual


def check_signing_key(url: str, expected: str) -> None:
    """Raise CliError unless the control plane proves it holds the key with fingerprint ``expected``."""
    challenge = secrets.token_hex(32)
    try:
        response = httpx.get(f"{url}{API_PREFIX}/signing-key", params={"challenge": challenge},
                             timeout=ENROLL_TIMEOUT)
    except httpx.HTTPError as exc:
        raise CliError(f"cannot reach the control plane at {url}: {exc or type(exc).__name__}") from exc
    if response.status_code != 200:
        raise CliError(f"the control plane did not show its signing key (HTTP {response.status_code}): "
                       f"{_error_message(response)}; the token was not used")
    try:
        body = response.json()
        raw = base64.b64decode(body["public_key"], validate=True)
        proof = base64.b64decode(body["signature"], validate=True)
    except (ValueError, KeyError, TypeError, binascii.Error) as exc:
        raise CliError(f"the control plane's signing key answer is malformed ({exc}); the token was not used") from exc
    actual = signing.fingerprint(raw)
    if actual != expected:
        raise CliError(f"the control plane's signing key fingerprint {actual} does not match the expected "
                       f"{expected}; refusing to trust it, the token was not used and nothing was written")
    try:
        public = signing.public_key_from_b64(body["public_key"])
        public.verify(proof, signing.key_proof_message(challenge))
    except (signing.SignatureError, InvalidSignature) as exc:
        raise CliError("the control plane could not prove it holds the signing key it shows; "
                       "the token was not used and nothing was written") from exc


def _error_message(response: httpx.Response) -> str:
    error, field = refusal(response)
    if error is None:
        return response.reason_phrase or "no error message"
    return error + (f" (field {field})" if field else "")
