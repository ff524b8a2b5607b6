"""The compose kit's Prometheus alerting rules: valid for promtool, firing on the conditions they name (promtool's
own rule unit tests, on series shaped like the coordinator's), and querying only metrics a real /metrics exports."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import yaml

from tests.server.test_deploy_kit import KIT, _exported_metrics

RULES = KIT / "alert-rules.yml"

UNIT_TESTS = """
rule_files: [{rules}]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'fedfleet_drift_alarms_open'
        values: '0 1 1 1 0'
      - series: 'fedfleet_broker_connected'
        values: '1 0 0 0 0'
      - series: 'fedfleet_alerts{{kind="training_failed", state="open"}}'
        values: '1 1 1 1 1'
      - series: 'fedfleet_alerts{{kind="rollout_rolled_back", state="acknowledged"}}'
        values: '1 1 1 1 1'
      - series: 'fedfleet_alerts{{kind="devices_silent", state="acknowledged"}}'
        values: '1 1 1 1 1 1 1 1'
      - series: 'fedfleet_devices_stale{{fleet="lab"}}'
        values: '0 2 2 2 2 2 2 2 2 2 2 2 2 0'
      - series: 'fedfleet_devices_lagging{{fleet="lab"}}'
        values: '1 1 1 1 1 0 0 0 0 0 0 0 0 0'
    alert_rule_test:
      - eval_time: 3m
        alertname: FedfleetFleetDrift
        exp_alerts:
          - exp_labels: {{severity: warning}}
            exp_annotations:
              summary: "1 fleet(s) drift over the retrain threshold on their running release"
              description: "See `fedfleet loop status`; the policy's retrain.on_drift says what happens next."
      - eval_time: 4m
        alertname: FedfleetFleetDrift
        exp_alerts: []
      - eval_time: 3m
        alertname: FedfleetBrokerDisconnected
        exp_alerts:
          - exp_labels: {{severity: critical}}
            exp_annotations:
              summary: "The coordinator lost the MQTT broker: no assignments go out, no telemetry comes in"
      - eval_time: 1m
        alertname: FedfleetTrainingFailed
        exp_alerts:
          - exp_labels: {{severity: warning}}
            exp_annotations:
              summary: "A retraining failed (training, release or the start of its rollout); nothing was released"
              description: "`fedfleet loop status` shows the job's error."
      - eval_time: 2m
        alertname: FedfleetRolloutRolledBack
        exp_alerts: []
      - eval_time: 7m
        alertname: FedfleetDevicesSilent
        exp_alerts:
          - exp_labels: {{severity: warning}}
            exp_annotations:
              summary: "Devices have not been heard for longer than the policy's alerts.silent_after_seconds"
      - eval_time: 12m
        alertname: FedfleetDevicesStale
        exp_alerts:
          - exp_labels: {{severity: warning}}
            exp_annotations:
              summary: "2 device(s) hold no unexpired freshness statement: a newer assignment may be withheld from them"
              description: "`fedfleet devices behind` lists them; their freshness check fails or is blocked."
      - eval_time: 13m
        alertname: FedfleetDevicesStale
        exp_alerts: []
      - eval_time: 8m
        alertname: FedfleetDevicesLagging
        exp_alerts: []
"""


def _promtool(*args: str) -> subprocess.CompletedProcess[str]:
    path = shutil.which("promtool")
    assert path, "promtool is missing: apt-get install -y prometheus (scripts/setup.sh --dev does)"
    return subprocess.run([path, *args], capture_output=True, text=True, timeout=60, check=False)


def test_rules_are_valid_and_fire_on_what_they_name(tmp_path: Path) -> None:
    check = _promtool("check", "rules", str(RULES))
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS: 7 rules found" in check.stdout
    tests = tmp_path / "rules-test.yml"
    tests.write_text(UNIT_TESTS.format(rules=RULES))
    unit = _promtool("test", "rules", str(tests))
    assert unit.returncode == 0, unit.stdout + unit.stderr


def test_a_broken_expectation_fails_promtool(tmp_path: Path) -> None:
    """The positive control: the unit tests above would fail if a rule did not fire."""
    tests = tmp_path / "rules-test.yml"
    tests.write_text(UNIT_TESTS.format(rules=RULES).replace("eval_time: 4m", "eval_time: 2m", 1))
    unit = _promtool("test", "rules", str(tests))
    assert unit.returncode != 0 and "FedfleetFleetDrift" in unit.stdout + unit.stderr


def test_rules_query_only_metrics_the_coordinator_exports(tmp_path: Path) -> None:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    rules = [r for g in groups for r in g["rules"]]
    assert {r["alert"] for r in rules} == {
        "FedfleetFleetDrift",
        "FedfleetRolloutRolledBack",
        "FedfleetDevicesSilent",
        "FedfleetBrokerDisconnected",
        "FedfleetTrainingFailed",
        "FedfleetDevicesStale",
        "FedfleetDevicesLagging",
    }
    queried = {m for r in rules for m in re.findall(r"\bfedfleet_[a-z0-9_]+", r["expr"])}
    exported = _exported_metrics(tmp_path)
    assert queried and queried <= exported, sorted(queried - exported)
    kinds = {k for r in rules for k in re.findall(r'kind="([a-z_]+)"', r["expr"])}
    from server.loop.kinds import AlertKind

    assert kinds <= {str(k) for k in AlertKind}


def test_the_compose_prometheus_loads_the_rules() -> None:
    config = yaml.safe_load((KIT / "prometheus.yml").read_text())
    assert config["rule_files"] == ["/etc/prometheus/alert-rules.yml"]
    compose = yaml.safe_load((KIT / "compose.yaml").read_text())
    assert "./alert-rules.yml:/etc/prometheus/alert-rules.yml:ro" in compose["services"]["prometheus"]["volumes"]
