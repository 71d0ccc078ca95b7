"""Nodes' identity keys: registered, held against what a node presents, replaced only by an operator.

A node signs its audit log with an Ed25519 key of its own
(``edge_runtime.identity_key``) and presents the public half (raw, base64) at
enrollment and on every sync. The rules:

* **One key, one node.** A key is registered to at most one node, revoked
  nodes included (the database holds it: ``sites.models.IDENTITY_KEY_UNIQUE``),
  so the key of a revoked node can never speak for another one. Enrollment
  with a registered key is refused (``sites.services.node_enroll``).
* A node enrolled before identity keys registers its key on the first sync
  that carries one (``node.identity_register``).
* A node that presents a **different** key keeps its registered one: the
  presented key waits in ``identity_key_pending`` (audited once per different
  key, ``node.identity_mismatch``, and logged) until an operator who may
  revoke the node accepts it (:func:`node_identity_accept`,
  ``node.identity_accept``). The sync goes on meanwhile (the node's
  credential is valid); what the node signs is checked against the
  registered key only.
"""

from __future__ import annotations

import logging

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from django.db import IntegrityError, transaction
from django.utils import timezone

from audit.services import Actor, audit_record
from edge_runtime import signing
from sites.models import Node, key_fingerprint
from sites.services import SitesError, identity_key_taken

logger = logging.getLogger("edgewise.sites")


def node_public_key(node: Node) -> Ed25519PublicKey | None:
    """The node's registered identity key; None while it has none."""
    return signing.public_key_from_b64(node.identity_key) if node.identity_key else None


def node_identity_report(*, node: Node, key: str | None, actor: Actor) -> bool:
    """Hold the key a syncing node presents against its registered one; True when that was audited.

    ``node`` is locked by the caller (``sites.sync.node_sync``) and takes the new values.
    """
    if key is None or key == node.identity_key:
        return False
    if not node.identity_key and identity_key_taken(key, other_than=node) is None and _register(node, key):
        audit_record(actor=actor, action="node.identity_register", obj=node, site_uuid=node.site.uuid,
                     after={"identity_key": key_fingerprint(key)})
        return True
    if key == node.identity_key_pending:
        return False
    taken = identity_key_taken(key, other_than=node)
    logger.warning("node %s presents identity key %s, not its registered key %s; kept the registered key%s",
                   node.uuid, key_fingerprint(key)[:16], node.identity_fingerprint[:16] or "(none)",
                   f" ({taken})" if taken else "")
    before = {"identity_key_pending": node.pending_fingerprint}
    node.identity_key_pending = key
    node.save(update_fields=["identity_key_pending"])
    audit_record(actor=actor, action="node.identity_mismatch", obj=node, site_uuid=node.site.uuid, before=before,
                 after={"identity_key": node.identity_fingerprint, "identity_key_pending": key_fingerprint(key),
                        **({"refused": taken} if taken else {})})
    return True


def _register(node: Node, key: str) -> bool:
    """Register ``key`` as the node's identity key; False (nothing changed) when another node took it meanwhile."""
    pending = node.identity_key_pending
    node.identity_key, node.identity_key_at, node.identity_key_pending = key, timezone.now(), ""
    try:
        with transaction.atomic():
            node.save(update_fields=["identity_key", "identity_key_at", "identity_key_pending"])
    except IntegrityError:
        node.identity_key, node.identity_key_at, node.identity_key_pending = "", None, pending
        return False
    return True


def node_identity_accept(*, actor: Actor, node: Node) -> Node:
    """Make the key the node presented (``identity_key_pending``) its registered identity key."""
    with transaction.atomic():
        node = Node.objects.select_for_update().select_related("site").get(pk=node.pk)
        if node.revoked_at is not None:
            raise SitesError("this node is revoked: its identity key cannot change")
        key = node.identity_key_pending
        if not key:
            raise SitesError("this node presented no other identity key to accept")
        taken = identity_key_taken(key, other_than=node)
        if taken:
            raise SitesError(taken)
        before = {"identity_key": node.identity_fingerprint}
        node.identity_key, node.identity_key_at, node.identity_key_pending = key, timezone.now(), ""
        try:
            with transaction.atomic():
                node.save(update_fields=["identity_key", "identity_key_at", "identity_key_pending"])
        except IntegrityError as exc:
            # Registered to another node since the check above.
            raise SitesError(f"identity key {key_fingerprint(key)[:16]} was just registered to another node; "
                             "one key, one node") from exc
        audit_record(actor=actor, action="node.identity_accept", obj=node, site_uuid=node.site.uuid, before=before,
                     after={"identity_key": node.identity_fingerprint})
    return node
