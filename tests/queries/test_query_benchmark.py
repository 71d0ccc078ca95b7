"""The end-to-end query benchmark still runs (a few sites, one query), so it cannot rot unnoticed."""

from __future__ import annotations

import pytest

from benchmarks.query.e2e import end_to_end_benchmark

pytestmark = pytest.mark.process


def test_it_measures_one_query_across_simulated_sites_through_the_real_control_plane() -> None:
    figures = end_to_end_benchmark(sites=3, site_rows=600, repeat=1, workers=1)
    assert figures["sites"] == 3 and figures["merged_groups"] > 0
    assert 0 < figures["last_site_received_s"] <= figures["last_site_answered_s"] <= figures["end_to_end_s"]
    assert figures["baseline_sync_round_trip_s"] > 0 and figures["end_to_end_over_sync_round_trip"] > 0
