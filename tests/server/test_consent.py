"""Consent to training (issue 20): the owner states it in agent.toml, the agent reports it when it registers, the
coordinator records it with time and source; a device without it is never selected, and its ClientApp refuses
whatever it is asked. The ledger and the model's lineage name the devices that consented.

The training runs here drive the real ServerApp and the real ClientApp in this process through a Grid that
delivers each message to the ClientApp of its node (Flower's Grid interface, no Ray). Through Flower's own
engines: tests/server/test_training_engine.py (the simulated devices' consent in the run config) and
tests/server/test_training_deployment.py (SuperNodes whose owners consented).
"""

from __future__ import annotations

import json
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from edge_agent.config import load_config
from edge_agent.errors import ConfigError
from edge_agent.transport import GrpcTransport
from server.datadir import DataDir
from server.fl.client_app import build_client_app
from server.fl.plan import TrainPlan
from server.fl.registry import Ledger, Registry, TrainingRuns, model_card, model_card_markdown
from server.fl.server_app import consenting_devices
from server.store.consent import ConsentRecords
from tests.server.grid import LocalGrid, run_server_app
from tests.server.grid import message as server_message
from tests.support import GrpcServerThread, fedfleet

PLAN = TrainPlan(rounds=1, clients=3, noise_multiplier=None, local_epochs=1, seed=4, exact_reference=True)
DEVICES = ("pi-a", "pi-b", "pi-c")


def _node_config(i: int, consent: bool | None) -> dict[str, Any]:
    cfg: dict[str, Any] = {"device-id": DEVICES[i], "partition-id": i, "num-partitions": len(DEVICES)}
    if consent is not None:
        cfg["consent-training"] = consent
    return cfg


def _train(d: DataDir, device_consent: dict[int, bool | None], run_id: str) -> LocalGrid:
    """One run of the real ServerApp against the real ClientApps of three nodes with these node configs."""
    grid = LocalGrid(
        build_client_app(allow_exact_reference=True), {i + 1: _node_config(i, c) for i, c in device_consent.items()}
    )
    run_server_app(d.root, PLAN, run_id, grid)
    return grid


def _policy(d: DataDir, text: str) -> None:
    (d.root / d.config().policy).write_text(text)


def _asking(message_type: str, config: dict[str, Any]) -> Message:
    return server_message(RecordDict({"config": ConfigRecord(config)}), message_type)


def _context(node_config: dict[str, Any]) -> Context:
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config={})


# ----- the device side -----


def test_agent_toml_states_consent_and_anything_else_is_refused_with_one_sentence(
    datadir: DataDir, tmp_path: Path
) -> None:
    # Prepare / Execute: bundles written with each choice, and without one (a bundle from before)
    from server.trust.enrollment import write_bundle

    yes = write_bundle(datadir, "pi-yes", tmp_path / "yes", consent_training=True)
    no = write_bundle(datadir, "pi-no", tmp_path / "no", consent_training=False)
    unstated = write_bundle(datadir, "pi-old", tmp_path / "old")

    # Assert
    assert (yes.consent_training, no.consent_training, unstated.consent_training) == (True, False, None)
    assert tomllib.loads((tmp_path / "no" / "agent.toml").read_text())["consent"] == {"training": False}
    toml = tmp_path / "yes" / "agent.toml"
    for bad, message in (
        ('[consent]\ntraining = "yes"\n', "training must be true or false"),
        ("[consent]\ntraining = true\nanalytics = true\n", "one setting: training"),
        ('consent = "all"\n', "one setting: training"),
    ):
        text = (tmp_path / "old" / "agent.toml").read_text().replace("[labels]", "")
        toml.write_text(bad + text if bad.startswith("consent") else text + "\n" + bad)
        with pytest.raises(ConfigError, match=message):
            load_config(toml)


def test_a_client_without_consent_refuses_training_and_reference_queries_and_says_so_at_hello() -> None:
    app = build_client_app()  # a SuperNode's app: consent comes from its node config only
    train = {"server-round": 1, "run-id": "run-x", "local-epochs": 1, "batch-size": 32, "delta": 1e-5, "seed": 0}
    for node_config in ({"device-id": "pi-x"}, {"device-id": "pi-x", "consent-training": False}):
        # Execute
        refused = app(_asking(MessageType.TRAIN, train), _context(node_config))
        hello_config = {"task": "hello", "alpha": 0.5, "data-seed": 0}
        hello = app(_asking(MessageType.QUERY, hello_config), _context(node_config))
        reference_config = {"task": "feature-histogram", "exact-reference": True}
        reference = app(_asking(MessageType.QUERY, reference_config), _context(node_config))

        # Assert: a refusal record (not an error) naming the consent; the hello tells nothing of the data
        reason = refused.content["refusal"]
        assert isinstance(reason, ConfigRecord) and "no consent to train" in str(reason["reason"])
        assert "arrays" not in refused.content
        client = hello.content["client"]
        assert isinstance(client, ConfigRecord)
        assert client["consent-training"] is False and "num-examples" not in client
        assert "refusal" in reference.content and "counts" not in reference.content


