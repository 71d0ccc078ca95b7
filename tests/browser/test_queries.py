"""The federated query console in a real browser (headless Chromium) against the real control plane and real
edge runtimes, each holding its own data file.

An admin picks the dataset from the catalog, fills in the form, targets two
sites in two regions and follows their answers live on the query's page,
until the merged result, its chart and its CSV are there: the values those of
pandas over the union of both sites' data. A site whose node is offline under
"report as timed out" shows offline, then timed out, while the other answers.
Nothing is fetched from outside the control plane.
"""

from __future__ import annotations

import csv
import re
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from django.utils import timezone
from playwright.sync_api import Browser, Page, expect

from queries.models import FederatedQuery
from queries.services.lifecycle import query_expire
from sites.models import Site
from tests.browser.support import log_in, snap, watch_outside
from tests.fixtures.processes import ControlPlane, EdgeNode, wait_until
from tests.queries.helpers import OPEN_POLICY, data_policy, pandas_reference, plant_frame
from tests.queries.test_federated_e2e import _node_with_data, _offline

pytestmark = [pytest.mark.browser, pytest.mark.process]

LIVE = 60_000  # ms: what the page must show by itself, on a slow machine
QUERY_URL = re.compile(r"/queries/([0-9a-f-]{36})/$")  # no named group: the browser's RegExp reads it too
# The result table's cells, "Sites" (the contributors) included.
TABLE_CELLS = "t => [...t.tBodies[0].rows].map(r => [...r.cells].map(c => c.textContent.trim()))"


@dataclass
class TwoPlants:
    berlin: EdgeNode
    ohio: EdgeNode
    berlin_data: pd.DataFrame
    ohio_data: pd.DataFrame


def _two_plants(edge_node: Any, site_berlin: Site, site_ohio: Site) -> TwoPlants:
    """Berlin (eu) with lines L1, L2 in parquet, Ohio (us) with L2, L4 in sqlite; both catalogs reported."""
    data_policy(OPEN_POLICY)
    berlin_data, ohio_data = plant_frame(11), plant_frame(12, lines=("L2", "L4"))
    berlin = _node_with_data(edge_node, site_berlin, "gw-berlin", berlin_data, "parquet")
    ohio = _node_with_data(edge_node, site_ohio, "gw-ohio", ohio_data, "sqlite")
    return TwoPlants(berlin, ohio, berlin_data, ohio_data)


def _open_page(browser: Browser, cp: ControlPlane) -> tuple[Page, list[str]]:
    """A page logged in as the admin, on the query list; and the list of what it fetches from elsewhere."""
    page: Page = browser.new_page(viewport={"width": 1360, "height": 900}, accept_downloads=True)
    page.set_default_timeout(20_000)
    outside = watch_outside(page, cp)
    log_in(page, cp, "admin", "/queries/")
    expect(page).to_have_url(f"{cp.url}/queries/")
    expect(page.locator("nav.mainnav a[aria-current=page]")).to_have_text("Queries")
    return page, outside


def _fill_query(page: Page, cp: ControlPlane, *, aggregates: list[tuple[str, str]], offline: str,
                deadline_s: int) -> None:
    """From the query list: a new query of ``readings`` at both plants, grouped by line and machine."""
    page.get_by_role("link", name="New query").click()
    expect(page).to_have_url(f"{cp.url}/queries/new")
    catalog = page.locator("#catalog tbody tr", has=page.get_by_role("link", name="readings"))
    expect(catalog).to_contain_text("plant-berlin, plant-ohio")
    expect(catalog.locator("td.num")).to_have_text("6000")  # 3000 rows at each site: counted, never sent
    catalog.get_by_role("link", name="readings").click()  # swaps the form in for this dataset
    expect(page).to_have_url(f"{cp.url}/queries/new?dataset=readings")
    form = page.locator("#query-form form")
    expect(page.locator("#query-form h2")).to_have_text("Query readings")
    for slug in ("plant-berlin", "plant-ohio"):
        form.get_by_label(slug, exact=True).check()
    for column in ("line", "machine"):
        form.locator(f'input[name="group_by"][value="{column}"]').check()
    for i, (op, column) in enumerate(aggregates, start=1):
        form.locator(f'select[name="agg_op_{i}"]').select_option(op)
        form.locator(f'select[name="agg_column_{i}"]').select_option(column)
    form.get_by_label(offline, exact=True).check()
    form.get_by_label("Answer within (seconds)").fill(str(deadline_s))
    form.get_by_role("button", name="Run the query").click()
    expect(page).to_have_url(QUERY_URL)


def _query_of(page: Page) -> FederatedQuery:
    found = QUERY_URL.search(page.url)
    assert found is not None, page.url
    return FederatedQuery.objects.get(uuid=found[1])


def _site_row(page: Page, slug: str) -> Any:
    return page.locator(f'#query-sites tbody tr[data-site="{slug}"]')


def _result_table(page: Page) -> tuple[list[str], list[list[str]]]:
    table = page.locator("#result-table")
    header = [t.strip() for t in table.locator("thead th").all_text_contents()]  # as written, not as styled
    return header, table.evaluate(TABLE_CELLS)


