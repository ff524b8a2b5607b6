"""The dashboard in real headless Chromium (Debian's /usr/bin/chromium driven by Playwright; no browser is
downloaded), against `fedfleet serve` with real agents rolling out over a real Mosquitto. What the pages show is
checked against the coordinator's database; the charts are uPlot canvases whose ticks, legends, shared time range
and drag-zoom are checked through the page. A screenshot of every page, at 1400x900, goes to
$FEDFLEET_SCREENSHOTS (a temp directory unless set; FEDFLEET_SCREENSHOTS=docs/screenshots refreshes the ones the
README and docs/dashboard.md show)."""

from __future__ import annotations

import json
import os
import tempfile
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from server.dashboard.api import DashboardOptions, create_app
from server.datadir import DataDir
from simulations.models import ModelFamily
from simulations.rig import RELEASES, Rig
from tests.support import AppServer, Mosquitto, wait_for

pytestmark = [pytest.mark.broker, pytest.mark.browser, pytest.mark.slow]

CHROMIUM = Path(os.environ.get("FEDFLEET_CHROMIUM", "/usr/bin/chromium"))
# As root and on a machine with no route out: no sandbox, and no background calls home.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAVES = ["--canary", "2", "--waves", "0.5,1.0", "--bake", "3", "--min-samples", "150", "--silent-after", "60"]
# A test run leaves the working tree as it was: screenshots go to a temp directory unless a person refreshes the
# README's with FEDFLEET_SCREENSHOTS=docs/screenshots.
SHOTS = Path(os.environ.get("FEDFLEET_SCREENSHOTS", Path(tempfile.gettempdir()) / "fedfleet-screenshots"))
VIEWPORT = {"width": 1400, "height": 900}


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: apt-get install -y chromium (scripts/setup.sh --dev does this)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        # Chromium starts its network, storage and GPU services with the first page: start them here, so they
        # belong to this fixture and not to the first test that opens a page (which would "leave" them running).
        warm = b.new_page()
        warm.goto("about:blank")
        warm.close()
        yield b
        b.close()


@pytest.fixture
def rig(tmp_path: Path, mosquitto: Mosquitto) -> Iterator[Rig]:
    r = Rig(tmp_path, devices=6, mqtt_url=mosquitto.url).setup()
    yield r
    r.stop()


def _open(browser: Browser, rig: Rig) -> Page:
    assert rig.coordinator is not None
    page = browser.new_page(viewport=VIEWPORT)
    page.on("dialog", lambda d: d.accept())  # the action buttons confirm first
    page.goto(rig.coordinator.endpoints["dashboard"] + "/#/fleet")
    page.fill("input[name=token]", "not-the-token")  # a wrong token is refused and shows nothing
    page.click("#login button")
    expect(page.locator("#login-error")).to_contain_text("that token belongs to no user")
    expect(page.locator("#fleet-total")).to_have_count(0)
    page.fill("input[name=token]", rig.datadir.operator_token())
    page.click("#login button")
    expect(page.locator("#fleet-total")).to_have_text(str(rig.devices))
    expect(page.locator("#insecure-banner")).to_be_hidden()  # everything on loopback: nothing to warn about
    return page


@pytest.fixture
def page(browser: Browser, rig: Rig) -> Iterator[Page]:
    """A signed-in page on the rig's dashboard, closed even when the test fails (its renderer processes
    would otherwise outlive the test)."""
    p = _open(browser, rig)
    try:
        yield p
    finally:
        p.close()


def test_plaintext_beyond_loopback_shows_a_banner_on_every_page(browser: Browser, tmp_path: Path) -> None:
    """What `serve --allow-plaintext-network` accepted is on every page, before and after signing in."""
    d = DataDir.init(tmp_path / "data")[0]
    exposure = "gRPC for devices would listen in plaintext on 0.0.0.0:50051: serve with --tls"
    server = AppServer(create_app(d, DashboardOptions(d.operator_token(), plaintext_exposures=(exposure,))))
    page = browser.new_page()
    try:
        page.goto(server.url + "/#/fleet")
        banner = page.locator("#insecure-banner")
        expect(banner).to_be_visible()
        expect(banner).to_contain_text("--allow-plaintext-network")
        expect(banner).to_contain_text(exposure)
        page.fill("input[name=token]", d.operator_token())
        page.click("#login button")
        expect(page.locator("#fleet-total")).to_have_text("0")
        for route in ("rollouts", "alerts", "audit"):
            page.goto(f"{server.url}/#/{route}")
            expect(banner).to_be_visible()
    finally:
        page.close()
        server.stop()