# ----- the coordinator's record -----


def test_registration_records_consent_when_it_changes_with_time_and_source(datadir: DataDir) -> None:
    # Prepare: the real FleetService over gRPC (plaintext on loopback, no client certificate needed)
    with datadir.store() as store:
        server = GrpcServerThread(store, datadir.repository())
        try:
            transport = GrpcTransport(server.address, "pi-a")
            before = int(time.time() * 1000)

            # Execute: an agent with no [consent], then one that grants, again, then withdraws
            transport.register("lab", {}, "ai-edge-litert")
            nothing = ConsentRecords(store).history("pi-a")
            transport.register("lab", {}, "ai-edge-litert", consent_training=True)
            transport.register("lab", {}, "ai-edge-litert", consent_training=True)
            transport.register("lab", {}, "ai-edge-litert", consent_training=False)
        finally:
            server.stop()

        # Assert
        history = ConsentRecords(store).history("pi-a")
        current = ConsentRecords(store).current("pi-a")
    assert nothing == []
    assert [(h["granted"], h["source"], h["purpose"]) for h in history] == [
        (True, "agent", "training"),
        (False, "agent", "training"),
    ]
    assert all(h["recorded_at"] >= before for h in history)
    assert current is not None and current["granted"] is False


def test_consent_statements_are_never_changed_or_deleted(datadir: DataDir) -> None:
    import sqlite3

    with datadir.store() as store:
        ConsentRecords(store).record("pi-a", "training", True, "agent")
        with pytest.raises(sqlite3.IntegrityError, match="never changed"):
            store.db.execute("UPDATE consent SET granted = 0")
        with pytest.raises(sqlite3.IntegrityError, match="never deleted"):
            store.db.execute("DELETE FROM consent")
        with pytest.raises(ValueError, match="unknown consent purpose"):
            ConsentRecords(store).record("pi-a", "analytics", True, "agent")
        assert [h["granted"] for h in ConsentRecords(store).history("pi-a")] == [True]


def test_selection_follows_the_records_and_the_policy(datadir: DataDir) -> None:
    with datadir.store() as store:
        ConsentRecords(store).record("pi-a", "training", True, "agent")
        ConsentRecords(store).record("pi-b", "training", False, "agent")
        # pi-c: nothing recorded
        assert consenting_devices(store, DEVICES, require_consent=True) == {"pi-a"}
        assert consenting_devices(store, DEVICES, require_consent=False) == {"pi-a", "pi-c"}  # a "no" holds anyway


def test_the_policy_rule_is_read_and_a_bad_value_is_refused(datadir: DataDir) -> None:
    from server.policy import PolicyError

    assert datadir.policy().require_consent is False  # no policy file: the built-in defaults
    _policy(datadir, "[consent]\nrequire_consent = true\n")
    assert datadir.policy().require_consent is True
    _policy(datadir, '[consent]\nrequire_consent = "yes"\n')
    with pytest.raises(PolicyError, match="require_consent must be true or false"):
        datadir.policy()


# ----- a run: selection, refusal, ledger and lineage -----


