"""The dashboard in real headless Chromium (Debian's /usr/bin/chromium driven by Playwright; no browser is
downloaded), against `fedfleet serve` with real agents rolling out over a real Mosquitto. What the pages show is
checked against the coordinator's database. Screenshots of the main pages go to test-artifacts/screenshots/
(or $FEDFLEET_TEST_ARTIFACTS/screenshots)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from server.dashboard.api import DashboardOptions, create_app
from server.datadir import DataDir
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
SHOTS = (
    Path(os.environ.get("FEDFLEET_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts"))
    / "screenshots"
)


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
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    page.on("dialog", lambda d: d.accept())  # the action buttons confirm first
    page.goto(rig.coordinator.endpoints["dashboard"] + "/#/fleet")
    page.fill("input[name=token]", "not-the-token")  # a wrong token is refused and shows nothing
    page.click("#login button")
    expect(page.locator("#login-error")).to_contain_text("not the operator token")
    expect(page.locator("#fleet-total")).to_have_count(0)
    page.fill("input[name=token]", rig.datadir.operator_token())
    page.click("#login button")
    expect(page.locator("#fleet-total")).to_have_text(str(rig.devices))
    expect(page.locator("#insecure-banner")).to_be_hidden()  # everything on loopback: nothing to warn about
    return page


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
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=full_page)


def _phase(rig: Rig, rollout_id: str) -> str:
    return str(rig.store_query("SELECT phase FROM rollouts WHERE id = ?", [rollout_id])[0]["phase"])


def test_dashboard_follows_rollouts_live_and_its_pause_button_pauses_the_coordinator(
    browser: Browser, rig: Rig
) -> None:
    page = _open(browser, rig)
    _shot(page, "fleet")
    page.select_option("select[name=label]", "site=site-1")  # filter by cohort: the devices the store says
    page.click("#filters button")
    site1 = rig.store_query("SELECT id FROM devices WHERE json_extract(labels, '$.site') = 'site-1' ORDER BY id")
    expect(page.locator("#main table tbody tr")).to_have_count(len(site1))
    expect(page.locator("#main table tbody")).to_contain_text(site1[0]["id"])

    # A healthy rollout: its page advances through the waves while it is open, without a reload.
    healthy = rig.cli("rollout", "start", RELEASES["healthy"], "--fleet", rig.fleet_name, *WAVES)["id"]
    page.goto(page.url.split("#")[0] + f"#/rollout/{healthy}")
    page.evaluate("window.__notReloaded = true")
    seen_waves = set()

    def advanced() -> bool:
        seen_waves.add(page.locator("#wave").inner_text())
        return "completed" in page.locator("#phase").inner_text()

    wait_for(advanced, 120, 0.1, what="the rollout page to show the rollout completed")
    assert _phase(rig, healthy) == "completed"
    assert len(seen_waves) >= 2, seen_waves  # saw at least two waves go by on the same page
    assert page.evaluate("window.__notReloaded") is True
    expect(page.locator("#decisions")).to_contain_text("advance")
    expect(page.locator("#gate-charts [data-chart=input_max_psi] svg")).to_be_visible()
    _shot(page, "rollout-completed", full_page=True)

    # A broken build: its page names the gate that fired.
    bad = rig.cli("rollout", "start", RELEASES["scrambled"], "--fleet", rig.fleet_name, *WAVES)["id"]
    page.goto(page.url.split("#")[0] + f"#/rollout/{bad}")
    expect(page.locator(".fired-gate").first).to_contain_text("class_mix_shift", timeout=120_000)
    fired = [
        g["metric"]
        for d in rig.status(bad)["decisions"]
        if d["decision"] == "rollback"
        for g in d["gates"]
        if g["verdict"] == "fail"
    ]
    assert "class_mix_shift" in fired
    _shot(page, "rollout-rolled-back", full_page=True)

    # The pause button pauses the rollout in the coordinator's state.
    slow = rig.cli("rollout", "start", RELEASES["scrambled"], "--fleet", rig.fleet_name, "--bake", "600")["id"]
    page.goto(page.url.split("#")[0] + f"#/rollout/{slow}")
    wait_for(lambda: _phase(rig, slow) == "baking", 30, what="the third rollout to bake its canary")
    page.click("button[data-action=pause]")
    expect(page.locator("#phase")).to_contain_text("paused")
    assert _phase(rig, slow) == "paused"
    audit = rig.cli("audit", "list", "--limit", "5")
    assert any(a["action"] == "rollout.pause" and a["actor"] == "dashboard" for a in audit)

    # A device page shows the device's events, as the coordinator stored them.
    device = rig.device_ids()[0]
    page.goto(page.url.split("#")[0] + f"#/device/{device}")
    kinds = {r["kind"] for r in rig.store_query("SELECT kind FROM events WHERE device_id = ?", [device])}
    assert "committed" in kinds
    expect(page.locator("#timeline")).to_contain_text("committed")
    _shot(page, "device")

    for route, name in (("drift?cohort_by=site&minutes=5", "drift"), ("audit", "audit"), ("rollouts", "rollouts")):
        page.goto(page.url.split("#")[0] + f"#/{route}")
        page.wait_for_function("document.body.dataset.renders !== undefined")
        page.wait_for_timeout(300)
        _shot(page, name)
    expect(page.locator("table")).to_contain_text(slow)
    page.goto(page.url.split("#")[0] + "#/audit")
    expect(page.locator("#audit-status")).to_contain_text("verified")
    page.goto(page.url.split("#")[0] + "#/drift?cohort_by=site&minutes=5")
    expect(page.locator("#drift-series [data-chart] svg").first).to_be_visible()
    page.close()