def _shot(page: Page, name: str, full_page: bool = False) -> None:
    """The page as a person sees it at 1400x900 (the first screen; full_page for the whole page)."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.set_viewport_size(VIEWPORT)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=full_page)


def _go(page: Page, route: str) -> None:
    """Open a hash route and wait until the page has drawn it."""
    before = int(page.evaluate("document.body.dataset.renders || '0'"))
    page.goto(page.url.split("#")[0] + f"#/{route}")
    # (not page.wait_for_function: its string predicate is an eval, which the dashboard's CSP refuses, as it should)
    wait_for(lambda: int(page.evaluate("document.body.dataset.renders || '0'")) > before, 30, 0.05, what=route)


def _chart(page: Page, name: str) -> dict[str, str]:
    """A chart box's range and tick labels (data-x-min, data-x-max, data-x-ticks), as the chart last drew them."""
    box = page.locator(f"[data-chart='{name}']").first
    expect(box.locator("canvas")).to_have_count(1)
    doc: dict[str, str] = box.evaluate("b => ({min: b.dataset.xMin, max: b.dataset.xMax, ticks: b.dataset.xTicks})")
    return doc


def _drag(page: Page, name: str, start: float, end: float) -> None:
    """Drag across a chart's plot from `start` to `end` (fractions of its width): uPlot's zoom."""
    over = page.locator(f"[data-chart='{name}'] .u-over").first
    b = over.bounding_box()
    assert b is not None
    y = b["y"] + b["height"] / 2
    page.mouse.move(b["x"] + b["width"] * start, y)
    page.mouse.down()
    page.mouse.move(b["x"] + b["width"] * (start + end) / 2, y, steps=4)
    page.mouse.move(b["x"] + b["width"] * end, y, steps=4)
    page.mouse.up()


def _phase(rig: Rig, rollout_id: str) -> str:
    return str(rig.store_query("SELECT phase FROM rollouts WHERE id = ?", [rollout_id])[0]["phase"])


