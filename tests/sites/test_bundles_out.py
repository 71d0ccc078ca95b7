"""Importing a bundle out at the control plane (``sites.bundles_out.bundle_import``) and naming a bundle in
(``manage.py bundle_export``): each refusal names what is wrong, and nothing of a refused bundle is taken."""

from __future__ import annotations

import datetime as dt
import os
import uuid
from pathlib import Path
from typing import Any

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from audit.models import AuditEvent
from edge_runtime import protocol, signing
from edge_runtime.airgap.bundle import BundleRefused
from edge_runtime.airgap.writing import Source, write_bundle
from sites import services
from sites.bundles import bundle_export
from sites.bundles_out import MAX_MEMBER_BYTES, bundle_import
from sites.models import Connectivity, Node, Region, Site, SiteBundle
from sites.services import SitesError
from tests.fixtures.personas import make_site
from tests.sites.bundle_helpers import ACTOR, bundle_out, enroll

pytestmark = pytest.mark.django_db


@pytest.fixture
def base7(region_eu: Region) -> Site:
    return make_site(region_eu, "base-7", name="Base 7", jurisdiction="DE", connectivity=Connectivity.AIR_GAPPED)


def refused(path: Path, node: Node, match: str) -> None:
    """``path`` is refused with ``match`` and leaves no trace: no row, no audit event, the node as it was."""
    before = Node.objects.get(pk=node.pk).last_seen_at
    with pytest.raises(BundleRefused, match=match):
        bundle_import(actor=ACTOR, path=path)
    assert not SiteBundle.objects.filter(direction="out", sequence__gt=_taken(node)).exists()
    assert not AuditEvent.objects.filter(action="bundle.import", after__sequence__gt=_taken(node)).exists()
    assert Node.objects.get(pk=node.pk).last_seen_at == before


def _taken(node: Node) -> int:
    return max([0, *SiteBundle.objects.filter(node=node, direction="out").values_list("sequence", flat=True)])


def test_it_refuses_a_bundle_naming_another_site_than_the_nodes(base7: Site, region_eu: Region,
                                                                tmp_path: Path) -> None:
    make_site(region_eu, "base-9", connectivity=Connectivity.AIR_GAPPED)
    key = signing.generate_private_key()
    node = enroll(base7, "s-1", key)
    path = bundle_out(tmp_path / "out-1.ewb", node, key, site="base-9")
    refused(path, node, "the bundle names site base-9, but node s-1 belongs to base-7")


def test_it_refuses_a_revoked_nodes_bundle_even_one_written_before_the_revocation(base7: Site,
                                                                                   tmp_path: Path) -> None:
    key = signing.generate_private_key()
    node = enroll(base7, "s-1", key)
    path = bundle_out(tmp_path / "out-1.ewb", node, key)
    services.node_revoke(actor=ACTOR, node=node)
    refused(path, node, "node s-1 of base-7 was revoked: nothing it sends is taken")


def test_it_refuses_a_node_it_does_not_know(base7: Site, tmp_path: Path) -> None:
    key = signing.generate_private_key()
    stranger = Node(uuid=uuid.uuid4(), site=base7, name="ghost")  # never enrolled here
    path = bundle_out(tmp_path / "out-1.ewb", stranger, key)
    with pytest.raises(BundleRefused, match=f"written by node {stranger.uuid}, which this control plane does not"):
        bundle_import(actor=ACTOR, path=path)
    assert not SiteBundle.objects.exists()


def test_it_refuses_a_bundle_signed_by_another_key_than_the_nodes(base7: Site, tmp_path: Path) -> None:
    node = enroll(base7, "s-1", signing.generate_private_key())
    path = bundle_out(tmp_path / "out-1.ewb", node, signing.generate_private_key())
    refused(path, node, "not by the expected key")


def test_it_refuses_a_node_without_a_registered_key(base7: Site, tmp_path: Path) -> None:
    node = enroll(base7, "s-1")
    path = bundle_out(tmp_path / "out-1.ewb", node, signing.generate_private_key())
    refused(path, node, "node s-1 has no identity key registered")


def test_it_refuses_an_older_bundle_and_another_file_under_a_sequence_taken(base7: Site, tmp_path: Path) -> None:
    key = signing.generate_private_key()
    node = enroll(base7, "s-1", key)
    now = timezone.now()
    first = bundle_out(tmp_path / "out-1.ewb", node, key, sequence=1, created=now - dt.timedelta(hours=2))
    second = bundle_out(tmp_path / "out-2.ewb", node, key, sequence=2, created=now - dt.timedelta(hours=1))
    other = bundle_out(tmp_path / "out-2b.ewb", node, key, sequence=2, created=now)
    assert not bundle_import(actor=ACTOR, path=second).again
    refused(first, node, "bundle out 1 of node s-1 is older than bundle 2, imported already")
    refused(other, node, "node s-1 wrote another bundle out 2, imported .*: this one is not that file")
    assert bundle_import(actor=ACTOR, path=second).again
    assert list(SiteBundle.objects.filter(direction="out").values_list("sequence", flat=True)) == [2]


def test_it_refuses_a_bundle_without_the_nodes_report(base7: Site, tmp_path: Path) -> None:
    key = signing.generate_private_key()
    node = enroll(base7, "s-1", key)
    meta = {"direction": "out", "site": "base-7", "node": str(node.uuid), "sequence": 1,
            "created": timezone.now(), "expires": timezone.now() + dt.timedelta(days=1)}
    write_bundle(tmp_path / "out-1.ewb", meta, [Source.json("inventory.json", {"artifacts": []})], key)
    refused(tmp_path / "out-1.ewb", node, "the bundle lacks report.json: it is no bundle out of a node")


