"""The ClientApp: what a device (a SuperNode, or a virtual client in the simulation engine) does when asked.

Messages it answers (Flower Message API, flwr 1.41):
- query `hello`: its device id, whether its owner consents to training (`consent-training`), and, only if so, how
  many examples it holds.

Consent is the device's own: without its owner's consent to train (node config `consent-training = true`, set
from agent.toml's `[consent] training`; for a simulated device, the `consenting` its simulation names) the device
answers every train and drift-reference message with a refusal, whatever the coordinator asked.
- train: one round of local training — Opacus DP-SGD unless the run is non-private — from the global weights;
  replies with the new weights and metrics, among them the cumulative ε of this run after this round (under
  the run's accountant: `accountant` = rdp or prv) and the accountant history behind it (noise multipliers,
  sample rates, steps), which the coordinator recomputes.
  The history lives in the device's privacy record (`<state-dir>/<device>/privacy.json`, fsync'd and replaced
  atomically before the reply leaves), so a SuperNode or agent restart that loses the Flower context loses
  nothing; the reported ε never drops below what the record holds for the run. Before training the device
  checks that record: a round that would pass its lifetime budget is refused (a reply carrying a `refusal`
  record, not an error), whatever the coordinator asked. Private training needs a `state-dir`.
- query `feature-histogram` / `reference-counts`: per-feature bin counts of its inputs (never the inputs), and
  with the final model, the histogram of its top-class scores, each count with Gaussian noise calibrated to the
  plan's `reference-epsilon` (server/fl/private_counts.py). Each answer is charged to the device's privacy record
  (purpose `drift-reference` of the run) before it leaves; one that would pass the budget is refused. The
  coordinator pools the noised counts into the release's drift reference.

Node config (SuperNode `--node-config`, or set by the simulation): `device-id`, `partition-id`,
`num-partitions`, `data-source` (`digits` or `npz:PATH`), `state-dir` (where the device keeps its privacy
record), `epsilon-budget` (the device's own lifetime budget; otherwise the coordinator's figure is used),
`consent-training` (true: its owner consents to training on its data; absent or false: it refuses).

Two apps: `app`, for SuperNodes, knows its device from its node config only. `simulated_app` runs the
coordinator's simulated devices in Flower's simulation engine (`fedfleet train`, server/fl/training.py): the run
config the coordinator submits names them (`device-ids`, partition i being device i), their privacy records
(under `data-dir`), which consent (`consenting`) and where their data comes from (`data-source`). Those are
the coordinator's word, so `simulated_app` refuses to run on a node that names its own device (a SuperNode).
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import json
import math
import os
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from edge_agent.contract.drift import bin_counts
from server.errors import CoordinatorError
from server.fl.data import DataSource, source_from_config
from server.fl.model import predict_proba, train_plain
from server.fl.privacy import BudgetExceeded, DeviceBudget, History, epsilon_of, noise_for_target, steps_per_round
from server.fl.privacy import train_private as dp_train
from server.fl.private_counts import PURPOSE as REFERENCE_PURPOSE
from server.fl.private_counts import REFERENCE_QUERIES, epsilon_of_answers, noised_counts, private_generator
from server.fl.private_counts import noise_multiplier as reference_noise
from server.fl.records import as_bool, as_float, as_int, as_str

if TYPE_CHECKING:
    from server.datadir import DataDir

__all__ = [
    "DeviceSettings",
    "SourceFor",
    "build_client_app",
    "build_simulated_client_app",
    "client_seed",
    "noise_seed",
    "source_factory",
]

STATE_KEY = "fedfleet-dp"


def noise_seed(run_seed: int, server_round: int, device_id: str, seeded: bool) -> int:
    """The seed of a round's DP noise and Poisson masks: from this device's own entropy, which the coordinator
    never learns, unless the plan asks for seeded noise (a lab setting: the coordinator could replay the noise
    from the plan and subtract it)."""
    if seeded:
        return client_seed(run_seed, server_round, device_id)
    return int.from_bytes(os.urandom(8), "big") >> 1


def client_seed(run_seed: int, server_round: int, device_id: str) -> int:
    """A per-device, per-round seed, stable across processes (unlike hash())."""
    digest = hashlib.sha256(f"{run_seed}/{server_round}/{device_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


SourceFor = Callable[[int, int, float, int], DataSource]  # (partition, partitions, alpha, seed) -> data


def source_factory(name: str) -> Callable[[DataDir], SourceFor]:
    """The data source factory a name ("module:callable") stands for: given the coordinator's data directory, it
    gives each simulated device's data (simulations.closed_loop:fleet_sensors: the fleet's drifted sensors)."""
    module, _, attribute = name.partition(":")
    try:
        factory = getattr(importlib.import_module(module), attribute)
    except (ImportError, AttributeError, ValueError) as e:
        raise CoordinatorError(f"data source {name!r} cannot be loaded: {e}") from e
    if not callable(factory):
        raise CoordinatorError(f"data source {name!r} is not a callable")
    return factory  # type: ignore[no-any-return]


@dataclass(frozen=True)
class DeviceSettings:
    """What a simulation says about its devices (a SuperNode says it in its node config instead): partition i's
    device id, where the devices keep their privacy records, their data, whether they answer a lab run's exact
    drift-reference queries, and whose owners consent to training (the others refuse it)."""

    device_ids: Sequence[str] | None = None
    state_dir: Path | None = None
    source_for: SourceFor | None = None
    allow_exact_reference: bool = False
    consenting: Collection[str] | None = None


class _Node:
    """What a ClientApp knows about the node it runs on."""

    def __init__(self, context: Context, settings: DeviceSettings) -> None:
        self.source_for = settings.source_for
        cfg = context.node_config
        # The device's own choice (its node config, or the simulation that owns it), never the coordinator's.
        self.allow_exact_reference = settings.allow_exact_reference or cfg.get("allow-exact-reference") is True
        self.partition = int(cfg.get("partition-id", 0))
        self.partitions = int(cfg.get("num-partitions", 1))
        if "device-id" in cfg:
            self.device_id = as_str(cfg, "device-id")
        elif settings.device_ids is not None:
            self.device_id = settings.device_ids[self.partition]
        else:
            self.device_id = f"node-{context.node_id}"
        self.data_spec = str(cfg.get("data-source", "digits"))
        node_state = cfg.get("state-dir")
        self.state_dir = Path(str(node_state)) if node_state else settings.state_dir
        self.own_budget = as_float(cfg, "epsilon-budget") if "epsilon-budget" in cfg else None
        # The owner's consent: the node's own config first (a SuperNode, from agent.toml), else its simulation's.
        if "consent-training" in cfg:
            self.consents = cfg["consent-training"] is True
        else:
            self.consents = settings.consenting is not None and self.device_id in settings.consenting

    def refusal(self, msg: Message, what: str) -> Message | None:
        """The refusal to send instead of doing `what` when the owner has not consented to training; else None."""
        if self.consents:
            return None
        reason = (
            f"{what}: device {self.device_id} has no consent to train on its data (its owner's agent.toml [consent] "
            "training, node config consent-training)"
        )
        client = ConfigRecord({"device-id": self.device_id})
        return _reply(msg, {"refusal": ConfigRecord({"device-id": self.device_id, "reason": reason}), "client": client})

    def source(self, config: ConfigRecord) -> DataSource:
        alpha, seed = as_float(config, "alpha"), as_int(config, "data-seed")
        if self.source_for is not None:
            return self.source_for(self.partition, self.partitions, alpha, seed)
        return source_from_config(self.data_spec, self.partition, self.partitions, alpha, seed)

    def budget(self, config: ConfigRecord) -> DeviceBudget | None:
        if self.state_dir is None:
            return None
        limit = (
            self.own_budget
            if self.own_budget is not None
            else as_float(config, "epsilon-budget")
            if "epsilon-budget" in config
            else math.inf
        )
        return DeviceBudget.open(self.state_dir / self.device_id / "privacy.json", limit)


def _history(context: Context) -> History:
    if STATE_KEY not in context.state:
        return []
    rec = context.state[STATE_KEY]
    assert isinstance(rec, ConfigRecord)
    z, q, n = rec["noise"], rec["rate"], rec["steps"]
    assert isinstance(z, list) and isinstance(q, list) and isinstance(n, list)
    return [(float(a), float(b), int(c)) for a, b, c in zip(z, q, n, strict=True)]  # type: ignore[arg-type, call-overload]


def _keep_history(context: Context, history: History, noise: float) -> None:
    context.state[STATE_KEY] = ConfigRecord(
        {
            "noise": [h[0] for h in history],
            "rate": [h[1] for h in history],
            "steps": [h[2] for h in history],
            "chosen-noise": noise,
        }
    )


def _chosen_noise(context: Context) -> float | None:
    if STATE_KEY not in context.state:
        return None
    rec = context.state[STATE_KEY]
    assert isinstance(rec, ConfigRecord)
    return as_float(rec, "chosen-noise")


def _reply(msg: Message, records: dict[str, ArrayRecord | MetricRecord | ConfigRecord]) -> Message:
    return Message(content=RecordDict(records), reply_to=msg)


def _reference_counts(msg: Message, config: ConfigRecord, task: str, x: np.ndarray) -> list[np.ndarray]:
    """The exact counts a drift-reference query asks for (they never leave the device unnoised)."""
    if task == "feature-histogram":
        lo, hi, fine = as_float(config, "range-lo"), as_float(config, "range-hi"), as_int(config, "fine-bins")
        edges = np.linspace(lo, hi, fine + 1)
        return [np.stack([bin_counts(x[:, j], edges) for j in range(x.shape[1])])]
    feature_edges, score_edges, *weights = msg.content["arrays"].to_numpy_ndarrays()  # type: ignore[union-attr]
    counts = np.stack([bin_counts(x[:, j], feature_edges[j]) for j in range(x.shape[1])])
    scores = predict_proba(list(weights), x).max(axis=1)
    return [counts, bin_counts(scores, score_edges)]


def _reference_answer(msg: Message, node: _Node, config: ConfigRecord, task: str, x: np.ndarray) -> Message:
    """Answer a drift-reference query with Gaussian-noised counts (server/fl/private_counts.py), charged to this
    device's own privacy record first: every answer in the run counts, a repeated query too. An answer that would
    pass the device's lifetime budget is refused (a `refusal` record), and so is one without a privacy record."""
    client = ConfigRecord({"device-id": node.device_id})
    if config.get("exact-reference") is True:
        if not node.allow_exact_reference:
            reason = f"drift reference ({task}): device {node.device_id} does not answer with exact counts"
            return _reply(
                msg, {"refusal": ConfigRecord({"device-id": node.device_id, "reason": reason}), "client": client}
            )
        exact = _reference_counts(msg, config, task, x)
        return _reply(msg, {"counts": ArrayRecord(numpy_ndarrays=exact), "metrics": MetricRecord({}), "client": client})
    budget = node.budget(config)
    if budget is None:
        reason = f"device {node.device_id} has no state-dir to keep its privacy record, so it answers no drift query"
        return _reply(msg, {"refusal": ConfigRecord({"device-id": node.device_id, "reason": reason}), "client": client})
    run_id, delta = as_str(config, "run-id"), as_float(config, "delta")
    key = f"{run_id}/{REFERENCE_PURPOSE}"
    noise = reference_noise(as_float(config, "reference-epsilon"), delta)
    answers = [*budget.history(key), (noise, 1.0, 1)]
    epsilon = epsilon_of_answers(answers, delta)
    try:
        budget.check(key, epsilon)
    except BudgetExceeded as e:
        refusal = ConfigRecord({"device-id": node.device_id, "reason": f"drift reference ({task}): {e}"})
        return _reply(msg, {"refusal": refusal, "client": client})
    exact = _reference_counts(msg, config, task, x)
    epsilon = budget.record(key, epsilon, answers, delta, noise)  # durable before the answer leaves the device
    noised, sigma = noised_counts(exact, noise, private_generator())
    metrics = MetricRecord({"epsilon": epsilon, "noise-multiplier": noise, "sigma": sigma, "answers": len(answers)})
    return _reply(msg, {"counts": ArrayRecord(numpy_ndarrays=noised), "metrics": metrics, "client": client})