def test_dashboard_follows_rollouts_live_and_its_pause_button_pauses_the_coordinator(
    page: Page, rig: Rig, tmp_path: Path
) -> None:
    # Update states in words, not the agent's enum.
    expect(page.locator("#main table tbody")).to_contain_text("idle")
    expect(page.locator("#main table tbody")).not_to_contain_text("UPDATE_STATE")
    _shot(page, "fleet")
    page.select_option("select[name=label]", "site=site-1")  # filter by cohort: the devices the store says
    page.click("#filters button")
    site1 = rig.store_query("SELECT id FROM devices WHERE json_extract(labels, '$.site') = 'site-1' ORDER BY id")
    expect(page.locator("#main table tbody tr")).to_have_count(len(site1))
    expect(page.locator("#main table tbody")).to_contain_text(site1[0]["id"])

    # A healthy rollout: its page advances through the waves while it is open, without a reload.
    healthy = rig.cli("rollout", "start", RELEASES["healthy"], "--fleet", rig.fleet_name, *WAVES)["id"]
    _go(page, f"rollout/{healthy}")
    page.evaluate("window.__notReloaded = true")
    seen_waves = set()

    def advanced() -> bool:
        seen_waves.add(page.locator("#wave").inner_text())
        return "completed" in page.locator("#phase").inner_text()

    wait_for(advanced, 120, 0.1, what="the rollout page to show the rollout completed")
    assert _phase(rig, healthy) == "completed"
    assert len(seen_waves) >= 2, seen_waves  # saw at least two waves go by on the same page
    # one numbering: canary, then wave 1…N
    assert seen_waves <= {"not started", "canary", "wave 1 of 2", "wave 2 of 2"}, seen_waves
    assert page.evaluate("window.__notReloaded") is True
    expect(page.locator("#decisions")).to_contain_text("advance")
    status = rig.status(healthy)
    expect(page.locator("#wave")).to_have_text(status["wave_label"])
    # Finished: no actions offered, the last gate values kept, progress bars as full as the waves are.
    expect(page.locator("button[data-action]")).to_have_count(0)
    expect(page.locator("#actions-note")).to_contain_text("nothing more can be done")
    expect(page.locator("#gates-now table tbody tr").first).to_be_visible()
    expect(page.locator(".progress-text").first).to_contain_text("2 of 2 running it")
    # Charts: uPlot canvases with time ticks, a legend, a threshold from the rollout's own gates.
    psi = _chart(page, "input_max_psi")
    # A fast rollout spans ~10 s, which uPlot labels every 5 s: two ticks is all a short span truthfully has.
    assert len(psi["ticks"].split("|")) >= 2, psi
    assert all(":" in t for t in psi["ticks"].split("|")), psi  # clock times
    expect(page.locator("[data-chart=input_max_psi] .u-legend")).to_contain_text("input_max_psi")
    # Zoom: a drag across one chart narrows its time range, and every gate chart follows.
    _drag(page, "input_max_psi", 0.3, 0.7)
    zoomed = _chart(page, "input_max_psi")
    assert int(zoomed["min"]) > int(psi["min"]) and int(zoomed["max"]) < int(psi["max"]), (psi, zoomed)
    other = _chart(page, "failure_rate")
    assert (other["min"], other["max"]) == (zoomed["min"], zoomed["max"])
    page.dblclick("[data-chart=input_max_psi] .u-over")
    assert _chart(page, "failure_rate")["min"] == psi["min"]
    _shot(page, "rollout-completed", full_page=True)

    # A broken build: its page names the gate that fired and outlines its chart.
    bad = rig.cli("rollout", "start", RELEASES["scrambled"], "--fleet", rig.fleet_name, *WAVES)["id"]
    _go(page, f"rollout/{bad}")
    expect(page.locator(".fired-gate").first).to_contain_text("class_mix_shift", timeout=120_000)
    fired = [
        g["metric"]
        for d in rig.status(bad)["decisions"]
        if d["decision"] == "rollback"
        for g in d["gates"]
        if g["verdict"] == "fail"
    ]
    assert "class_mix_shift" in fired
    expect(page.locator(".chart.fired[data-chart=class_mix_shift]")).to_have_count(1)
    wait_for(lambda: _phase(rig, bad) == "rolled_back", 60, what="the broken build to be rolled back")
    expect(page.locator("#phase")).to_contain_text("rolled back")
    expect(page.locator(".wave-states").first).not_to_contain_text("rolling back")
    expect(page.locator("button[data-action]")).to_have_count(0)
    _shot(page, "rollout-rolled-back", full_page=True)

    # The pause button pauses the rollout in the coordinator's state; on a paused rollout Pause is disabled.
    slow = rig.cli("rollout", "start", RELEASES["scrambled"], "--fleet", rig.fleet_name, "--bake", "600")["id"]
    _go(page, f"rollout/{slow}")
    wait_for(lambda: _phase(rig, slow) == "baking", 30, what="the third rollout to bake its canary")
    expect(page.locator("button[data-action=resume]")).to_be_disabled()
    page.click("button[data-action=pause]")
    expect(page.locator("#phase")).to_contain_text("paused")
    assert _phase(rig, slow) == "paused"
    expect(page.locator("button[data-action=pause]")).to_be_disabled()
    expect(page.locator("button[data-action=resume]")).to_be_enabled()
    audit = rig.cli("audit", "list", "--limit", "5")
    # the audit names the user whose token the page signed in with: the operator token is the admin user "operator"
    assert any(a["action"] == "rollout.pause" and a["actor"] == "user:operator" for a in audit), audit
    _shot(page, "rollout-paused")

    # A device page shows the device's events, as the coordinator stored them, and its pooled PSI chart with the
    # policy's threshold.
    device = rig.device_ids()[0]
    _go(page, f"device/{device}")
    kinds = {r["kind"] for r in rig.store_query("SELECT kind FROM events WHERE device_id = ?", [device])}
    assert "committed" in kinds
    expect(page.locator("#timeline")).to_contain_text("committed")
    expect(page.locator("[data-chart=device-psi] canvas")).to_have_count(1)
    expect(page.locator("[data-chart=device-psi] .u-legend")).to_contain_text("largest input PSI")
    _shot(page, "device")

    # A release whose model card carries a script: the card is rendered, the script shown as text, never run.
    model = tmp_path / "carded.tflite"
    model.write_bytes(ModelFamily().base())
    card = tmp_path / "card.json"
    card.write_text(json.dumps({"intended_use": "<script>window.__pwned = 1</script> digits", "owner": "lab"}))
    rig.cli("release", str(model), "--name", "carded", "--version", "1.0.0", "--card", str(card))
    _go(page, "releases")
    releases = rig.store_query("SELECT id FROM releases")
    expect(page.locator("#releases tbody tr")).to_have_count(len(releases))
    row = page.locator("#releases tbody tr", has_text=RELEASES["base"])
    running_base = rig.store_query("SELECT COUNT(*) AS n FROM devices WHERE running_release = ?", [RELEASES["base"]])
    expect(row.locator(".devices-running")).to_have_text(str(running_base[0]["n"]))
    expect(page.locator("#releases tbody tr", has_text=RELEASES["healthy"])).to_contain_text(healthy)
    _shot(page, "releases")
    _go(page, "release/carded@1.0.0")
    expect(page.locator("#model-card h1")).to_contain_text("carded@1.0.0")
    expect(page.locator("#model-card")).to_contain_text("<script>window.__pwned = 1</script> digits")
    expect(page.locator("#model-card script")).to_have_count(0)
    assert page.evaluate("window.__pwned") is None
    _shot(page, "release-card")
    # Assigning from the release page goes through POST /api/assignments; a fleet with no devices is refused, the
    # refusal shown and nothing assigned.
    assigned_before = rig.store_query("SELECT COUNT(*) AS n FROM assignments")[0]["n"]
    page.fill("#assign-form input[name=fleet]", "no-such-fleet")
    page.click("#assign-form button")
    expect(page.locator("#action-result")).to_contain_text("refused")
    expect(page.locator("#action-result")).to_contain_text("no registered devices")
    assert rig.store_query("SELECT COUNT(*) AS n FROM assignments")[0]["n"] == assigned_before

    # Drift: heatmaps with a colour scale and the line charts on one time axis, the policy's threshold drawn.
    _go(page, "drift?cohort_by=site&minutes=5")
    expect(page.locator("#drift-series .colour-scale").first).to_be_visible()
    heat = page.locator("#drift-series [data-chart^=heatmap]")
    expect(heat.first.locator("canvas")).to_have_count(1)
    ranges = page.eval_on_selector_all(
        "#drift-series [data-chart]", "bs => bs.map(b => [b.dataset.xMin, b.dataset.xMax])"
    )
    assert len(ranges) >= 2 and len(set(map(tuple, ranges))) == 1, ranges  # one time axis for every chart
    expect(page.locator("#main")).to_contain_text("threshold, 0.25")
    _shot(page, "drift")

    # Audit: within the page's width, filtered by actor.
    _go(page, "audit")
    expect(page.locator("#audit-status")).to_contain_text("verified")
    widths = page.evaluate(
        "[document.querySelector('#audit-table table').scrollWidth, document.documentElement.clientWidth]"
    )
    assert widths[0] <= widths[1], widths
    _shot(page, "audit")
    trail = rig.cli("audit", "list", "--limit", "1000")
    pauser = next(a["actor"] for a in trail if a["action"] == "rollout.pause")
    page.select_option("select[name=actor]", pauser)
    page.click("#audit-filters button")
    expect(page.locator("#audit-table tbody tr")).to_have_count(sum(1 for a in trail if a["actor"] == pauser))
    expect(page.locator("#audit-table tbody")).to_contain_text("rollout.pause")

    # Privacy: the ledger export and a budget set from the page (PUT /api/privacy/budgets/...), audited.
    _go(page, "privacy")
    expect(page.locator("#ledger")).to_be_visible()
    page.fill("#budget-form input[name=device]", device)
    page.fill("#budget-form input[name=epsilon]", "3")
    page.click("#budget-form button")
    expect(page.locator("#action-result")).to_contain_text(f"budget of {device}: now 3")
    budgets = [a for a in rig.cli("audit", "list", "--limit", "5") if a["action"] == "privacy.budget"]
    assert budgets and budgets[0]["subject"] == device and budgets[0]["actor"] == "user:operator", budgets
    _shot(page, "privacy")

    # Users (the operator token is an admin's): a user added on the page gets a token, shown once, that signs in.
    _go(page, "users")
    expect(page.locator("nav a.active")).to_have_text("Users")
    page.fill("#user-form input[name=name]", "ana")
    page.select_option("#user-form select[name=role]", "viewer")
    page.click("#user-form button")
    expect(page.locator("#action-result")).to_contain_text("add ana: done")
    expect(page.locator("#users tbody")).to_contain_text("ana")
    new_token = page.locator("#new-token code").inner_text()
    assert rig.store_query("SELECT role FROM users WHERE name = 'ana'")[0]["role"] == "viewer"
    assert rig.coordinator is not None
    request = urllib.request.Request(
        rig.coordinator.endpoints["dashboard"] + "/api/session", headers={"Authorization": f"Bearer {new_token}"}
    )
    with urllib.request.urlopen(request, timeout=10) as answer:
        assert json.load(answer)["user"] == "ana"
    _shot(page, "users")

    for route, name in (
        ("rollouts", "rollouts"),
        ("training", "training"),
        ("models", "models"),
        ("alerts", "alerts"),
        ("api", "api"),
    ):
        _go(page, route)
        expect(page.locator("nav a.active")).to_have_count(1)
        _shot(page, name)
    expect(page.locator("#main")).to_contain_text("/api/releases")
    _go(page, "rollouts")
    expect(page.locator("table")).to_contain_text(slow)
