"""The CLIs: every command has help, errors are one sentence on stderr with exit 1, --json prints only JSON,
and bad input changes nothing."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import click
import pytest
import typer.main

from server import __version__
from server.cli import app
from server.datadir import DataDir
from server.fl.registry import Ledger
from server.rollout.waves import wave_label
from server.store.loop import AlertRecords
from server.trust.releases import publish_release
from simulations.dense_tflite import build_dense_model, random_dense_layers
from tests.support import CoordinatorProcess


def run(*args: str, module: str = "server.cli") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=60, check=False
    )


def _commands(group: click.Group, prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found = []
    for name, command in group.commands.items():
        found.append((*prefix, name))
        if isinstance(command, click.Group):
            found += _commands(command, (*prefix, name))
    return found


COMMANDS = _commands(typer.main.get_command(app))  # type: ignore[arg-type]


def test_command_list_is_complete() -> None:
    assert {
        ("init",),
        ("serve",),
        ("release",),
        ("assign",),
        ("devices", "list"),
        ("devices", "show"),
        ("devices", "enroll"),
        ("keys", "rotate-root"),
        ("keys", "rotate-releases"),
        ("releases", "list"),
        *(("rollout", c) for c in ("start", "status", "pause", "resume", "abort", "rollback", "list")),
        ("audit", "list"),
        ("audit", "verify"),
        ("train",),
        ("models", "list"),
        ("models", "show"),
        ("privacy", "ledger"),
        ("privacy", "budget"),
        ("dashboard-token",),
        ("config", "show"),
        ("config", "set"),
        ("status",),
        ("version",),
    } <= set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help(command: tuple[str, ...]) -> None:
    group = typer.main.get_command(app)
    cmd: click.Command = group
    for part in command:
        assert isinstance(cmd, click.Group)
        cmd = cmd.commands[part]
    assert cmd.help and len(cmd.help.strip()) > 15, f"{' '.join(command)} lacks a help text"
    for param in cmd.params:
        if isinstance(param, click.Option):
            assert param.help, f"{' '.join(command)} {param.opts[0]} lacks a help text"


def test_agent_help_and_exit_codes(tmp_path: Path) -> None:
    out = run("--help", module="edge_agent.cli")
    assert out.returncode == 0 and "run" in out.stdout and "status" in out.stdout and "Exit codes" in out.stdout
    missing = run("status", "--config", str(tmp_path / "nope.toml"), module="edge_agent.cli")
    assert missing.returncode == 2
    assert missing.stderr.strip().startswith("fedfleet-agent: config file") and "\n" not in missing.stderr.strip()


def test_init_twice_changes_nothing(tmp_path: Path) -> None:
    first = run("init", "--data-dir", str(tmp_path / "d"), "--json")
    assert json.loads(first.stdout) == {"created": True, "data_dir": str(tmp_path / "d")}
    snapshot = {p: p.read_bytes() for p in (tmp_path / "d").rglob("*") if p.is_file()}
    second = run("init", "--data-dir", str(tmp_path / "d"))
    assert second.returncode == 0 and "nothing changed" in second.stdout
    assert {p: p.read_bytes() for p in (tmp_path / "d").rglob("*") if p.is_file()} == snapshot


def test_init_refuses_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"meow")
    out = run("init", "--data-dir", str(tmp_path / "photos"))
    assert out.returncode == 1 and "is not a fedfleet data directory" in out.stderr
    assert [p.name for p in (tmp_path / "photos").iterdir()] == ["cat.jpg"]


def test_commands_on_an_uninitialised_directory_say_what_to_do(tmp_path: Path) -> None:
    out = run("devices", "list", "--data-dir", str(tmp_path / "none"))
    assert out.returncode == 1
    assert out.stderr.startswith("fedfleet: ") and "fedfleet init" in out.stderr and out.stderr.count("\n") == 1
    assert not (tmp_path / "none").exists()


def _digest(d: DataDir) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in d.root.rglob("*") if p.is_file() and not p.name.startswith("fedfleet.db")}


@pytest.mark.slow
def test_release_is_byte_identical_when_repeated_and_bad_input_changes_nothing(
    datadir: DataDir, tmp_path: Path
) -> None:
    model = tmp_path / "m.tflite"
    model.write_bytes(build_dense_model(random_dense_layers([64, 16, 10], 3)))
    root = str(datadir.root)
    first = json.loads(
        run("release", str(model), "--name", "digits", "--version", "1.0.0", "--data-dir", root, "--json").stdout
    )
    assert first["created"] is True
    before = _digest(datadir)
    again = json.loads(
        run("release", str(model), "--name", "digits", "--version", "1.0.0", "--data-dir", root, "--json").stdout
    )
    assert again == {**first, "created": False}
    assert _digest(datadir) == before

    (tmp_path / "junk.tflite").write_bytes(b"not a model at all")
    other = tmp_path / "other.tflite"
    other.write_bytes(build_dense_model(random_dense_layers([64, 16, 10], 4)))
    refusals = [
        (["release", str(tmp_path / "junk.tflite"), "--name", "digits", "--version", "2.0.0"], "not a loadable TFLite"),
        (["release", str(other), "--name", "digits", "--version", "1.0.0"], "exists with other bytes"),
        (["release", str(model), "--name", "../evil", "--version", "3.0.0"], "model name"),
        (["release", str(model), "--name", "digits", "--version", "a b"], "version"),
        (["assign", "--fleet", "lab", "digits@9.9.9"], "no release"),
        (["assign", "ghost", "digits@1.0.0"], "no device"),
        (["assign", "--fleet", "lab", "pi-1", "digits@1.0.0"], "with --fleet give only the RELEASE"),
        (["assign", "digits@1.0.0"], "give DEVICE RELEASE"),
        (["assign", "--fleet", "empty", "digits@1.0.0"], "no registered devices"),
        (["devices", "show", "ghost"], "no device"),
        (["devices", "enroll", "bad id!", "--out", str(tmp_path / "b")], "device_id"),
        (["keys", "rotate-root", "--role", "timestamp", "--role", "mirror"], "unknown role(s) mirror"),
    ]
    for args, message in refusals:
        out = run(*args, "--data-dir", root)
        assert out.returncode == 1, (args, out.stdout, out.stderr)
        assert message in out.stderr and out.stderr.startswith("fedfleet: "), (args, out.stderr)
    assert _digest(datadir) == before
    store = datadir.store()
    assert [r.id for r in store.releases()] == ["digits@1.0.0"]
    store.close()


@pytest.mark.slow
def test_json_outputs_are_one_document(datadir: DataDir, tmp_path: Path) -> None:
    root = str(datadir.root)
    for args in (["devices", "list"], ["releases", "list"], ["keys", "rotate-root"]):
        out = run(*args, "--data-dir", root, "--json")
        assert out.returncode == 0
        json.loads(out.stdout)
    enrolled = json.loads(
        run(
            "devices",
            "enroll",
            "pi-7",
            "--fleet",
            "lab",
            "--label",
            "site=roof",
            "--out",
            str(tmp_path / "pi-7"),
            "--data-dir",
            root,
            "--json",
        ).stdout
    )
    assert Path(enrolled["config"]).is_file()
    status = json.loads(run("status", "--config", enrolled["config"], "--json", module="edge_agent.cli").stdout)
    assert status["device_id"] == "pi-7" and status["active_slot"] is None


@pytest.mark.slow
def test_enrollment_rotation_and_releases_are_audited_and_tampering_is_named(datadir: DataDir, tmp_path: Path) -> None:
    root = str(datadir.root)
    model = tmp_path / "m.tflite"
    model.write_bytes(build_dense_model(random_dense_layers([64, 16, 10], 5)))
    assert run("release", str(model), "--name", "digits", "--version", "1.0.0", "--data-dir", root).returncode == 0
    assert run("devices", "enroll", "pi-9", "--out", str(tmp_path / "b"), "--data-dir", root).returncode == 0
    assert run("keys", "rotate-root", "--data-dir", root).returncode == 0
    entries = json.loads(run("audit", "list", "--data-dir", root, "--json").stdout)
    assert [(e["action"], e["subject"]) for e in entries] == [
        ("keys.rotate_root", "root"),
        ("device.enroll", "pi-9"),
        ("release.publish", "digits@1.0.0"),
    ]
    intact = run("audit", "verify", "--data-dir", root)
    assert intact.returncode == 0 and "3 entries" in intact.stdout

    store = datadir.store()
    store.db.execute("UPDATE audit SET subject = 'pi-evil' WHERE seq = 2")
    store.close()
    broken = run("audit", "verify", "--data-dir", root, "--json")
    assert broken.returncode == 1
    assert json.loads(broken.stdout)["problems"] == [
        {"seq": 2, "problem": "edited: device.enroll pi-evil no longer matches its hash"}
    ]


@pytest.mark.slow
def test_rollout_commands_refuse_bad_input_and_change_nothing(datadir: DataDir, tmp_path: Path) -> None:
    root = str(datadir.root)
    spec = tmp_path / "bad.toml"
    spec.write_text('release = "digits@1.0.0"\nwaves = [0.5]\n')
    refusals = [
        (["rollout", "start"], "name the release"),
        (["rollout", "start", "digits@9.9.9"], "no release"),
        (["rollout", "start", "x@1", "--waves", "half"], "comma-separated fractions"),
        (["rollout", "start", "x@1", "--gate", "speed<=1"], "unknown gate metric"),
        (["rollout", "start", "x@1", "--canary", "0"], "canary must be at least 1"),
        (["rollout", "start", "--spec", str(spec)], "increase and end at 1.0"),
        (["rollout", "start", "--spec", str(tmp_path / "absent.toml")], "cannot read rollout spec"),
        (["rollout", "status", "rollout-9"], "no rollout"),
        (["rollout", "pause", "rollout-9"], "no rollout"),
    ]
    before = _digest(datadir)
    for args, message in refusals:
        out = run(*args, "--data-dir", root)
        assert out.returncode == 1, (args, out.stdout, out.stderr)
        assert message in out.stderr and out.stderr.startswith("fedfleet: "), (args, out.stderr)
    assert _digest(datadir) == before
    assert json.loads(run("rollout", "list", "--data-dir", root, "--json").stdout) == []


def _fleet_on(d: DataDir, model_bytes: dict[str, bytes], devices: int) -> list[str]:
    """Both releases published and `devices` registered devices of fleet lab assigned 1.0.0."""
    names = [f"pi-{i}" for i in range(devices)]
    store = d.store()
    try:
        for version, data in model_bytes.items():
            publish_release(d.repository(), store, data, "digits", version)
        for name in names:
            store.register_device(name, "lab", {}, {}, "t")
        d.director().assign(store, names, store.release("digits@1.0.0"))
    finally:
        store.close()
    return names


def _assignments(d: DataDir) -> list[tuple[str, str, int]]:
    store = d.store()
    try:
        return [
            (r["device_id"], r["release_id"], r["counter"])
            for r in store.db.query(
                "SELECT device_id, release_id, counter FROM assignments ORDER BY device_id, counter"
            )
        ]
    finally:
        store.close()


@pytest.mark.slow
def test_rollout_pause_resume_and_abort_through_the_cli(datadir: DataDir, model_bytes: dict[str, bytes]) -> None:
    root = str(datadir.root)
    _fleet_on(datadir, model_bytes, 4)

    def cli(*args: str) -> dict[str, object]:
        out = run("rollout", *args, "--data-dir", root, "--json")
        assert out.returncode == 0, (args, out.stderr)
        doc: dict[str, object] = json.loads(out.stdout)
        return doc

    rollout_id = str(cli("start", "digits@2.0.0", "--fleet", "lab", "--canary", "1", "--bake", "600")["id"])
    store = datadir.store()
    try:
        datadir.rollouts(store).tick()  # what a running `fedfleet serve` does next: the canary is assigned
    finally:
        store.close()
    assert cli("status", rollout_id)["phase"] == "baking"
    on_canary = [a for a in _assignments(datadir) if a[1] == "digits@2.0.0"]
    assert len(on_canary) == 1

    assert cli("pause", rollout_id) == {"rollout": rollout_id, "phase": "paused", "decision": "pause"}
    assert cli("resume", rollout_id) == {"rollout": rollout_id, "phase": "baking", "decision": "resume"}
    again = run("rollout", "resume", rollout_id, "--data-dir", root)
    assert again.returncode == 1 and "not paused" in again.stderr and again.stderr.startswith("fedfleet: ")

    before = _assignments(datadir)
    assert cli("abort", rollout_id) == {"rollout": rollout_id, "phase": "aborted", "decision": "abort"}
    store = datadir.store()
    try:
        datadir.rollouts(store).tick()  # an aborted rollout is not driven any further
    finally:
        store.close()
    assert cli("status", rollout_id)["phase"] == "aborted"
    assert _assignments(datadir) == before  # devices keep what they were given: nothing issued, nothing reverted
    for action in ("abort", "resume", "pause", "rollback"):
        refused = run("rollout", action, rollout_id, "--data-dir", root)
        assert refused.returncode == 1 and "nothing more can be done" in refused.stderr, (action, refused.stderr)
    decisions = [str(x["decision"]) for x in cli("status", rollout_id)["decisions"]]  # type: ignore[attr-defined]
    assert [x for x in decisions if x in ("pause", "resume", "abort")] == ["pause", "resume", "abort"]
    actions = [e["action"] for e in json.loads(run("audit", "list", "--data-dir", root, "--json").stdout)]
    assert {"rollout.pause", "rollout.resume", "rollout.abort"} <= set(actions)
    assert json.loads(run("audit", "verify", "--data-dir", root, "--json").stdout)["intact"]


def test_version_as_an_option_and_a_command() -> None:
    for args in (("--version",), ("version",)):
        done = run(*args)
        assert done.returncode == 0 and done.stdout.strip() == f"fedfleet {__version__}", (args, done.stderr)


@pytest.mark.slow
def test_status_tells_the_fleet_at_a_glance(datadir: DataDir, model_bytes: dict[str, bytes]) -> None:
    root = str(datadir.root)
    names = _fleet_on(datadir, model_bytes, 3)
    with datadir.store() as store:
        store.set_status(names[0], True, "digits@1.0.0", "t", 1, "committed", "")
        store.set_status(names[1], True, "digits@1.0.0", "t", 1, "committed", "", stale=True)
        AlertRecords(store).insert("devices_stale", "lab", "devices_stale:lab", "1 device stale", {})
    started = run("rollout", "start", "digits@2.0.0", "--fleet", "lab", "--canary", "1", "--data-dir", root, "--json")
    rollout_id = json.loads(started.stdout)["id"]

    def status() -> dict[str, Any]:
        done = run("status", "--json", "--data-dir", root)
        assert done.returncode == 0, done.stderr
        doc: dict[str, Any] = json.loads(done.stdout)
        return doc

    doc = status()
    assert doc["coordinator"] == {"running": False}
    assert doc["devices"] == {
        "total": 3,
        "online": 2,
        "stale": 1,
        "lagging": 0,
        "by_release": {"digits@1.0.0": 2, "none": 1},
        "by_update_state": {"committed": 2, "unknown": 1},
    }
    assert [r["id"] for r in doc["rollouts_active"]] == [rollout_id]
    assert doc["rollouts_active"][0]["wave_label"] == wave_label(doc["rollouts_active"][0]["wave"], 2)  # one numbering
    assert doc["alerts_not_resolved"] == {"devices_stale": 1}
    assert doc["privacy"] == {"max_lifetime_epsilon": 0.0, "epsilon_budget": datadir.config().epsilon_budget}
    coordinator = CoordinatorProcess(datadir, mqtt_url=None).start()
    try:
        running = status()["coordinator"]
        assert running["running"] and running["pid"] == coordinator.proc.pid  # type: ignore[union-attr]
        assert running["grpc"] == coordinator.endpoints["grpc"]
        text = run("status", "--data-dir", root).stdout
        assert f"running (pid {running['pid']})" in text and "3 (2 online, 1 stale" in text and rollout_id in text
        assert re.search(rf"{rollout_id}  digits@2.0.0  \w+ \((not started|canary|wave \d of \d)\)", text), text
    finally:
        coordinator.kill()
    assert status()["coordinator"] == {"running": False}  # a dead serve's leftover serve.json is not "running"
    shown = run("devices", "show", names[0], "--data-dir", root).stdout  # for people: no reprs, no epoch ms
    assert "labels: -" in shown and "hardware: -" in shown and "{" not in shown and "None" not in shown
    assert re.search(r"last_seen: \d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d", shown), shown


def test_privacy_budget_sets_one_devices_budget_and_refuses_nonsense(datadir: DataDir) -> None:
    root = str(datadir.root)
    default = datadir.config().epsilon_budget
    with datadir.store() as store:
        store.register_device("sim-001", "sim", {}, {}, "t")
    out = run("privacy", "budget", "sim-001", "2.5", "--data-dir", root)
    assert out.returncode == 0, out.stderr
    assert "sim-001: lifetime budget ε 2.5 (spent so far 0.000)" in out.stdout
    store = datadir.store()
    try:
        ledger = Ledger(store, default)
        assert ledger.budget("sim-001") == 2.5 and ledger.budget("sim-002") == default  # only that device
    finally:
        store.close()
    before = _digest(datadir)
    for bad in ("-1", "nan"):
        refused = run("privacy", "budget", "sim-001", "--data-dir", root, "--", bad)
        assert refused.returncode == 1, (bad, refused.stdout, refused.stderr)
        assert "a budget must be a number >= 0" in refused.stderr and refused.stderr.startswith("fedfleet: ")
    assert _digest(datadir) == before
    store = datadir.store()
    try:
        assert Ledger(store, default).budget("sim-001") == 2.5
    finally:
        store.close()


def test_dashboard_token_is_kept_until_rotated_and_rotation_is_audited(datadir: DataDir) -> None:
    first = run("dashboard-token", "--data-dir", str(datadir.root))
    assert first.returncode == 0 and len(first.stdout.strip()) >= 40
    assert run("dashboard-token", "--data-dir", str(datadir.root)).stdout == first.stdout
    assert (datadir.keys / "operator.token").stat().st_mode & 0o077 == 0  # readable by its owner only
    rotated = run("dashboard-token", "--rotate", "--json", "--data-dir", str(datadir.root))
    assert json.loads(rotated.stdout)["token"] != first.stdout.strip()
    trail = json.loads(run("audit", "list", "--json", "--data-dir", str(datadir.root)).stdout)
    assert [a["action"] for a in trail] == ["dashboard.token-rotated"]


@pytest.mark.slow
def test_config_set_checks_the_value_changes_one_setting_and_is_audited(datadir: DataDir) -> None:
    before = datadir.config_path.read_bytes()
    for key, value, message in (
        ("nope", "1", "unknown setting 'nope'"),
        ("grpc_tls", "yes", "grpc_tls must be true or false"),
        ("epsilon_budget", "0", "epsilon_budget must be positive"),
        ("tick_seconds", "soon", "tick_seconds must be a number"),
        ("tls_hosts", " , ", "tls_hosts needs at least one entry"),
    ):
        refused = run("config", "set", key, value, "--data-dir", str(datadir.root))
        assert refused.returncode == 1 and message in refused.stderr, refused.stderr
    assert datadir.config_path.read_bytes() == before
    assert (
        run("config", "set", "tls_hosts", "coordinator.lan, 127.0.0.1", "--data-dir", str(datadir.root)).returncode == 0
    )
    assert run("config", "set", "dashboard_tls", "true", "--data-dir", str(datadir.root)).returncode == 0
    config = datadir.config()
    assert config.tls_hosts == ("coordinator.lan", "127.0.0.1") and config.dashboard_tls and not config.grpc_tls
    shown = json.loads(run("config", "show", "--json", "--data-dir", str(datadir.root)).stdout)
    assert shown["tls_hosts"] == ["coordinator.lan", "127.0.0.1"] and shown["dashboard_tls"] is True
    trail = json.loads(run("audit", "list", "--json", "--data-dir", str(datadir.root)).stdout)
    assert [a["action"] for a in trail] == ["config.set", "config.set"]


def test_serve_refuses_a_taken_dashboard_port_before_starting_anything(datadir: DataDir) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        out = run(
            "serve",
            "--data-dir",
            str(datadir.root),
            "--grpc",
            "127.0.0.1:0",
            "--broker-listen",
            "127.0.0.1:0",
            "--dashboard",
            f"127.0.0.1:{port}",
        )
    assert out.returncode == 1
    assert out.stderr.strip() == (
        f"fedfleet: the dashboard cannot listen on 127.0.0.1:{port} (Address already in use); pick another: --dashboard"
    )
    assert not (datadir.root / "serve.json").exists()
