"""`fedfleet` from a laptop: a working directory with no data directory, a coordinator's HTTPS API (`serve --tls`,
the fleet CA's certificate), a user's token. A release manager uploads a release, starts a rollout and follows it,
pauses it and verifies the audit trail; a viewer is refused with one sentence and nothing changes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from server import audit
from server.datadir import DataDir
from server.trust.releases import publish_release
from simulations.dense_tflite import build_dense_model, random_dense_layers
from tests.support import CoordinatorProcess, wait_for

pytestmark = pytest.mark.slow


@dataclass
class Laptop:
    """A person's machine: a home with fedfleet's config, a working directory, the fleet CA, their tokens."""

    home: Path
    cwd: Path
    ca: Path
    url: str
    d: DataDir  # the coordinator's, read by the test only to check what happened

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FEDFLEET_")}
        return {**env, "HOME": str(self.home), "XDG_CONFIG_HOME": str(self.home / ".config"), **extra}

    def run(self, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "server.cli", *args],
            cwd=self.cwd,
            env=self.env(**env),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [sys.executable, "-m", "server.cli", *args],
            cwd=self.cwd,
            env=self.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )


@pytest.fixture
def laptop(datadir: DataDir, tmp_path: Path) -> Iterator[Laptop]:
    with datadir.store() as store:
        for version, seed in (("1.0.0", 1), ("2.0.0", 2)):
            publish_release(
                datadir.repository(),
                store,
                build_dense_model(random_dense_layers([64, 32, 10], seed)),
                "digits",
                version,
            )
        devices = [f"pi-{i}" for i in range(3)]
        for name in devices:
            store.register_device(name, "lab", {}, {}, "t")
        datadir.director().assign(store, devices, store.release("digits@1.0.0"))
    coordinator = CoordinatorProcess(datadir, mqtt_url=None, extra_args=("--tls",)).start()
    try:
        home, cwd = tmp_path / "home", tmp_path / "work"
        home.mkdir()
        cwd.mkdir()
        ca = home / "fleet-ca.pem"
        shutil.copy(datadir.trust / "ca.pem", ca)
        (home / "admin.token").write_text(datadir.operator_token())
        url = coordinator.endpoints["dashboard"]
        assert url.startswith("https://")
        yield Laptop(home, cwd, ca, url, datadir)
    finally:
        coordinator.kill()


def _one_sentence(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 1, (done.stdout, done.stderr)
    message = done.stderr.strip()
    assert message.startswith("fedfleet: ") and "\n" not in message and "Traceback" not in message, message
    return message


def test_a_release_manager_runs_a_rollout_from_a_laptop_and_a_viewer_is_refused(laptop: Laptop) -> None:
    # An admin, with the operator token, adds the two people (`--server` and --token-file: no context yet).
    admin = ("--server", laptop.url, "--token-file", str(laptop.home / "admin.token"), "--ca", str(laptop.ca))
    tokens = {}
    for name, role in (("rm", "release-manager"), ("vi", "viewer")):
        added = laptop.run(*admin, "users", "add", name, "--role", role, "--json")
        assert added.returncode == 0, added.stderr
        tokens[name] = json.loads(added.stdout)["token"]
        (laptop.home / f"{name}.token").write_text(tokens[name])
    assert not (laptop.cwd / "fedfleet-data").exists()
    # ... and places a device and sets its budget, audited under the admin's name.
    placed = laptop.run(*admin, "devices", "label", "pi-0", "--label", "site=hall", "--json")
    assert placed.returncode == 0, placed.stderr
    assert json.loads(placed.stdout) == {"device": "pi-0", "fleet": "lab", "labels": {"site": "hall"}}
    budget = laptop.run(*admin, "privacy", "budget", "pi-0", "2.5")
    assert budget.returncode == 0 and "pi-0: lifetime budget ε 2.5" in budget.stdout, budget.stderr
    with laptop.d.store() as store:
        assert store.device("pi-0")["labels"] == {"site": "hall"}
        actions = [(e["action"], e["actor"]) for e in audit.entries(store, 2)]
    assert actions == [("privacy.budget", "user:operator"), ("device.label", "user:operator")]

    # The release manager's context: every command below goes to the coordinator.
    added = laptop.run(
        "context", "add", "lab", "--server", laptop.url, "--token-file", str(laptop.home / "rm.token"),
        "--ca", str(laptop.ca),
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    listed = json.loads(laptop.run("context", "list", "--json").stdout)
    assert [(c["name"], c["current"]) for c in listed] == [("lab", True)]

    model = laptop.cwd / "digits-3.tflite"
    model.write_bytes(build_dense_model(random_dense_layers([64, 32, 10], 3)))
    released = laptop.run("release", str(model), "--name", "digits", "--version", "3.0.0", "--json")
    assert released.returncode == 0, released.stderr
    assert json.loads(released.stdout)["created"] is True
    with laptop.d.store() as store:
        assert store.release("digits@3.0.0").length == model.stat().st_size
        published = audit.entries(store, 5, "release.publish")[0]
    assert (published["subject"], published["actor"]) == ("digits@3.0.0", "user:rm")

    follow = laptop.popen("rollout", "start", "digits@3.0.0", "--fleet", "lab", "--bake", "3600", "--follow", "--json")
    try:

        def started() -> str | None:
            with laptop.d.store() as store:
                rows = laptop.d.rollouts(store).list()
            return rows[0]["id"] if rows and rows[0]["phase"] == "baking" else None

        wait_for(started, 60, what="the rollout's canary to bake")
        rollout_id = str(started())
        paused = laptop.run("rollout", "pause", rollout_id, "--json")
        assert paused.returncode == 0, paused.stderr
        assert json.loads(paused.stdout) == {"rollout": rollout_id, "phase": "paused", "decision": "pause"}
        status = json.loads(laptop.run("rollout", "status", rollout_id, "--json").stdout)
        assert status["phase"] == "paused"
        assert laptop.run("rollout", "abort", rollout_id).returncode == 0
        out, err = follow.communicate(timeout=60)
    finally:
        if follow.poll() is None:
            follow.kill()
            follow.communicate()
    assert follow.returncode == 0, err
    assert json.loads(out)["phase"] == "aborted"  # --follow --json: the final status, once the rollout ended

    verified = laptop.run("audit", "verify", "--json")
    assert verified.returncode == 0, verified.stderr
    report = json.loads(verified.stdout)
    assert report["intact"] is True and report["entries"] > 0
    with laptop.d.store() as store:
        actions = {(e["action"], e["actor"]) for e in audit.entries(store, 100)}
    assert {("rollout.start", "user:rm"), ("rollout.pause", "user:rm"), ("rollout.abort", "user:rm")} <= actions

    # Releases from the laptop: listed; one nobody needs retired; one the devices are assigned refused, unchanged.
    listed = {r["id"]: r for r in json.loads(laptop.run("releases", "list", "--json").stdout)}
    assert {"digits@1.0.0", "digits@2.0.0", "digits@3.0.0"} <= listed.keys()
    assert listed["digits@3.0.0"]["source"]["kind"] == "file" and listed["digits@2.0.0"]["retired_at"] is None
    retired = laptop.run("releases", "retire", "digits@2.0.0", "--json")
    assert retired.returncode == 0, retired.stderr
    assert json.loads(retired.stdout)["release"] == "digits@2.0.0"
    assert "still needed" in _one_sentence(laptop.run("releases", "retire", "digits@1.0.0"))
    listed = {r["id"]: r for r in json.loads(laptop.run("releases", "list", "--json").stdout)}
    assert listed["digits@2.0.0"]["retired_at"] is not None and listed["digits@1.0.0"]["retired_at"] is None
    with laptop.d.store() as store:
        assert (audit.entries(store, 1)[0]["action"], audit.entries(store, 1)[0]["actor"]) == (
            "release.retire",
            "user:rm",
        )

    # The viewer, with the same context and their own token: reads work, changes are refused in one sentence.
    with laptop.d.store() as store:
        before = (len(laptop.d.rollouts(store).list()), len(store.releases()), audit.verify(store)[0])
    assert laptop.run("audit", "verify", FEDFLEET_TOKEN=tokens["vi"]).returncode == 0
    refused = laptop.run("rollout", "start", "digits@2.0.0", "--fleet", "lab", FEDFLEET_TOKEN=tokens["vi"])
    assert "vi (viewer) lacks the rollouts.start permission" in _one_sentence(refused)
    refused = laptop.run("release", str(model), "--name", "digits", "--version", "4.0.0", FEDFLEET_TOKEN=tokens["vi"])
    assert "vi (viewer) lacks the releases.publish permission" in _one_sentence(refused)
    refused = laptop.run("releases", "retire", "digits@1.0.0", FEDFLEET_TOKEN=tokens["vi"])
    assert "vi (viewer) lacks the releases.publish permission" in _one_sentence(refused)
    refused = laptop.run("devices", "label", "pi-1", "--label", "site=x", FEDFLEET_TOKEN=tokens["vi"])
    assert "vi (viewer) lacks the devices.manage permission" in _one_sentence(refused)
    refused = laptop.run("privacy", "budget", "pi-1", "9", FEDFLEET_TOKEN=tokens["vi"])
    assert "vi (viewer) lacks the privacy.manage permission" in _one_sentence(refused)
    with laptop.d.store() as store:
        after = (len(laptop.d.rollouts(store).list()), len(store.releases()), audit.verify(store)[0])
    assert after == before


def test_the_remote_cli_refuses_plaintext_beyond_loopback_an_untrusted_certificate_and_a_bad_token(
    laptop: Laptop,
) -> None:
    token = ("--token-file", str(laptop.home / "admin.token"))
    plaintext = laptop.run("--server", "http://192.0.2.10:8080", *token, "rollout", "list")
    assert "plaintext http:// is only for a coordinator on this machine" in _one_sentence(plaintext)
    untrusted = laptop.run("--server", laptop.url, *token, "rollout", "list")  # no --ca: the system's trust store
    assert "is not trusted" in _one_sentence(untrusted) and "--ca" in untrusted.stderr
    (laptop.home / "wrong.token").write_text("not-a-token")
    wrong = laptop.run("--server", laptop.url, "--token-file", str(laptop.home / "wrong.token"), "--ca", str(laptop.ca),
                       "rollout", "list")  # fmt: skip
    assert "refused the token" in _one_sentence(wrong)
    missing = laptop.run("--server", laptop.url, "--ca", str(laptop.ca), "rollout", "list")
    assert "--server needs a token" in _one_sentence(missing)
    nowhere = laptop.run("rollout", "list")  # no server, no context, no data directory here
    assert "not an initialised data directory" in _one_sentence(nowhere)
    unknown = laptop.run("context", "use", "prod")
    assert "no context 'prod'" in _one_sentence(unknown)
    assert not (laptop.home / ".config" / "fedfleet" / "config.toml").exists()
