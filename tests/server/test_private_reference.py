"""A private drift reference (issue 19).

The bin counts a device returns for a release's drift reference carry Gaussian noise calibrated to the plan's
`reference_epsilon` with the sensitivity of one record across all the histograms it is counted in; each answer is
charged to the device's own privacy record and to the coordinator's ledger (purpose `drift-reference`); a device
past its budget refuses; the release's per-feature ranges are the public schema bounds.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, Metadata, MetricRecord, RecordDict
from opacus.accountants import RDPAccountant

from edge_agent.contract.drift import (
    DriftReference,
    WindowCounts,
    bin_counts,
    edges_from_fine_histograms,
    proportions,
    score_window,
)
from server.datadir import DataDir
from server.fl import client_app
from server.fl.data import FEATURE_RANGE, FEATURES, DigitsPartition, held_out
from server.fl.model import initial_weights
from server.fl.plan import PlanError, TrainPlan
from server.fl.privacy import DeviceBudget, epsilon_of, steps_per_round
from server.fl.private_counts import (
    epsilon_after,
    l2_sensitivity,
    noise_multiplier,
    noised_counts,
    pooled_counts,
    private_generator,
)
from server.fl.registry import Ledger, Registry, TrainingRuns
from server.fl.training import run_training

DELTA = 1e-5
FINE = 100


def _query(task: str, run_id: str, reference_epsilon: float = 0.5, budget: float = 10.0) -> Message:
    config: dict[str, Any] = {
        "task": task,
        "alpha": 0.5,
        "data-seed": 0,
        "run-id": run_id,
        "reference-epsilon": reference_epsilon,
        "delta": DELTA,
        "epsilon-budget": budget,
    }
    records: dict[str, Any] = {}
    if task == "feature-histogram":
        config.update({"range-lo": 0.0, "range-hi": 1.0, "fine-bins": FINE})
    else:
        edges = np.tile(np.linspace(0, 1, 11)[1:-1], (FEATURES, 1))
        records["arrays"] = ArrayRecord(numpy_ndarrays=[edges, np.linspace(0, 1, 11)[1:-1], *initial_weights(0)])
    records["config"] = ConfigRecord(config)
    metadata = Metadata(
        run_id=1,
        message_id=f"{run_id}-{task}",
        src_node_id=0,
        dst_node_id=5,
        reply_to_message_id="",
        group_id="reference",
        created_at=time.time(),
        ttl=600.0,
        message_type=MessageType.QUERY,
    )
    return Message(content=RecordDict(records), metadata=metadata)


def _context(node_config: dict[str, Any]) -> Context:
    return Context(run_id=1, node_id=5, node_config=node_config, state=RecordDict(), run_config={})


def _node(tmp_path: Path | None) -> dict[str, Any]:
    node = {"device-id": "pi-5", "partition-id": 0, "num-partitions": 10, "consent-training": True}
    return node if tmp_path is None else {**node, "state-dir": str(tmp_path)}


def _x() -> np.ndarray:
    return DigitsPartition(0, 10, 0.5, 0).load()[0]


# ----- the mechanism -----


def test_one_record_changes_one_count_per_histogram_so_the_sensitivity_is_the_root_of_their_number() -> None:
    x = _x()
    for task, histograms in (("feature-histogram", FEATURES), ("reference-counts", FEATURES + 1)):
        msg = _query(task, "run-s")
        config = msg.content["config"]
        assert isinstance(config, ConfigRecord)
        full = client_app._reference_counts(msg, config, task, x)
        for i in (0, 17, len(x) - 1):  # remove one record
            fewer = client_app._reference_counts(msg, config, task, np.delete(x, i, axis=0))
            diff = np.concatenate([(a - b).ravel() for a, b in zip(full, fewer, strict=True)])
            assert sorted(set(diff.tolist())) == [0, 1] and int(diff.sum()) == histograms
            assert math.isclose(float(np.linalg.norm(diff)), l2_sensitivity(histograms))
    assert l2_sensitivity(FEATURES) == 8.0


def test_the_noise_multiplier_meets_the_reference_epsilon_by_opacus_own_accountant() -> None:
    z = noise_multiplier(0.5, DELTA)
    accountant = RDPAccountant()
    for _ in range(2):  # the two queries: the Gaussian mechanism, every record in every answer
        accountant.step(noise_multiplier=z, sample_rate=1.0)
    both = float(accountant.get_epsilon(delta=DELTA))
    assert 0.49 <= both <= 0.5
    assert math.isclose(epsilon_after(z, DELTA, 2), both, rel_tol=1e-9)
    assert 0 < epsilon_after(z, DELTA, 1) < both and epsilon_after(z, DELTA, 0) == 0.0
    assert noise_multiplier(2.0, DELTA) < z  # more ε, less noise
    for bad in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match="ε must be a finite number > 0"):
            noise_multiplier(bad, DELTA)
    with pytest.raises(ValueError, match="δ must lie in"):
        noise_multiplier(0.5, 1.0)
    with pytest.raises(PlanError, match="reference ε"):
        TrainPlan(reference_epsilon=0.0)


def test_noised_counts_differ_from_the_exact_ones_by_noise_of_the_calibrated_scale() -> None:
    x = _x()
    edges = np.linspace(0, 1, FINE + 1)
    exact = np.stack([np.histogram(x[:, j], np.r_[-np.inf, edges, np.inf])[0] for j in range(FEATURES)])
    z = noise_multiplier(0.5, DELTA)
    (noised,), sigma = noised_counts([exact], z, np.random.default_rng(0))  # seeded for this statistical check
    assert sigma == z * 8.0
    residual = noised - exact
    n = residual.size  # 64 x 102 draws
    assert abs(residual.mean()) < 4 * sigma / math.sqrt(n)
    assert abs(residual.std() / sigma - 1) < 0.05  # sd of the sample sd: ~1/sqrt(2n) = 0.9%
    assert (noised < 0).any()  # a device sends its noised counts unclipped; the coordinator clips the pooled sum
    pooled = pooled_counts([noised, noised])
    assert pooled.min() == 0.0 and np.array_equal(pooled, np.maximum(2 * noised, 0))
    with pytest.raises(ValueError, match="noise multiplier"):
        noised_counts([exact], 0.0, np.random.default_rng(0))


def test_production_noise_comes_from_the_devices_own_entropy() -> None:
    a, b = private_generator(), private_generator()
    assert a.normal(size=8).tolist() != b.normal(size=8).tolist()


# ----- the device: charges, refuses, never answers twice for free -----


def test_a_device_charges_each_answer_to_its_record_and_refuses_past_its_budget(tmp_path: Path) -> None:
    app = client_app.build_client_app()
    node = _node(tmp_path)
    x = _x()
    z = noise_multiplier(0.5, DELTA)

    first = app(_query("feature-histogram", "run-a"), _context(node))
    second = app(_query("reference-counts", "run-a"), _context(node))

    record = DeviceBudget.open(tmp_path / "pi-5" / "privacy.json", 10.0)
    epsilons = []
    for reply, answers in ((first, 1), (second, 2)):
        assert not reply.has_error(), reply.error
        metrics = reply.content["metrics"]
        assert isinstance(metrics, MetricRecord)
        assert metrics["answers"] == answers and metrics["noise-multiplier"] == z
        epsilons.append(float(metrics["epsilon"]))  # type: ignore[arg-type]
    assert math.isclose(epsilons[0], epsilon_after(z, DELTA, 1)) and math.isclose(
        epsilons[1], epsilon_after(z, DELTA, 2)
    )
    assert record.run_epsilon("run-a/drift-reference") == epsilons[1] and record.lifetime() == epsilons[1]
    # What left the device is noised: the exact counts are not in it.
    counts = first.content["counts"]
    assert isinstance(counts, ArrayRecord)
    sent = counts.to_numpy_ndarrays()[0]
    fine = ConfigRecord({"range-lo": 0.0, "range-hi": 1.0, "fine-bins": FINE})
    exact = client_app._reference_counts(first, fine, "feature-histogram", x)[0]
    assert sent.shape == exact.shape and 0.8 < float((sent - exact).std()) / (z * 8) < 1.2

    # Asked again in the same run, the device charges a third answer: repeating a query is not free.
    again = app(_query("feature-histogram", "run-a"), _context(node))
    assert not again.has_error()
    assert DeviceBudget.open(record.path, 10.0).run_epsilon("run-a/drift-reference") == pytest.approx(
        epsilon_after(z, DELTA, 3)
    )

    # A device whose budget has no room refuses, and its record is unchanged.
    before = record.path.read_bytes()
    used = DeviceBudget.open(record.path, 10.0).lifetime()
    refused = app(_query("feature-histogram", "run-b", budget=used + 0.2), _context(node))
    assert "refusal" in refused.content and "counts" not in refused.content
    reason = refused.content["refusal"]
    assert isinstance(reason, ConfigRecord)
    assert "budget" in str(reason["reason"]) and "drift reference" in str(reason["reason"])
    assert record.path.read_bytes() == before

    # A device without a privacy record answers nothing.
    bare = app(_query("feature-histogram", "run-c"), _context(_node(None)))
    assert "refusal" in bare.content and "state-dir" in str(bare.content["refusal"]["reason"])  # type: ignore[index]


def test_exact_counts_leave_only_a_device_that_allows_them_and_cost_nothing(tmp_path: Path) -> None:
    """A lab plan's exact drift reference: the coordinator asking for it is not enough, the device must allow it
    (its node config, or the simulation that owns it); then its counts are exact and nothing is charged."""
    x = _x()
    ask = _query("feature-histogram", "run-x")
    ask.content["config"]["exact-reference"] = True  # type: ignore[index]
    refused = client_app.build_client_app()(ask, _context(_node(tmp_path)))
    assert "refusal" in refused.content and "counts" not in refused.content
    assert "exact counts" in str(refused.content["refusal"]["reason"])  # type: ignore[index]
    for app, node in (
        (client_app.build_client_app(), {**_node(tmp_path), "allow-exact-reference": True}),
        (client_app.build_client_app(allow_exact_reference=True), _node(tmp_path)),
    ):
        answer = app(ask, _context(node))
        counts = answer.content["counts"]
        assert isinstance(counts, ArrayRecord)
        fine = ConfigRecord({"range-lo": 0.0, "range-hi": 1.0, "fine-bins": FINE})
        exact = client_app._reference_counts(answer, fine, "feature-histogram", x)[0]
        assert np.array_equal(counts.to_numpy_ndarrays()[0], exact)
    assert not (tmp_path / "pi-5" / "privacy.json").exists()  # nothing charged, no record written
    # Without the coordinator asking for exact counts, an allowing device still answers noised ones.
    noised = client_app.build_client_app(allow_exact_reference=True)(
        _query("feature-histogram", "run-y"), _context(_node(tmp_path))
    )
    sent = noised.content["counts"].to_numpy_ndarrays()[0]  # type: ignore[union-attr]
    assert not np.array_equal(sent, exact)


# ----- the coordinator's ledger -----


def test_the_ledger_names_drift_reference_spends_and_adds_them_to_the_lifetime(tmp_path: Path) -> None:
    d, _ = DataDir.init(tmp_path / "data")
    with d.store() as store:
        TrainingRuns(store).start("run-1", "digits", "simulation", TrainPlan().to_dict())
        ledger = Ledger(store, 10.0)
        ledger.record("run-1", "pi-1", 1, 2.0, DELTA)
        z = noise_multiplier(0.5, DELTA)
        for step, query in enumerate(("feature-histogram", "reference-counts"), start=1):
            ledger.record_query(
                "run-1",
                "pi-1",
                "drift-reference",
                step,
                query,
                epsilon_after(z, DELTA, step),
                DELTA,
                noise_multiplier=z,
                sensitivity=8.0,
            )
        rows = ledger.rows()
        assert [(r["purpose"], r["rounds"]) for r in rows] == [("training", 1), ("drift-reference", 2)]
        assert rows[1]["epsilon"] == pytest.approx(epsilon_after(z, DELTA, 2)) and rows[1]["unit"] == "record"
        assert rows[1]["lifetime_epsilon"] == pytest.approx(2.0 + epsilon_after(z, DELTA, 2))
        assert rows[1]["lifetime_delta"] == pytest.approx(2 * DELTA)
        assert ledger.lifetime("pi-1") == pytest.approx(rows[1]["lifetime_epsilon"])
        assert [q["query"] for q in ledger.queries("run-1")] == ["feature-histogram", "reference-counts"]

        # Malformed spends are refused whole; nothing is written.
        bad: list[dict[str, Any]] = [
            {"purpose": "telemetry"},
            {"epsilon": math.nan},
            {"epsilon": -0.1},
            {"delta": 0.0},
            {"step": 0},
            {"noise_multiplier": 0.0},
        ]
        for override in bad:
            args: dict[str, Any] = {
                "purpose": "drift-reference",
                "step": 3,
                "epsilon": 0.7,
                "delta": DELTA,
                "noise_multiplier": z,
            }
            args.update(override)
            with pytest.raises(ValueError, match="nothing was recorded"):
                ledger.record_query(
                    "run-1",
                    "pi-1",
                    args["purpose"],
                    args["step"],
                    "feature-histogram",
                    args["epsilon"],
                    args["delta"],
                    noise_multiplier=args["noise_multiplier"],
                    sensitivity=8.0,
                )
        assert len(ledger.queries("run-1")) == 2
        # A lower figure for a later query is raised to the purpose's recorded ε; SQL cannot lower or delete one.
        assert ledger.record_query(
            "run-1", "pi-1", "drift-reference", 3, "reference-counts", 0.1, DELTA, noise_multiplier=z, sensitivity=8.0
        ) == pytest.approx(epsilon_after(z, DELTA, 2))
        with pytest.raises(sqlite3.IntegrityError, match="never lowered"):
            store.db.execute("UPDATE privacy_query_spend SET epsilon = 0")
        with pytest.raises(sqlite3.IntegrityError, match="never deleted"):
            store.db.execute("DELETE FROM privacy_query_spend")
        assert len(ledger.queries("run-1")) == 3


# ----- a real Flower run -----


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
def test_a_flower_run_charges_the_reference_and_a_device_past_its_budget_refuses_it(tmp_path: Path) -> None:
    d, _ = DataDir.init(tmp_path / "data")
    plan = TrainPlan(rounds=1, clients=3, noise_multiplier=1.0, local_epochs=1, seed=5, reference_epsilon=0.5)
    # sim-002's own record leaves room for its training but not for the drift reference after it.
    examples = len(DigitsPartition(2, 3, plan.alpha, plan.seed).load()[0])
    rate, steps = steps_per_round(examples, plan.batch_size, plan.local_epochs)
    training = epsilon_of([(1.0, rate, steps)], plan.delta)
    DeviceBudget.open(d.root / "fl-devices" / "sim-002" / "privacy.json", 10.0).record(
        "run-elsewhere", 10.0 - training - 0.25
    )

    outcome = run_training(d.root, plan)

    assert outcome.status == "completed", outcome.error
    refusals = [i for i in outcome.incidents if i["kind"] == "refused"]
    assert [(i["device_id"], i["round"]) for i in refusals] == [("sim-002", 2)]
    assert "drift reference (feature-histogram)" in refusals[0]["detail"] and "budget" in refusals[0]["detail"]
    z = noise_multiplier(0.5, plan.delta)
    with d.store() as store:
        rows = Ledger(store, 10.0).rows()
        model = Registry(store).get(outcome.model_version)
        queries = Ledger(store, 10.0).queries(outcome.run_id)
    reference_rows = {r["device"]: r for r in rows if r["purpose"] == "drift-reference"}
    assert sorted(reference_rows) == ["sim-000", "sim-001"]  # sim-002 refused: nothing charged for it
    for r in reference_rows.values():
        assert r["epsilon"] == pytest.approx(epsilon_after(z, plan.delta, 2)) and r["epsilon"] <= 0.5
        assert r["rounds"] == 2
    assert {(q["device_id"], q["step"], q["query"]) for q in queries} == {
        (dev, step, query)
        for dev in ("sim-000", "sim-001")
        for step, query in ((1, "feature-histogram"), (2, "reference-counts"))
    }
    assert all(q["sensitivity"] == pytest.approx(math.sqrt(64 if q["step"] == 1 else 65)) for q in queries)
    # The device's own record holds the same spend.
    own = DeviceBudget.open(d.root / "fl-devices" / "sim-000" / "privacy.json", 10.0)
    assert own.run_epsilon(f"{outcome.run_id}/drift-reference") == pytest.approx(epsilon_after(z, plan.delta, 2))
    # The release's reference (the registry's, which the release metadata carries verbatim) holds no raw min/max.
    reference = DriftReference.from_metadata(model.reference)
    assert np.array_equal(reference.feature_ranges, np.tile(FEATURE_RANGE, (FEATURES, 1)))
    card = model.lineage["privacy"]["drift_reference"]
    assert card["devices"] == ["sim-000", "sim-001"] and card["epsilon"] == 0.5 and card["noise_multiplier"] == z
    # The card says how loud the noise is against the records it was added to (estimated from the noised counts).
    assert card["pooled_noise_sd_per_bin"] == pytest.approx(z * math.sqrt(65) * math.sqrt(2))
    held = sum(len(DigitsPartition(i, 3, plan.alpha, plan.seed).load()[0]) for i in (0, 1))
    assert abs(card["records_estimate"] - held) < 300  # the estimate's sd is about 60 records


def test_drift_scoring_works_against_a_reference_built_from_noised_counts() -> None:
    """Clipped bins (zeros) and rows the noise emptied still give a reference that scores windows with finite
    PSI, and the demo's sensor fault still scores far above healthy data (seeded noise: a statistical check)."""
    from server.fl.server_app import REFERENCE_BINS, _rows_or_uniform
    from simulations.workload import SensorFault

    rng = np.random.default_rng(3)
    shares = [DigitsPartition(i, 10, 0.5, 0).load()[0] for i in range(10)]
    z = noise_multiplier(0.5, DELTA)
    grid = np.linspace(0, 1, FINE + 1)
    fine = _rows_or_uniform(
        pooled_counts(
            [
                noised_counts([np.stack([bin_counts(x[:, j], grid) for j in range(FEATURES)])], z, rng)[0][0]
                for x in shares
            ]
        )
    )
    assert (fine == 0).any()  # clipped bins
    edges, _ = edges_from_fine_histograms(fine, 0.0, 1.0, REFERENCE_BINS)
    counts = _rows_or_uniform(
        pooled_counts(
            [
                noised_counts([np.stack([bin_counts(x[:, j], edges[j]) for j in range(FEATURES)])], z, rng)[0][0]
                for x in shares
            ]
        )
    )
    reference = DriftReference(
        edges,
        proportions(counts),
        np.tile(FEATURE_RANGE, (FEATURES, 1)),
        np.linspace(0, 1, 11)[1:-1],
        np.full(10, 0.1),
        10,
    )
    x, _ = held_out(0)
    scores = []
    for inputs in (x, SensorFault("contrast", 0.5).apply(x, rng)):
        window = WindowCounts.empty(reference)
        window.add(reference, inputs, np.full((len(inputs), 10), 0.1), [])
        score = score_window(window, reference)
        assert score is not None and np.isfinite(score.feature_psi).all()
        scores.append(score.max_psi)
    healthy, faulty = scores
    assert faulty > 2 * healthy  # the fault still stands out ...
    assert healthy > 0.25  # ... but at ε 0.5 on ten devices' data a 0.25 threshold fires on healthy data too


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.filterwarnings("ignore:Full backward hook is firing:UserWarning")
def test_a_run_whose_devices_all_refuse_or_lack_budget_for_the_reference_fails_in_one_sentence(
    tmp_path: Path,
) -> None:
    d, _ = DataDir.init(tmp_path / "data")
    plan = TrainPlan(rounds=1, clients=2, noise_multiplier=1.0, local_epochs=1, seed=6, reference_epsilon=0.5)
    training = []
    for i in range(2):
        examples = len(DigitsPartition(i, 2, plan.alpha, plan.seed).load()[0])
        rate, steps = steps_per_round(examples, plan.batch_size, plan.local_epochs)
        training.append(epsilon_of([(1.0, rate, steps)], plan.delta))
    # sim-000's own record has room for its training, none for the drift reference after it (it refuses);
    # the coordinator knows sim-001's budget has no room for the reference either (it is not asked).
    DeviceBudget.open(d.root / "fl-devices" / "sim-000" / "privacy.json", 10.0).record(
        "run-elsewhere", 10.0 - training[0] - 0.2
    )
    with d.store() as store:
        Ledger(store, 10.0).set_budget("sim-001", training[1] + 0.2)

    outcome = run_training(d.root, plan)

    assert outcome.status == "failed" and outcome.model_version == ""
    assert outcome.error.startswith("no device answered the drift reference's feature-histogram query")
    assert "raise budgets with `fedfleet privacy budget`" in outcome.error
    kinds = {(i["device_id"], i["round"], i["kind"]) for i in outcome.incidents}
    assert kinds == {("sim-000", 2, "refused"), ("sim-001", 2, "skipped-budget")}
    skipped = next(i["detail"] for i in outcome.incidents if i["kind"] == "skipped-budget")
    assert skipped.startswith("drift reference: lifetime ε would reach")
    with d.store() as store:
        assert Registry(store).list() == [] and Ledger(store, 10.0).queries(outcome.run_id) == []
        assert {r["purpose"] for r in Ledger(store, 10.0).rows()} == {"training"}  # the training ε stays charged