def _assert_table_matches(header: list[str], rows: list[list[str]], expected: pd.DataFrame,
                          contributors: dict[tuple[str, str], int]) -> None:
    """The table's groups, counts, sums and (to the six digits shown) means and deviations are pandas'."""
    assert header[:2] == ["line", "machine"] and header[-1] == "Sites", header
    by_group = {(r[0], r[1]): dict(zip(header, r, strict=True)) for r in rows}
    assert len(by_group) == len(rows), rows  # one row per group
    assert set(by_group) == set(zip(expected["line"], expected["machine"], strict=True)), rows
    for want in expected.itertuples(index=False):
        got = by_group[(want.line, want.machine)]
        assert int(got["count"]) == want.count, (want, got)
        assert float(got["mean_temperature"]) == pytest.approx(want.mean_temperature, rel=1e-5), (want, got)
        if "std_temperature" in got:
            assert float(got["std_temperature"]) == pytest.approx(want.std_temperature, rel=1e-5), (want, got)
        if "sum_parts" in got:
            assert int(got["sum_parts"]) == want.sum_parts, (want, got)
        assert int(got["Sites"]) == contributors[(want.line, want.machine)], (want, got)


def test_it_follows_two_real_sites_live_to_the_merged_table_its_chart_and_its_csv(
    live_control_plane: ControlPlane, edge_node: Any, site_berlin: Site, site_ohio: Site, admin_user: Any,
    browser: Browser,
) -> None:
    cp = live_control_plane
    plants = _two_plants(edge_node, site_berlin, site_ohio)
    expected = pandas_reference([plants.berlin_data, plants.ohio_data])
    page, outside = _open_page(browser, cp)

    # Ohio's node is held (SIGSTOP) while the query is made and sent: the page must be up, with Berlin's answer
    # and Ohio still waiting, before Ohio can answer at all; so the page is seen to follow the sites by itself.
    assert plants.ohio.proc is not None
    plants.ohio.proc.send_signal(signal.SIGSTOP)
    try:
        _fill_query(page, cp, aggregates=[("count", ""), ("mean", "temperature"), ("std", "temperature"),
                                          ("sum", "parts")],
                    offline="Wait for offline sites to come back", deadline_s=60)
        page.evaluate("window.sameDocument = true")  # gone if anything reloads the page
        berlin, ohio = _site_row(page, "plant-berlin"), _site_row(page, "plant-ohio")
        expect(berlin).to_have_attribute("data-state", "answered", timeout=LIVE)
        expect(berlin.locator(".badge")).to_have_text("Answered")
        expect(berlin.locator("td").nth(4)).to_have_text("3000")  # rows scanned there
        expect(ohio).to_have_attribute("data-state", re.compile(r"^(pending|sent|offline)$"))
        expect(page.locator("#query-state")).to_have_attribute("data-state", "running")
        expect(page.locator("#query-live")).to_contain_text("Following the sites live")
        expect(page.locator("#query-result")).to_have_count(0)  # nothing merged before every site is final
    finally:
        plants.ohio.proc.send_signal(signal.SIGCONT)

    expect(ohio).to_have_attribute("data-state", "answered", timeout=LIVE)
    expect(ohio.locator(".badge")).to_have_text("Answered")
    expect(ohio.locator("td").nth(4)).to_have_text("3000")
    expect(page.locator("#query-state")).to_have_attribute("data-state", "complete", timeout=LIVE)
    expect(page.locator("#query-state")).to_have_text("Complete")
    expect(page.locator("#query-live")).not_to_have_attribute("hx-trigger", re.compile("."))  # polling stopped
    assert page.evaluate("window.sameDocument") is True, "the page was reloaded"
    query = _query_of(page)
    assert query.state == "complete" and query.created_by == admin_user
    assert query.spec["group_by"] == ["line", "machine"]
    assert [(a["op"], a.get("column")) for a in query.spec["aggregates"]] == [
        ("count", None), ("mean", "temperature"), ("std", "temperature"), ("sum", "parts")]

    # The merged table: pandas over the union of both plants' data; line L2 runs at both.
    result = page.locator("#query-result")
    expect(result).to_contain_text("9 rows")
    expect(result).to_contain_text("from 2 sites")
    header, rows = _result_table(page)
    assert header == ["line", "machine", "count", "mean_temperature", "std_temperature", "sum_parts", "Sites"]
    contributors = {(line, m): 2 if line == "L2" else 1 for line in ("L1", "L2", "L4") for m in ("M1", "M2", "M3")}
    _assert_table_matches(header, rows, expected, contributors)

    # The chart: one bar per group of the first measure (the count), each titled with its group and value.
    chart = result.locator("figure.query-chart")
    expect(chart.locator("figcaption")).to_have_text("count")
    bars = chart.locator("svg rect")
    expect(bars).to_have_count(len(expected))
    box = chart.locator("svg").bounding_box()
    assert box is not None and box["width"] > 0 and box["height"] > 0
    widths = [float(w) for w in bars.evaluate_all("bs => bs.map(b => b.getAttribute('width'))")]
    assert all(w > 0 for w in widths), widths
    titles = sorted(bars.locator("title").all_text_contents())
    assert titles == sorted(f"{r.line} · {r.machine}: {r.count:.4g}" for r in expected.itertuples()), titles
    # The longest bar is the biggest count.
    counts = {f"{r.line} · {r.machine}": r.count for r in expected.itertuples()}
    longest = max(range(len(widths)), key=widths.__getitem__)
    assert counts[bars.nth(longest).locator("title").text_content().split(":")[0]] == max(counts.values())
    snap(page, "query-detail")

    # The CSV: the table's columns and groups, values at full precision.
    with page.expect_download() as info:
        result.get_by_role("link", name="Download CSV").click()
    download = info.value
    assert download.failure() is None
    assert re.fullmatch(rf"query-readings-{str(query.uuid)[:8]}\.csv", download.suggested_filename)
    with Path(download.path()).open(newline="") as fh:
        csv_rows = list(csv.reader(fh))
    assert csv_rows[0] == header[:-1]
    assert len(csv_rows) - 1 == len(rows) == len(expected)
    table_by_group = {(r[0], r[1]): r for r in rows}
    for csv_row in csv_rows[1:]:
        cells = table_by_group[(csv_row[0], csv_row[1])]
        assert csv_row[2] == cells[2] and csv_row[5] == cells[5], (csv_row, cells)  # count, sum_parts
        for i in (3, 4):  # mean and std: the table shows six digits of the CSV's value
            assert float(csv_row[i]) == pytest.approx(float(cells[i]), rel=1e-5), (csv_row, cells)
    frame = pd.DataFrame(csv_rows[1:], columns=csv_rows[0]).astype(
        {"count": int, "mean_temperature": float, "std_temperature": float, "sum_parts": int})
    frame = frame.sort_values(["line", "machine"]).reset_index(drop=True)
    want = expected.sort_values(["line", "machine"]).reset_index(drop=True)
    assert list(frame["count"]) == list(want["count"]) and list(frame["sum_parts"]) == list(want["sum_parts"])
    for column in ("mean_temperature", "std_temperature"):
        assert list(frame[column]) == pytest.approx(list(want[column]), rel=1e-9)

    assert outside == [], f"the console fetched from outside the control plane: {outside}"