def build_client_app(
    device_ids: Sequence[str] | None = None,
    state_dir: Path | None = None,
    source_for: SourceFor | None = None,
    allow_exact_reference: bool = False,
    consenting: Collection[str] | None = None,
) -> ClientApp:
    """A ClientApp; `device_ids` names partition i's device in a simulation, `state_dir` holds simulated devices'
    privacy records, `source_for` gives simulated devices data other than the plain digits split (a rehearsal's
    drifted sensors), `allow_exact_reference` lets them answer a lab run's exact drift-reference queries,
    `consenting` names those whose owners consent to training (the others refuse it). A SuperNode names all five
    in its node config instead (`allow-exact-reference = true`, `consent-training = true`)."""
    settings = DeviceSettings(device_ids, state_dir, source_for, allow_exact_reference, consenting)
    return _client_app(lambda _: settings)


def build_simulated_client_app() -> ClientApp:
    """The ClientApp of the coordinator's simulated devices in Flower's simulation engine: their settings come from
    the run config server/fl/training.py writes (`data-dir`, `device-ids` and `consenting` as JSON lists,
    `data-source`, `run-id`). On a node that names its own device (a SuperNode) it refuses to run: there the
    coordinator's run config must not speak for the device."""
    return _client_app(_simulated_devices)


