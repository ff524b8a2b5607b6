"""The CLI as a person meets it (issue 23): one wave numbering, gates kept after a rollout ends, sentences that
name the user's input, refusals that change nothing, readable times, whole tables when piped, completion."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from server.dashboard.views import rollout_view
from server.datadir import DataDir
from server.fl.registry import Ledger
from server.rollout.waves import wave_label
from server.trust.releases import publish_release
from simulations.dense_tflite import build_dense_model, random_dense_layers


def run(*args: str, module: str = "server.cli") -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=120, check=False
    )


def _digest(d: DataDir) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in d.root.rglob("*") if p.is_file() and not p.name.startswith("fedfleet.db")}


ISO_LOCAL = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d"


def table_row(*cells: str) -> str:
    """A regex for a table row holding these cells (regexes) next to each other."""
    return r"[\s│]+".join(cells)


def test_wave_label_numbers_the_canary_then_wave_1_to_n() -> None:
    assert [wave_label(k, 3) for k in (-1, 0, 1, 2)] == ["not started", "canary", "wave 1 of 2", "wave 2 of 2"]
    assert wave_label(None, 3) == "not started"
    assert wave_label(0, 1) == "canary"


def _complete_a_rollout(d: DataDir, model_bytes: dict[str, bytes]) -> str:
    """Four devices on 1.0.0; a rollout of 2.0.0 (canary of 1, then all) driven to completion as `serve` would,
    each device reporting the release committed once it is assigned."""
    names = [f"pi-{i}" for i in range(4)]
    with d.store() as store:
        for version, data in model_bytes.items():
            publish_release(d.repository(), store, data, "digits", version)
        for name in names:
            store.register_device(name, "lab", {}, {}, "t")
        d.director().assign(store, names, store.release("digits@1.0.0"))
    started = run(
        "rollout", "start", "digits@2.0.0", "--fleet", "lab", "--canary", "1", "--waves", "1.0", "--bake", "0",
        "--gate", "failure_rate<=0.1", "--data-dir", str(d.root), "--json",
    )  # fmt: skip
    assert started.returncode == 0, started.stderr
    rollout_id = str(json.loads(started.stdout)["id"])
    for _ in range(20):
        with d.store() as store:
            rollouts = d.rollouts(store)
            rollouts.tick()
            for r in store.db.query(
                "SELECT device_id, counter FROM assignments WHERE release_id = 'digits@2.0.0' ORDER BY counter"
            ):
                store.set_status(r["device_id"], True, "digits@2.0.0", "t", r["counter"], "committed", "")
            if rollouts.phase(rollout_id) == "completed":
                return rollout_id
    raise AssertionError(f"{rollout_id} did not complete")


@pytest.mark.slow
def test_a_finished_rollout_keeps_its_gates_and_one_wave_numbering(
    datadir: DataDir, model_bytes: dict[str, bytes]
) -> None:
    root = str(datadir.root)
    rollout_id = _complete_a_rollout(datadir, model_bytes)

    doc = json.loads(run("rollout", "status", rollout_id, "--data-dir", root, "--json").stdout)
    assert doc["phase"] == "completed" and doc["wave"] == 1 and doc["wave_label"] == "wave 1 of 1"
    assert [w["name"] for w in doc["waves"]] == ["canary", "wave 1 of 1"]
    assert all(d["wave"] is None or d["wave"] >= 0 for d in doc["decisions"]), doc["decisions"]
    created = [d for d in doc["decisions"] if d["decision"] == "created"]
    assert created and created[0]["wave"] is None and created[0]["wave_label"] == "not started"
    assert [g["metric"] for g in doc["gates"]] == ["failure_rate"] and doc["gates"][0]["verdict"] == "pass"
    assert isinstance(doc["gates_at_ms"], int)

    shown = run("rollout", "status", rollout_id, "--data-dir", root)
    assert shown.returncode == 0, shown.stderr
    assert f"{rollout_id} digits@2.0.0: completed, wave 1 of 1" in shown.stdout
    assert "gates (last verdict" in shown.stdout and "failure_rate" in shown.stdout
    assert "None yet" not in shown.stdout and not re.search(r"\s-1\s", shown.stdout), shown.stdout
    assert re.search(ISO_LOCAL, shown.stdout), shown.stdout

    followed = run("rollout", "status", rollout_id, "--follow", "--data-dir", root)  # ended: the one last frame
    assert followed.returncode == 0 and "gates (last verdict" in followed.stdout, followed.stdout

    listed = run("rollout", "list", "--data-dir", root)
    assert re.search(table_row(rollout_id, "digits@2.0.0", "completed", "wave 1 of 1", ISO_LOCAL), listed.stdout), (
        listed.stdout
    )
    assert json.loads(run("rollout", "list", "--data-dir", root, "--json").stdout)[0]["wave_label"] == "wave 1 of 1"

    # The dashboard's page shows the same last verdict, from the same place.
    with datadir.store() as store:
        view = rollout_view(datadir.rollouts(store), rollout_id)
    assert view["gates_final"] and (view["gates"], view["gates_at"]) == (doc["gates"], doc["gates_at_ms"])


@pytest.mark.slow
def test_a_release_names_the_users_file_and_wants_a_semantic_version(datadir: DataDir, tmp_path: Path) -> None:
    root = str(datadir.root)
    model = tmp_path / "m.tflite"
    model.write_bytes(build_dense_model(random_dense_layers([64, 16, 10], 3)))
    junk = tmp_path / "junk.tflite"
    junk.write_bytes(b"not a model")
    before = _digest(datadir)
    for args, message in (
        (["nothere.tflite", "--name", "digits", "--version", "1.0.0"], "nothere.tflite is not a file"),
        ([str(model), "--name", "digits", "--version", "banana"], "'banana' is not a semantic version"),
        ([str(model), "--name", "digits", "--version", "1.0"], "'1.0' is not a semantic version"),
        ([str(junk), "--name", "digits", "--version", "1.0.0"], f"{junk} is not a loadable TFLite model"),
    ):
        out = run("release", *args, "--data-dir", root)
        assert out.returncode == 1, (args, out.stdout, out.stderr)
        assert out.stderr.startswith("fedfleet: ") and message in out.stderr, (args, out.stderr)
        assert "/tmp/tmp" not in out.stderr, out.stderr  # no temporary copy's name
        assert out.stderr.count("\n") == 1, out.stderr  # one sentence, no third-party lines
    assert _digest(datadir) == before
    ok = run("release", str(model), "--name", "digits", "--version", "1.0.0-rc.1", "--data-dir", root)
    assert ok.returncode == 0 and ok.stderr == "", ok.stderr  # and no XNNPACK notice on a quiet release

    listed = json.loads(run("releases", "list", "--data-dir", root, "--json").stdout)
    assert [(r["id"], r["source"]["kind"]) for r in listed] == [("digits@1.0.0-rc.1", "file")]
    table = run("releases", "list", "--data-dir", root).stdout
    assert re.search(table_row("digits@1.0.0-rc.1", "file", ".*", ISO_LOCAL), table), table


def test_enrolling_a_name_twice_needs_force(datadir: DataDir, tmp_path: Path) -> None:
    root = str(datadir.root)
    assert run("devices", "enroll", "pi-1", "--out", str(tmp_path / "a"), "--data-dir", root).returncode == 0
    first_cert = (tmp_path / "a" / "device.pem").read_bytes()
    before = _digest(datadir)
    again = run("devices", "enroll", "pi-1", "--out", str(tmp_path / "b"), "--data-dir", root)
    assert again.returncode == 1 and again.stderr.startswith("fedfleet: "), again.stderr
    assert "pi-1 is enrolled already" in again.stderr and "--force" in again.stderr
    assert not (tmp_path / "b").exists() and _digest(datadir) == before
    with datadir.store() as store:
        assert len(store.live_certificates("pi-1")) == 1

    forced = run("devices", "enroll", "pi-1", "--out", str(tmp_path / "b"), "--force", "--data-dir", root)
    assert forced.returncode == 0, forced.stderr
    assert (tmp_path / "b" / "device.pem").read_bytes() != first_cert
    with datadir.store() as store:
        assert len(store.live_certificates("pi-1")) == 1 and len(store.revoked_certificates()) == 1


def test_privacy_budget_refuses_a_device_nobody_knows(datadir: DataDir) -> None:
    root = str(datadir.root)
    before = _digest(datadir)
    with datadir.store() as store:
        rows_before = list(store.db.query("SELECT * FROM sqlite_master"))
    refused = run("privacy", "budget", "ghost", "5", "--data-dir", root)
    assert refused.returncode == 1 and refused.stderr.startswith("fedfleet: no device 'ghost'"), refused.stderr
    assert _digest(datadir) == before
    with datadir.store() as store:
        assert list(store.db.query("SELECT * FROM sqlite_master")) == rows_before
        assert Ledger(store, 10.0).budget("ghost") == 10.0


def test_tables_are_whole_when_piped_and_times_are_iso(datadir: DataDir) -> None:
    root = str(datadir.root)
    long_name = "pi-kitchen-" + "x" * 90
    with datadir.store() as store:
        store.register_device(long_name, "home", {"site": "kitchen", "hw": "pi4"}, {"hw": "pi4"}, "t")
        store.set_status(long_name, True, "", "", 0, "", "")
    listed = run("devices", "list", "--data-dir", root)
    assert listed.returncode == 0 and long_name in listed.stdout, listed.stdout
    shown = run("devices", "show", long_name, "--data-dir", root).stdout
    assert "hardware: hw=pi4" in shown and "None" not in shown and "{" not in shown, shown
    assert re.search(rf"last_seen: {ISO_LOCAL}", shown), shown


def test_completion_keys_help_and_the_agents_version_command() -> None:
    completion = run("--show-completion", "bash")
    assert completion.returncode == 0 and "complete" in completion.stdout, completion.stderr
    keys = run("keys", "--help").stdout
    assert all(word in keys for word in ("root", "releases", "director")), keys
    agent = run("version", module="edge_agent.cli")
    assert agent.returncode == 0 and re.fullmatch(r"fedfleet-agent \d+\.\d+\.\d+\S*\n", agent.stdout), agent.stdout


@pytest.mark.parametrize("flag", ["--verbose", ""])
def test_verbose_is_a_root_option(flag: str) -> None:
    out = run(*([flag] if flag else []), "version")
    assert out.returncode == 0 and out.stdout.startswith("fedfleet "), out.stderr


def test_a_command_of_the_coordinators_host_refuses_a_server_instead_of_acting_locally(
    datadir: DataDir, tmp_path: Path
) -> None:
    root = str(datadir.root)
    token = tmp_path / "token"
    token.write_text("some-token\n")
    before = _digest(datadir)
    remote = ["--server", "https://127.0.0.1:9", "--token-file", str(token)]

    refused = run(*remote, "keys", "rotate-root", "--data-dir", root)

    assert refused.returncode == 1, refused.stdout
    assert refused.stderr.startswith("fedfleet: `fedfleet keys rotate-root` works on the coordinator's host only")
    assert _digest(datadir) == before


def test_devices_label_prints_labels_for_people(datadir: DataDir) -> None:
    root = str(datadir.root)
    with datadir.store() as store:
        store.register_device("pi-1", "home", {}, {}, "t")
    out = run("devices", "label", "pi-1", "--label", "site=hall", "--label", "hw=pi4", "--data-dir", root)
    assert out.returncode == 0, out.stderr
    assert "pi-1: fleet home, labels hw=pi4, site=hall." in out.stdout and "{" not in out.stdout, out.stdout
