"""The dashboard's Alerts page in real headless Chromium, against `fedfleet serve` whose policy says review: a
sensor fault on real agents raises a drift alarm and a retrain proposal, the page shows both, and a person
rejects the proposal and acknowledges the alarm from the page; the coordinator's database says so."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from server.datadir import DataDir
from simulations.rig import Rig
from simulations.workload import SensorFault
from tests.support import Mosquitto, wait_for
from tests.system.test_dashboard_browser import _shot, browser, page  # noqa: F401 (the Chromium and page fixtures)

pytestmark = [pytest.mark.broker, pytest.mark.browser, pytest.mark.slow]

POLICY = """[retrain]
on_drift = "review"
window_seconds = 5
min_devices = 2
"""


@pytest.fixture
def rig(tmp_path: Path, mosquitto: Mosquitto) -> Iterator[Rig]:
    d, _ = DataDir.init(tmp_path / "data")  # the policy is read when serve starts
    (d.root / "policy.toml").write_text(POLICY)
    r = Rig(tmp_path, devices=4, mqtt_url=mosquitto.url).setup()
    yield r
    r.stop()


def test_alerts_page_shows_the_alarm_and_takes_a_persons_answer(page: Page, rig: Rig) -> None:  # noqa: F811
    assert rig.fleet is not None and rig.fleet.workload is not None
    rig.fleet.workload.faults.update(dict.fromkeys(rig.device_ids(), SensorFault("contrast", 0.3)))
    wait_for(lambda: rig.store_query("SELECT id FROM retrain_jobs"), 60, 0.2, what="a retrain proposal")
    (job,) = rig.store_query("SELECT id, state, cause FROM retrain_jobs")
    assert job["state"] == "proposed"

    page.goto(page.url.split("#")[0] + "#/alerts")
    expect(page.locator("#alerts")).to_contain_text("drift_alarm")
    expect(page.locator("#alerts")).to_contain_text("retrain_proposed")
    expect(page.locator("#jobs")).to_contain_text(job["cause"])
    _shot(page, "alerts", full_page=True)

    page.click(f"button[data-answer=reject][data-job='{job['id']}']")
    expect(page.locator("#action-result")).to_contain_text("now rejected")
    assert rig.store_query("SELECT state, decided_by FROM retrain_jobs")[0] == {
        "state": "rejected",
        "decided_by": "user:operator",
    }
    expect(page.locator("#jobs")).to_contain_text("rejected")
    (alarm_alert,) = rig.store_query("SELECT id FROM alerts WHERE kind = 'drift_alarm'")
    page.click(f"button[data-ack='{alarm_alert['id']}']")
    expect(page.locator("#action-result")).to_contain_text("now acknowledged")
    assert rig.store_query("SELECT state FROM alerts WHERE id = ?", [alarm_alert["id"]])[0]["state"] == "acknowledged"
    assert not rig.store_query("SELECT id FROM fl_runs")  # nothing trained: the proposal was rejected