def _simulated_devices(context: Context) -> DeviceSettings:
    if "device-id" in context.node_config:
        raise CoordinatorError(
            "server.fl.client_app:simulated_app runs the coordinator's simulated devices only; a SuperNode (node "
            "config device-id) runs server.fl.client_app:app"
        )
    cfg = context.run_config
    return _simulation_settings(
        run_id=str(cfg.get("run-id", "")),
        data_dir=str(cfg.get("data-dir", "")),
        device_ids=str(cfg.get("device-ids", "[]")),
        consenting=str(cfg.get("consenting", "[]")),
        data_source=str(cfg.get("data-source", "")),
    )


@functools.lru_cache(maxsize=4)
def _simulation_settings(
    run_id: str, data_dir: str, device_ids: str, consenting: str, data_source: str
) -> DeviceSettings:
    """One run's simulated devices, worked out once per worker process and run: the data source factory may read
    files (a rehearsal's sensor fault), and every device of the run must see the same data for all its rounds.
    They are the coordinator's own: a lab plan's exact drift reference is theirs to allow."""
    from server.datadir import DataDir

    if not data_dir:
        raise CoordinatorError("the run config names no data-dir for the simulated devices' privacy records")
    root = Path(data_dir)
    return DeviceSettings(
        device_ids=tuple(json.loads(device_ids)),
        state_dir=root / "fl-devices",
        source_for=source_factory(data_source)(DataDir(root)) if data_source else None,
        allow_exact_reference=True,
        consenting=frozenset(json.loads(consenting)),
    )