def test_it_shows_an_offline_site_timed_out_at_the_deadline_while_the_other_answers(
    live_control_plane: ControlPlane, edge_node: Any, site_berlin: Site, site_ohio: Site, admin_user: Any,
    browser: Browser,
) -> None:
    cp = live_control_plane
    plants = _two_plants(edge_node, site_berlin, site_ohio)
    _offline(plants.ohio, "gw-ohio")  # stopped, and no longer online to the control plane
    page, outside = _open_page(browser, cp)

    # Long enough for Berlin's node to answer on a slow machine; Ohio times out only when expiry runs.
    _fill_query(page, cp, aggregates=[("count", ""), ("mean", "temperature")],
                offline="Report offline sites as timed out", deadline_s=10)
    page.evaluate("window.sameDocument = true")
    berlin, ohio = _site_row(page, "plant-berlin"), _site_row(page, "plant-ohio")
    expect(ohio).to_have_attribute("data-state", "offline")
    expect(ohio.locator(".badge")).to_have_text("Offline")
    expect(ohio).to_contain_text("its node is offline; timed out at")
    expect(berlin).to_have_attribute("data-state", "answered", timeout=LIVE)
    expect(page.locator("#query-state")).to_have_attribute("data-state", "running")
    query = _query_of(page)
    assert query.offline_behaviour == "timeout"

    # Past the deadline, the expiry (Celery beat's job, run here) times Ohio out; the page follows by itself.
    wait_until(lambda: timezone.now() > query.deadline, timeout=30, what="the answer deadline to pass")
    assert query_expire() == 1
    expect(ohio).to_have_attribute("data-state", "timed_out", timeout=LIVE)
    expect(ohio.locator(".badge")).to_have_text("Timed out")
    expect(ohio).to_contain_text("no answer by the deadline")
    expect(ohio).to_contain_text("its node was offline and did not come back")
    expect(page.locator("#query-state")).to_have_attribute("data-state", "partial", timeout=LIVE)
    expect(page.locator("#query-state")).to_have_text("Partial")
    expect(berlin).to_have_attribute("data-state", "answered")
    assert page.evaluate("window.sameDocument") is True, "the page was reloaded"

    # The merged result is Berlin's alone, and says it is not complete.
    result = page.locator("#query-result")
    expect(result).to_contain_text("from 1 site.")
    expect(result).to_contain_text("Not complete: some data is missing")
    header, rows = _result_table(page)
    assert header == ["line", "machine", "count", "mean_temperature", "Sites"]
    expected = pandas_reference([plants.berlin_data])
    _assert_table_matches(header, rows, expected, dict.fromkeys(zip(expected["line"], expected["machine"],
                                                                    strict=True), 1))
    expect(result.locator("figure.query-chart svg rect")).to_have_count(len(expected))
    snap(page, "query-detail-timed-out")
    assert outside == [], f"the console fetched from outside the control plane: {outside}"