def test_the_largest_lifetime_epsilon_on_status_and_metrics_counts_the_drift_reference(tmp_path: Path) -> None:
    from server.store.dashboard import DashboardReads

    d, _ = DataDir.init(tmp_path / "data")
    with d.store() as store:
        TrainingRuns(store).start("run-1", "digits", "simulation", TrainPlan().to_dict())
        ledger = Ledger(store, 10.0)
        ledger.record("run-1", "pi-1", 1, 1.0, DELTA)
        ledger.record("run-1", "pi-1", 2, 2.0, DELTA)
        ledger.record("run-1", "pi-2", 1, 2.2, DELTA)
        z = noise_multiplier(0.5, DELTA)
        for step in (1, 2):
            ledger.record_query(
                "run-1",
                "pi-1",
                "drift-reference",
                step,
                "q",
                epsilon_after(z, DELTA, step),
                DELTA,
                noise_multiplier=z,
                sensitivity=8.0,
            )
        assert DashboardReads(store).max_lifetime_epsilon() == pytest.approx(2.0 + epsilon_after(z, DELTA, 2))
        assert DashboardReads(store).max_lifetime_epsilon() == pytest.approx(ledger.lifetime("pi-1"))


def test_fedfleet_train_takes_the_reference_epsilon_and_refuses_a_bad_one_before_anything_runs(tmp_path: Path) -> None:
    from tests.server.test_training import cli

    d, _ = DataDir.init(tmp_path / "data")
    for bad in ("0", "-1", "nan", "101"):
        out = cli(d, "train", "--rounds", "1", "--clients", "2", "--reference-epsilon", bad, ok=False)
        assert "reference ε must be in (0, 100]" in out.stderr
    with d.store() as store:
        assert store.db.execute("SELECT COUNT(*) FROM fl_runs").fetchone()[0] == 0


def test_fedfleet_privacy_ledger_names_each_rows_purpose(tmp_path: Path) -> None:
    from tests.server.test_training import cli

    d, _ = DataDir.init(tmp_path / "data")
    with d.store() as store:
        TrainingRuns(store).start("run-1", "digits", "simulation", TrainPlan().to_dict())
        ledger = Ledger(store, 10.0)
        ledger.record("run-1", "pi-1", 1, 1.5, DELTA)
        ledger.record_query(
            "run-1",
            "pi-1",
            "drift-reference",
            1,
            "feature-histogram",
            0.34,
            DELTA,
            noise_multiplier=10.9,
            sensitivity=8.0,
        )
    rows = json.loads(cli(d, "privacy", "ledger", "--json").stdout)
    assert [(r["purpose"], r["epsilon"], r["lifetime_epsilon"]) for r in rows] == [
        ("training", 1.5, 1.5),
        ("drift-reference", 0.34, 1.84),
    ]
    assert cli(d, "privacy", "ledger").returncode == 0  # the table (its width is the terminal's)
