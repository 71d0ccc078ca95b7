"""Identities and desired states for tests that need them without a control plane."""

from __future__ import annotations

import base64
import datetime as dt

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from edge_runtime import signing
from edge_runtime.protocol import DesiredState
from edge_runtime.state import Identity

NODE_ID = "6f1c0a4e-8b43-4c1e-9d43-4b1f7c0b2a11"


def identity_for(key: Ed25519PrivateKey, node_id: str = NODE_ID) -> Identity:
    raw = signing.public_key_raw(key.public_key())
    return Identity(
        node_id=node_id, site="plant-berlin", name="gw-1", role="gateway", credential="ewn_secret",
        url="http://127.0.0.1:1", signing_public_key=base64.b64encode(raw).decode(),
        signing_key_fingerprint=signing.fingerprint(raw), sync_interval_s=1.0, enrolled_at=dt.datetime.now(dt.UTC),
    )


def desired(generation: int, node_id: str = NODE_ID, **labels: str) -> DesiredState:
    return DesiredState(node_id=node_id, generation=generation, issued_at=dt.datetime.now(dt.UTC),
                        sync_interval_s=1.0, site="plant-berlin", labels=labels)
