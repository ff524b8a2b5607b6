"""The rollout state machine, spec, policy and audit chain without sockets: pure decisions, real SQLite files."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server import audit
from server.errors import ConflictError
from server.policy import Policy, PolicyError, load_policy
from server.rollout.engine import Phase, RolloutState, Verdict, WaveObservation, decide, evaluate_gates, operator_action
from server.rollout.spec import OnFail, RolloutSpec, RolloutSpecError, load_spec, parse_gate, plan_waves
from server.store import Store

SPEC = RolloutSpec("digits@2.0.0", canary=2, bake_seconds=10, min_samples=100, min_devices=2)
HEALTHY = {
    "input_max_psi": 0.05,
    "input_mean_psi": 0.01,
    "input_max_kl": 0.02,
    "score_psi": 0.03,
    "class_mix_shift": 0.04,
    "latency_p95_ratio": 1.1,
    "error_rate": 0.0,
    "failure_rate": 0.0,
    "silent_fraction": 0.0,
}


def obs(treated: int = 2, committed: int = 2, samples: int = 1000, **values: float | None) -> WaveObservation:
    return WaveObservation(
        treated=treated,
        committed=committed,
        failed=0,
        silent=0,
        samples=samples,
        reporting_devices=committed,
        control_samples=5000,
        values={**HEALTHY, **values},
    )


def baking(wave: int = 0, started: int = 0) -> RolloutState:
    return RolloutState(Phase.BAKING, wave, started)


def test_pending_assigns_the_canary_and_bakes() -> None:
    step = decide(SPEC, RolloutState(Phase.PENDING, -1, 0), waves=3, now_ms=5, obs=None)
    assert step.assign_wave == 0 and step.state.phase is Phase.BAKING and step.state.wave_started_ms == 5
    assert step.decision == "start"


def test_nothing_is_judged_before_the_bake_ends_except_device_failures() -> None:
    assert decide(SPEC, baking(), 3, 9_999, obs(class_mix_shift=0.9)).state == baking()
    failed = dataclasses.replace(obs(), failed=1, committed=1)
    step = decide(SPEC, baking(), 3, 1_000, dataclasses.replace(failed, values={**HEALTHY, "failure_rate": 0.5}))
    assert step.rollback and step.state.phase is Phase.ROLLING_BACK
    assert "failure_rate = 0.5" in step.reason and [g.gate.metric for g in step.gates] == [
        "failure_rate",
        "silent_fraction",
    ]


def test_healthy_wave_advances_and_the_last_completes() -> None:
    step = decide(SPEC, baking(0), 3, 10_000, obs())
    assert (step.decision, step.assign_wave, step.state.wave, step.state.phase) == ("advance", 1, 1, Phase.BAKING)
    assert all(g.verdict is Verdict.PASS for g in step.gates) and len(step.gates) == len(SPEC.gates)
    last = decide(SPEC, baking(2), 3, 10_000, obs())
    assert last.decision == "completed" and last.state.phase is Phase.COMPLETED and last.assign_wave is None


def test_gates_do_not_fire_on_too_few_samples_or_devices() -> None:
    few = obs(samples=99, class_mix_shift=0.9, input_max_psi=3.0)
    step = decide(SPEC, baking(), 3, 20_000, few)
    assert step.decision == "waiting" and not step.rollback and step.state.phase is Phase.GATING
    assert "99 of 100 samples" in step.reason
    assert {g.verdict for g in step.gates if g.gate.metric == "class_mix_shift"} == {Verdict.INSUFFICIENT}
    # A standing wait is recorded once, not every tick.
    assert decide(SPEC, step.state, 3, 21_000, few).decision == ""
    one_device = dataclasses.replace(obs(class_mix_shift=0.9), reporting_devices=1)
    assert decide(SPEC, baking(), 3, 20_000, one_device).decision == "waiting"


def test_a_wave_waits_for_its_installs_before_advancing() -> None:
    step = decide(SPEC, baking(), 3, 20_000, obs(treated=3, committed=2))
    assert step.decision == "waiting" and "1 of 3 devices have not installed" in step.reason


def test_failing_gate_rolls_back_holds_or_pauses_as_the_spec_says() -> None:
    bad = obs(class_mix_shift=0.76)
    back = decide(SPEC, baking(1), 3, 10_000, bad)
    assert back.rollback and back.decision == "rollback" and back.state.phase is Phase.ROLLING_BACK
    assert "class_mix_shift = 0.76 (gate class_mix_shift <= 0.25)" in back.reason
    hold_spec = dataclasses.replace(SPEC, on_fail=OnFail.HOLD)
    held = decide(hold_spec, baking(1), 3, 10_000, bad)
    assert held.decision == "hold" and not held.rollback and held.state.wave == 1 and held.assign_wave is None
    assert decide(hold_spec, held.state, 3, 11_000, bad).decision == ""  # recorded once while it stands
    assert decide(hold_spec, held.state, 3, 12_000, obs()).decision == "advance"  # and lifted when gates pass
    paused = decide(dataclasses.replace(SPEC, on_fail=OnFail.PAUSE), baking(1), 3, 10_000, bad)
    assert paused.state.phase is Phase.PAUSED and paused.state.paused_from == "gating"
    assert decide(SPEC, paused.state, 3, 99_000, obs()).state == paused.state  # paused: nothing happens


def test_a_gate_without_data_behind_it_does_not_block() -> None:
    step = decide(SPEC, baking(), 3, 10_000, obs(input_max_psi=None, input_mean_psi=None, input_max_kl=None))
    assert step.decision == "advance" and "input_max_psi not judged" in step.reason


def test_rolling_back_ends_when_every_device_is_back() -> None:
    state = RolloutState(Phase.ROLLING_BACK, 1, 0)
    pending = dataclasses.replace(obs(), rollback_pending=2)
    assert decide(SPEC, state, 3, 1, pending).state == state
    done = decide(SPEC, state, 3, 1, obs())
    assert done.state.phase is Phase.ROLLED_BACK and done.decision == "rolled_back"


def test_operator_actions_and_their_refusals() -> None:
    paused = operator_action("pause", baking(1, 7), 100).state
    assert paused.phase is Phase.PAUSED and paused.paused_from == "baking"
    resumed = operator_action("resume", paused, 200).state
    assert resumed.phase is Phase.BAKING and resumed.wave_started_ms == 7
    assert operator_action("rollback", paused, 300).rollback
    with pytest.raises(ConflictError, match="not paused"):
        operator_action("resume", baking(), 1)
    with pytest.raises(ConflictError, match="nothing more"):
        operator_action("pause", RolloutState(Phase.COMPLETED, 2, 0), 1)
    with pytest.raises(ConflictError, match="unknown action"):
        operator_action("explode", baking(), 1)


def test_abort_stops_a_rollout_where_it_is_and_leaves_devices_as_they_are() -> None:
    for state in (
        RolloutState(Phase.PENDING, -1, 0),
        baking(1, 7),
        RolloutState(Phase.GATING, 1, 7),
        operator_action("pause", baking(1, 7), 100).state,
        RolloutState(Phase.ROLLING_BACK, 1, 7),
    ):
        step = operator_action("abort", state, 200)
        assert (step.state.phase, step.decision) == (Phase.ABORTED, "abort"), state
        assert step.assign_wave is None and not step.rollback, state  # no wave issued, nothing reverted
        assert step.state.wave == state.wave
        # The engine never moves an aborted rollout again, whatever the telemetry says.
        for observed in (obs(), obs(class_mix_shift=0.9), None):
            assert decide(SPEC, step.state, 3, 10**9, observed).state == step.state
        for action in ("pause", "resume", "abort", "rollback"):
            with pytest.raises(ConflictError, match="aborted; nothing more"):
                operator_action(action, step.state, 300)


def test_gate_verdicts_name_values_and_thresholds() -> None:
    results = evaluate_gates(SPEC, obs(latency_p95_ratio=2.5))
    failed = [r for r in results if r.verdict is Verdict.FAIL]
    assert [str(r) for r in failed] == ["latency_p95_ratio = 2.5 (gate latency_p95_ratio <= 2)"]
    assert failed[0].to_json()["threshold"] == 2.0


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"canary": 0}, "canary must be at least 1"),
        ({"waves": (0.5, 0.2, 1.0)}, "increase and end at 1.0"),
        ({"waves": (0.5,)}, "increase and end at 1.0"),
        ({"waves": (0.0, 1.0)}, "fractions in"),
        ({"bake_seconds": -1.0}, "bake_seconds"),
        ({"gates": ()}, "at least one gate"),
        ({"min_samples": 0}, "min_samples"),
    ],
)
def test_impossible_specs_are_refused_with_the_reason(changes: dict[str, object], message: str) -> None:
    with pytest.raises(RolloutSpecError, match=message):
        RolloutSpec("digits@2.0.0", **changes)  # type: ignore[arg-type]


def test_gate_parsing_and_spec_files(tmp_path: Path) -> None:
    assert str(parse_gate(" score_psi <= 0.3 ")) == "score_psi <= 0.3"
    for bad in ("score_psi", "nonsense<=1", "score_psi=<1", "score_psi<=abc", "score_psi<=nan"):
        with pytest.raises(RolloutSpecError):
            parse_gate(bad)
    f = tmp_path / "r.toml"
    f.write_text(
        'release = "digits@2.0.0"\ncanary = 3\nwaves = [0.5, 1.0]\non_fail = "hold"\nselector = { site = "a" }\n'
        '[[gates]]\nmetric = "class_mix_shift"\nop = "<="\nthreshold = 0.2\n'
    )
    spec = load_spec(f, canary=4)  # flags win over the file
    assert (spec.canary, spec.waves, spec.on_fail, dict(spec.selector)) == (4, (0.5, 1.0), OnFail.HOLD, {"site": "a"})
    assert [str(g) for g in spec.gates] == ["class_mix_shift <= 0.2"]
    assert RolloutSpec.from_json(spec.to_json()) == spec
    f.write_text('release = "x@1"\ncanary = "two"\n')
    with pytest.raises(RolloutSpecError, match="whole number"):
        load_spec(f)
    f.write_text('release = "x@1"\nbake = 3\n')
    with pytest.raises(RolloutSpecError, match="unknown setting"):
        load_spec(f)
    with pytest.raises(RolloutSpecError, match="name the release"):
        load_spec(None)


def _devices(n: int, sites: int = 3) -> list[tuple[str, dict[str, str]]]:
    return [(f"d{i:03d}", {"site": f"s{i % sites}"}) for i in range(n)]


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 300),
    canary=st.integers(1, 10),
    waves=st.lists(st.floats(0.01, 0.99), max_size=4).map(lambda w: (*sorted(set(w)), 1.0)),
    seed=st.integers(0, 2**31),
)
def test_a_plan_takes_every_device_once_canary_first(n: int, canary: int, waves: tuple[float, ...], seed: int) -> None:
    spec = RolloutSpec("m@1", canary=min(canary, n), waves=waves, seed=seed)
    plan = plan_waves(spec, _devices(n))
    flat = [d for w in plan for d in w]
    assert sorted(flat) == [d for d, _ in _devices(n)] and len(plan[0]) == min(canary, n)
    assert all(plan) and plan == plan_waves(spec, list(reversed(_devices(n))))  # seeded, order-independent


def test_a_canary_by_label_holds_every_cohort() -> None:
    plan = plan_waves(RolloutSpec("m@1", canary=4, canary_by="site", seed=1), _devices(30))
    assert {d[1:] and int(d[1:]) % 3 for d in plan[0]} == {0, 1, 2} and len(plan[0]) == 4
    with pytest.raises(RolloutSpecError, match="cannot represent the 3 values"):
        plan_waves(RolloutSpec("m@1", canary=2, canary_by="site"), _devices(30))
    with pytest.raises(RolloutSpecError, match="needs that many devices"):
        plan_waves(RolloutSpec("m@1", canary=5), _devices(3))


def test_policy_names_every_broken_rule(tmp_path: Path) -> None:
    f = tmp_path / "policy.toml"
    f.write_text(
        "[release]\nmax_epsilon = 3.0\nrequired_card_fields = ['intended_use', 'privacy.delta']\nmax_model_bytes = 10\n"
        "[rollout]\nmin_canary = 2\nrequired_gates = ['class_mix_shift']\nallowed_signers = ['abc']\n"
    )
    policy = load_policy(f)
    rules = policy.release_violations(11, {"model_card": {"privacy": {"epsilon": 8.0}}})
    assert [r.split(":")[0] for r in rules] == [
        "max_model_bytes",
        "required_card_fields",
        "required_card_fields",
        "max_epsilon",
    ]
    assert "'privacy.delta'" in rules[2] and "ε = 8.0 exceeds 3.0" in rules[3]
    ok_card = {"model_card": {"intended_use": "digits", "privacy": {"epsilon": 2.5, "delta": 1e-5}}}
    assert policy.release_violations(10, ok_card) == []
    spec = RolloutSpec("m@1", gates=(parse_gate("score_psi<=0.2"),))
    assert [r.split(":")[0] for r in policy.rollout_violations(spec, "def")] == [
        "min_canary",
        "required_gates",
        "allowed_signers",
    ]
    assert Policy().release_violations(10, {}) == [] and load_policy(tmp_path / "absent.toml") == Policy()
    for text, message in (
        ("[release]\nmax_epsilon = 'x'\n", "could not convert"),
        ("[rollout]\nrequired_gates = ['speed']\n", "unknown metric"),
        ("[release]\nmax_eps = 1\n", "unknown setting release.max_eps"),
        ("[deploy]\n", "unknown section"),
        ("[release\n", "cannot be read"),
    ):
        f.write_text(text)
        with pytest.raises(PolicyError, match=message):
            load_policy(f)


def test_audit_chain_finds_edited_and_deleted_entries(tmp_path: Path) -> None:
    store = Store(tmp_path / "a.db")
    for i in range(6):
        audit.append(store, "release.publish", f"m@{i}", {"n": i})
    assert audit.verify(store) == (6, [])
    assert [e["seq"] for e in audit.entries(store, limit=2)] == [6, 5]

    store.db.execute("UPDATE audit SET detail = '{\"n\":99}' WHERE seq = 2")
    _, problems = audit.verify(store)
    assert [(p.seq, p.problem.split(":")[0]) for p in problems] == [(2, "edited")]
    store.db.execute("UPDATE audit SET detail = '{\"n\":1}' WHERE seq = 2")

    store.db.execute("DELETE FROM audit WHERE seq = 4")
    _, problems = audit.verify(store)
    assert [p.seq for p in problems] == [4] and "deleted" in str(problems[0])

    store.db.execute("DELETE FROM audit WHERE seq >= 5")
    _, problems = audit.verify(store)
    assert [str(p) for p in problems] == ["entry 4: deleted from the end (the log ends at 3, its head says 6)"]
    store.close()


def test_audit_finds_an_entry_replaced_with_a_recomputed_hash(tmp_path: Path) -> None:
    store = Store(tmp_path / "a.db")
    for i in range(3):
        audit.append(store, "device.enroll", f"pi-{i}", {})
    row = store.db.execute("SELECT at, prev_hash FROM audit WHERE seq = 2").fetchone()
    forged = audit._digest(2, row[0], "coordinator", "device.enroll", "evil", "{}", row[1])
    store.db.execute("UPDATE audit SET subject = 'evil', hash = ? WHERE seq = 2", [forged])
    _, problems = audit.verify(store)
    assert [str(p) for p in problems] == ["entry 2: replaced: entry 3 was chained to another version of it"]
    store.close()


def test_drift_in_one_cohort_fails_the_gate_naming_the_cohort() -> None:
    north = obs(input_max_psi=0.9)
    pooled = dataclasses.replace(obs(input_max_psi=0.2), cohorts={"site=north": north, "site=south": obs()})
    step = decide(SPEC, baking(), 3, 10_000, pooled)
    assert step.rollback and "input_max_psi = 0.9 in cohort site=north (gate input_max_psi <= 0.25)" in step.reason
    # Device gates stay on the whole wave: one silent device of a small cohort does not stop it.
    small = dataclasses.replace(obs(), silent=1, committed=1, values={**HEALTHY, "silent_fraction": 0.5})
    quiet = dataclasses.replace(obs(), cohorts={"site=north": small})
    assert decide(SPEC, baking(), 3, 10_000, quiet).decision == "advance"
    thin = dataclasses.replace(obs(), cohorts={"site=north": obs(samples=10, input_max_psi=5.0)})
    waiting = decide(SPEC, baking(), 3, 10_000, thin)  # a cohort's thin evidence neither fires nor passes
    assert waiting.decision == "waiting" and "cohort site=north: 10 of 100 samples" in waiting.reason
    unassigned = dataclasses.replace(obs(), cohorts={"site=north": obs(treated=0, committed=0, samples=0)})
    assert decide(SPEC, baking(), 3, 10_000, unassigned).decision == "advance"  # no devices there yet: no say


def test_latency_ratio_ignores_sub_millisecond_jitter_but_sees_real_regressions() -> None:
    from edge_agent.contract.drift import LATENCY_EDGES_MS, DriftReference, WindowCounts
    from server.rollout.metrics import METRICS

    ratio = METRICS["latency_p95_ratio"].versus
    assert ratio is not None

    def counts(ms: float) -> WindowCounts:
        c = WindowCounts.empty(DriftReference.empty(10))
        c.latency_counts[int(np.searchsorted(LATENCY_EDGES_MS, ms))] = 100
        return c

    assert ratio(counts(0.15), counts(0.06)) == pytest.approx(1.0)  # 2.5x of microseconds: noise
    assert ratio(counts(30.0), counts(3.0)) > 2.0  # a real regression still fails the default gate


@pytest.mark.parametrize(
    "text", ["failure_rate<=1.5", "silent_fraction<=2", "class_mix_shift<=-0.1", "error_rate<1.01"]
)
def test_a_fraction_gate_whose_threshold_could_never_fail_is_refused(text: str) -> None:
    with pytest.raises(RolloutSpecError, match=r"a fraction, so its threshold must lie in \[0, 1\]"):
        parse_gate(text)


def test_ratio_and_drift_gates_take_thresholds_above_one() -> None:
    assert parse_gate("latency_p95_ratio<=2.0").threshold == 2.0
    assert parse_gate("input_max_psi<=1.5").threshold == 1.5
    assert parse_gate("failure_rate<=1").threshold == 1.0  # a fraction's bounds themselves are allowed