def test_it_refuses_a_report_that_is_not_one_naming_the_field(base7: Site, tmp_path: Path) -> None:
    key = signing.generate_private_key()
    node = enroll(base7, "s-1", key)
    path = bundle_out(tmp_path / "out-1.ewb", node, key, report={"runtime_version": 7, "actual": {}})
    refused(path, node, "report.json: runtime_version: Input should be a valid string")


def test_it_refuses_a_member_larger_than_a_bundle_out_holds_before_storing_it(base7: Site,
                                                                             tmp_path: Path) -> None:
    key = signing.generate_private_key()
    node = enroll(base7, "s-1", key)
    big = Source(name="telemetry/000001.json", data=b" " * (MAX_MEMBER_BYTES + 1))
    path = bundle_out(tmp_path / "out-1.ewb", node, key, extra=[big])
    refused(path, node, f"telemetry/000001.json: {MAX_MEMBER_BYTES + 1} bytes, more than a bundle out's member")


def test_the_command_names_the_file_by_the_sequence_it_gets(base7: Site, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    enroll(base7, "s-1", signing.generate_private_key())
    monkeypatch.chdir(tmp_path)
    call_command("bundle_export", "--site", "base-7")
    call_command("bundle_export", "--site", "base-7")
    assert sorted(os.listdir(tmp_path)) == ["base-7-in-1.ewb", "base-7-in-2.ewb"]
    assert list(SiteBundle.objects.order_by("sequence").values_list("sequence", flat=True)) == [1, 2]
    with pytest.raises(CommandError, match="no site with the slug 'nowhere'"):
        call_command("bundle_export", "--site", "nowhere")


def test_it_refuses_to_write_under_a_sequence_taken_meanwhile(base7: Site, tmp_path: Path) -> None:
    enroll(base7, "s-1", signing.generate_private_key())
    bundle_export(actor=ACTOR, site=base7, path=tmp_path / "in-1.ewb")
    with pytest.raises(SitesError, match="bundle in 1 for site base-7 was made meanwhile; the next one is 2"):
        bundle_export(actor=ACTOR, site=base7, path=tmp_path / "base-7-in-1.ewb", expected_sequence=1)
    assert not (tmp_path / "base-7-in-1.ewb").exists()
    assert SiteBundle.objects.count() == 1


def test_the_import_command_says_what_it_took_and_what_it_refused(base7: Site, tmp_path: Path,
                                                                  capsys: Any) -> None:
    key = signing.generate_private_key()
    node = enroll(base7, "s-1", key)
    path = bundle_out(tmp_path / "out-1.ewb", node, key)
    call_command("bundle_import", str(path))
    assert "imported bundle out 1 of node s-1 of base-7" in capsys.readouterr().out
    call_command("bundle_import", str(path))
    assert "was imported already" in capsys.readouterr().out
    with pytest.raises(CommandError, match="does not exist"):
        call_command("bundle_import", str(tmp_path / "missing.ewb"))
    services.node_revoke(actor=ACTOR, node=node)
    later = bundle_out(tmp_path / "out-2.ewb", node, key, sequence=2)
    with pytest.raises(CommandError, match="refused .*out-2.ewb: node s-1 of base-7 was revoked.*nothing was taken"):
        call_command("bundle_import", str(later))


def _frames(count: int, *, per_frame: int = 2) -> list[Source]:
    from tests.sites.test_telemetry import T0, point

    frames = []
    for n in range(count):
        items = [point(n * per_frame + i + 1, T0 + dt.timedelta(seconds=n * per_frame + i)) for i in range(per_frame)]
        frames.append(Source(name=f"telemetry/{n + 1:06d}.json",
                             data=protocol.TelemetryFrame(items=items).model_dump_json().encode()))
    return frames


def test_it_stores_many_frames_a_batch_at_a_time_and_all_of_them(base7: Site, tmp_path: Path) -> None:
    from sites.bundles_out import FRAMES_PER_COMMIT
    from sites.telemetry.models import TelemetryStream

    key = signing.generate_private_key()
    node = enroll(base7, "s-1", key)
    count = 2 * FRAMES_PER_COMMIT + 7  # three commits
    taken = bundle_import(actor=ACTOR, path=bundle_out(tmp_path / "out-1.ewb", node, key, extra=_frames(count)))
    stream = TelemetryStream.objects.get(node=node)
    assert (taken.bundle.summary["telemetry_items"], taken.bundle.summary["telemetry_seq"]) == (2 * count, 2 * count)
    assert (stream.last_seq, stream.points) == (2 * count, 2 * count)
    assert taken.bundle.receipt["receipt"]["telemetry_seq"] == 2 * count


def test_it_refuses_a_bad_frame_after_good_ones_before_storing_any(base7: Site, tmp_path: Path) -> None:
    from sites.telemetry.models import TelemetryStream

    key = signing.generate_private_key()
    node = enroll(base7, "s-1", key)
    bad = Source(name="telemetry/000004.json", data=b'{"type": "telemetry", "items": []}')
    path = bundle_out(tmp_path / "out-1.ewb", node, key, extra=[*_frames(3), bad])
    refused(path, node, "telemetry/000004.json: items: List should have at least 1 item")
    assert not TelemetryStream.objects.filter(node=node, points__gt=0).exists()