@pytest.mark.slow
def test_a_device_that_withdraws_is_skipped_in_the_next_run_and_the_lineage_lists_who_consented(
    datadir: DataDir,
) -> None:
    # Prepare: the policy requires consent; all three owners grant it
    _policy(datadir, "[consent]\nrequire_consent = true\n")
    with datadir.store() as store:
        for device in DEVICES:
            ConsentRecords(store).record(device, "training", True, "agent")

    # Execute: a first run; then pi-b's owner withdraws (agent.toml, reported at registration) and a second runs
    first_grid = _train(datadir, {0: True, 1: True, 2: True}, "run-first")
    with datadir.store() as store:
        ConsentRecords(store).record("pi-b", "training", False, "agent")
    grid = _train(datadir, {0: True, 1: False, 2: True}, "run-second")

    # Assert: pi-b (node 2) got the greeting only; the others trained; lineage, card and ledger say who consented
    assert (2, MessageType.TRAIN) in first_grid.delivered
    assert [t for n, t in grid.delivered if n == 2] == [MessageType.QUERY]
    with datadir.store() as store:
        runs = TrainingRuns(store)
        assert runs.run("run-second")["status"] == "completed"
        skipped = [i for i in runs.incidents("run-second") if i["kind"] == "skipped-consent"]
        assert [i["device_id"] for i in skipped] == ["pi-b"]
        model = Registry(store).get(runs.run("run-second")["model_version"])
        consent = model.lineage["consent"]
        assert consent == {"required": True, "devices": ["pi-a", "pi-c"], "without_consent": ["pi-b"]}
        assert model.lineage["devices"] == ["pi-a", "pi-c"]
        assert model_card(model)["training"]["consent"]["devices"] == ["pi-a", "pi-c"]
        assert "2 device(s) consented (pi-a, pi-c); 1 left out without consent" in model_card_markdown(model)
        first = Registry(store).get(runs.run("run-first")["model_version"])
        assert first.lineage["consent"]["devices"] == list(DEVICES)
        of_run = {r["device_id"]: (r["granted"], r["source"]) for r in ConsentRecords(store).of_run("run-second")}
        assert of_run == {"pi-a": (True, "agent"), "pi-b": (False, "agent"), "pi-c": (True, "agent")}


@pytest.mark.slow
def test_the_device_own_refusal_holds_even_when_the_coordinator_records_consent(datadir: DataDir) -> None:
    # Prepare: the coordinator holds a "yes" for all three, but pi-c's own node config says no
    with datadir.store() as store:
        for device in DEVICES:
            ConsentRecords(store).record(device, "training", True, "agent")

    # Execute
    grid = _train(datadir, {0: True, 1: True, 2: None}, "run-own")

    # Assert: pi-c is never sent anything but the greeting, and the incident says why
    assert [t for n, t in grid.delivered if n == 3] == [MessageType.QUERY]
    with datadir.store() as store:
        incidents = TrainingRuns(store).incidents("run-own")
        model = Registry(store).get(TrainingRuns(store).run("run-own")["model_version"])
    assert any(i["device_id"] == "pi-c" and "the device itself does not consent" in i["detail"] for i in incidents)
    assert model.lineage["consent"]["without_consent"] == ["pi-c"]


def test_without_any_consent_the_run_fails_with_one_sentence_and_trains_nothing(datadir: DataDir) -> None:
    _policy(datadir, "[consent]\nrequire_consent = true\n")

    # Execute: nobody has a record
    with pytest.raises(Exception, match="no device consented to training"):
        _train(datadir, {0: True, 1: True, 2: True}, "run-none")

    # Assert
    with datadir.store() as store:
        run = TrainingRuns(store).run("run-none")
        assert run["status"] == "failed" and run["model_version"] == ""
        assert Ledger(store, 10.0).rows() == []


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")  # Opacus' hooks on a frozen input
def test_the_ledger_says_whether_each_device_consented_to_the_run(datadir: DataDir) -> None:
    # Prepare: a private run (record-level DP) in which pi-b has withdrawn
    with datadir.store() as store:
        ConsentRecords(store).record("pi-b", "training", False, "agent")
    grid = LocalGrid(
        build_client_app(allow_exact_reference=True),
        {i + 1: {**_node_config(i, True), "state-dir": str(datadir.root / "fl-devices")} for i in range(3)},
    )
    plan = TrainPlan(rounds=1, clients=3, noise_multiplier=1.0, local_epochs=1, seed=4, exact_reference=True)

    # Execute
    run_server_app(datadir.root, plan, "run-dp", grid)

    # Assert
    with datadir.store() as store:
        rows = [r for r in Ledger(store, 10.0).rows() if r["run"] == "run-dp"]
    assert {r["device"] for r in rows} == {"pi-a", "pi-c"}
    assert all(r["consented"] is True for r in rows)


@pytest.mark.slow
def test_enroll_writes_the_owner_choice_into_agent_toml(datadir: DataDir, tmp_path: Path) -> None:
    # Execute
    granted = fedfleet(
        datadir, "devices", "enroll", "pi-g", "--out", str(tmp_path / "g"), "--consent-training", "--json"
    )
    default = fedfleet(datadir, "devices", "enroll", "pi-d", "--out", str(tmp_path / "d"), "--json")

    # Assert
    assert granted.returncode == 0, granted.stderr
    assert json.loads(granted.stdout)["consent_training"] is True
    assert load_config(tmp_path / "g" / "agent.toml").consent_training is True
    assert default.returncode == 0, default.stderr
    assert load_config(tmp_path / "d" / "agent.toml").consent_training is False  # new bundles: no consent
