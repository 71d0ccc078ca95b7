"""Rotating the signing key and starting epochs: the two changes that republish every node.

Guarantees:

* A rotation is safe against a stop at any point (see
  :func:`signing_key_rotate`), and whatever the features signed (model
  artifacts) is signed again with the new key in the rotation's transaction.
* After either change every enrolled node's desired state is published again
  in the new epoch.
"""

from __future__ import annotations

import logging

from django.db import transaction
from django.utils import timezone

from audit.services import Actor, audit_record
from edge_runtime import signing
from orchestrator import features, keys, quiet
from orchestrator.desired_state import desired_state_republish_all
from orchestrator.models import SigningKey

logger = logging.getLogger("edgewise.keys")


def epoch_start(*, actor: Actor, reason: str) -> str:
    """Start a new epoch and republish every node in it; returns the epoch's id.

    What an operator runs after restoring the database from a backup: the
    restored generations may be lower than what nodes applied, and a later
    epoch is accepted whatever its generation.
    """
    if not reason.strip():
        raise ValueError("say why a new epoch starts (for example: restored from the backup of <date>)")
    trust = keys.current(fresh=True)
    with transaction.atomic():
        epoch = keys.new_epoch(trust.fingerprint, reason.strip())
        audit_record(actor=actor, action="epoch.start", object_repr=f"epoch {epoch.uuid}",
                     after={"epoch": str(epoch.uuid), "reason": reason.strip(), "key": trust.fingerprint})
    keys.forget()
    quiet.forget_all()
    desired_state_republish_all(actor=actor)
    return str(epoch.uuid)


def signing_key_rotate(*, actor: Actor) -> str:
    """Replace the signing key with a new one that the old one endorses; returns the new fingerprint.

    Safe against a stop at any point: the new key is written beside the old
    one first, the database switches in one transaction (new key row,
    endorsement, artifacts signed again, new epoch, audit event), and the file
    moves into place after the commit; a start after a stop in between
    finishes the move (:func:`orchestrator.keys.finish_rotation`).
    """
    old_trust = keys.current(fresh=True)
    old = old_trust.key
    path = keys.key_path()
    pending = keys.next_key_path(path)
    pending.unlink(missing_ok=True)
    new = signing.generate_private_key()
    keys.write_key_file(pending, new)
    new_fp = keys.fingerprint_of(new)
    now = timezone.now()
    endorsement = signing.endorse_key(new.public_key(), old, issued_at=now)
    try:
        with transaction.atomic():
            active = SigningKey.objects.select_for_update().get(retired_at__isnull=True)
            if active.fingerprint != old_trust.fingerprint:
                raise keys.SigningKeyError("another rotation changed the signing key meanwhile; nothing was changed")
            active.retired_at = now
            active.save(update_fields=["retired_at"])
            SigningKey.objects.create(fingerprint=new_fp, public_key=endorsement.public_key,
                                      endorsement=endorsement.model_dump(mode="json"), created_at=now)
            resigned = sum(feature.sign_again(new) for feature in features.node_features())
            epoch = keys.new_epoch(new_fp, "signing key rotated")
            audit_record(actor=actor, action="signing_key.rotate", object_repr=f"signing key {new_fp[:16]}",
                         before={"key": old_trust.fingerprint},
                         after={"key": new_fp, "epoch": str(epoch.uuid), "artifacts_signed": resigned})
    except BaseException:
        pending.unlink(missing_ok=True)
        raise
    with transaction.atomic():
        # Under the lock, as a starting process would: whoever comes first moves the files.
        keys.trust_lock()
        keys.finish_rotation(path, SigningKey.objects.get(fingerprint=new_fp))
    keys.forget()
    quiet.forget_all()
    logger.warning("rotated the signing key: %s -> %s", old_trust.fingerprint[:16], new_fp[:16])
    desired_state_republish_all(actor=actor)
    return new_fp