def _client_app(settings_of: Callable[[Context], DeviceSettings]) -> ClientApp:
    """The ClientApp's handlers; `settings_of` gives what the simulation, if any, says about the node's device."""
    app = ClientApp()

    @app.query()
    def query(msg: Message, context: Context) -> Message:
        node = _Node(context, settings_of(context))
        config = msg.content["config"]
        assert isinstance(config, ConfigRecord)
        task = as_str(config, "task")
        if task == "hello" and not node.consents:  # says so, and nothing about its data
            return _reply(msg, {"client": ConfigRecord({"device-id": node.device_id, "consent-training": False})})
        if task in REFERENCE_QUERIES and (refused := node.refusal(msg, f"drift reference ({task})")) is not None:
            return refused
        x, _ = node.source(config).load()
        if task == "hello":
            hello = ConfigRecord({"device-id": node.device_id, "num-examples": len(x), "consent-training": True})
            return _reply(msg, {"client": hello})
        if task in REFERENCE_QUERIES:
            return _reference_answer(msg, node, config, task, x)
        raise ValueError(f"unknown query task {task!r}")

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        node = _Node(context, settings_of(context))
        if (refused := node.refusal(msg, "training")) is not None:
            return refused
        config = msg.content["config"]
        assert isinstance(config, ConfigRecord)
        arrays = msg.content["arrays"]
        assert isinstance(arrays, ArrayRecord)
        server_round, run_id = as_int(config, "server-round"), as_str(config, "run-id")
        epochs, batch, delta = as_int(config, "local-epochs"), as_int(config, "batch-size"), as_float(config, "delta")
        x, y = node.source(config).load()
        seed = client_seed(as_int(config, "seed"), server_round, node.device_id)
        weights = arrays.to_numpy_ndarrays()
        private = as_bool(config, "private")
        metrics: dict[str, int | float | list[int] | list[float]] = {"num-examples": len(x)}
        if private:
            budget = node.budget(config)
            if budget is None:
                raise CoordinatorError(
                    f"device {node.device_id} has no state-dir in its node config, so it cannot keep the privacy "
                    "record private training needs; start it with --node-config \"state-dir='/var/lib/fedfleet/fl'\""
                )
            rate, steps = steps_per_round(len(x), batch, epochs)
            # The run's accountant calibrates the noise and gives the ε reported (a coordinator before it: RDP).
            accountant = as_str(config, "accountant") if "accountant" in config else "rdp"
            # The durable record is the truth; the context's copy only helps if the record was lost mid-run.
            history = max(budget.history(run_id), _history(context), key=lambda h: epsilon_of(h, delta, accountant))
            noise = budget.noise(run_id) or _chosen_noise(context)
            if noise is None:
                target = as_float(config, "target-epsilon")
                planned = as_int(config, "planned-rounds")
                noise = (
                    as_float(config, "noise-multiplier")
                    if target <= 0
                    else noise_for_target(target, delta, rate, planned * steps, accountant)
                )
            try:
                budget.check(run_id, epsilon_of([*history, (noise, rate, steps)], delta, accountant))
            except BudgetExceeded as e:
                refusal = ConfigRecord({"device-id": node.device_id, "reason": str(e)})
                return _reply(msg, {"refusal": refusal, "client": ConfigRecord({"device-id": node.device_id})})
            seed = noise_seed(
                as_int(config, "seed"),
                server_round,
                node.device_id,
                "seeded-noise" in config and as_bool(config, "seeded-noise"),
            )
            result, history = dp_train(
                weights,
                x,
                y,
                epochs=epochs,
                batch_size=batch,
                lr=as_float(config, "lr"),
                noise_multiplier=noise,
                max_grad_norm=as_float(config, "max-grad-norm"),
                history=history,
                seed=seed,
                secure_mode=as_bool(config, "secure-mode"),
                accountant=accountant,
            )
            # Durable before the update leaves the device; never lower than this run's ε recorded before.
            epsilon = budget.record(run_id, epsilon_of(history, delta, accountant), history, delta, noise)
            _keep_history(context, history, noise)
            metrics.update(epsilon=epsilon, delta=delta, **{"noise-multiplier": noise, "sample-rate": rate})
            metrics["history-steps"] = sum(h[2] for h in history)
            # The whole accountant history, so the coordinator can recompute the ε with its own accountant.
            metrics["accountant-noise"] = [h[0] for h in history]
            metrics["accountant-rate"] = [h[1] for h in history]
            metrics["accountant-steps"] = [h[2] for h in history]
        else:
            result = train_plain(weights, x, y, epochs, batch, as_float(config, "lr"), seed)
        metrics.update(**{"train-loss": result.loss, "steps": result.steps})
        return _reply(
            msg,
            {
                "arrays": ArrayRecord(numpy_ndarrays=result.weights),
                "metrics": MetricRecord(metrics),
                "client": ConfigRecord({"device-id": node.device_id}),
            },
        )

    return app


# For Flower's deployment engine (`flwr run` against a SuperLink): SuperNodes name themselves in node config.
app = build_client_app()
# For Flower's simulation engine (`fedfleet train`): the coordinator's simulated devices, named by the run config.
simulated_app = build_simulated_client_app()
