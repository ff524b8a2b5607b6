"""Start a training run in Flower's simulation engine (Ray; one CPU per virtual client) and report its outcome.

The run goes the way Flower 1.41 recommends (server/fl/simulation_engine.py): `flwr run` submits fedfleet's
ServerApp and the simulated devices' ClientApp (`server.fl.client_app:simulated_app`) to a simulation SuperLink
of the run's own, whose `flwr-simulation` process runs them on a Ray node of the run's own
(server/fl/ray_head.py). Nothing crosses in memory: the run config names the data directory, the plan, the run's
id, each virtual node's device (partition i is device_ids[i]), the devices whose owners consent, and a named data
source; the federation config the number of virtual SuperNodes and each one's CPU. The caller's `on_round` is
served from the rounds the ServerApp records in the coordinator's store, read while the run goes.

The same ServerApp and ClientApp run on Flower's deployment engine (SuperLink + SuperNodes): see
docs/training.md.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from server.datadir import DataDir
from server.errors import CoordinatorError, NotFoundError
from server.fl.plan import TrainPlan
from server.fl.progress import RoundProgress

if TYPE_CHECKING:
    from server.fl.registry import TrainingRuns

__all__ = ["ENGINE_STOPPED", "TEST_CLIENTAPP_ENV", "TrainOutcome", "run_training", "simulated_device_ids"]

logger = logging.getLogger(__name__)

ENGINE_STOPPED = "the simulation engine stopped before the run ended"
# Test seam: a ClientApp ("module:attribute") to run instead of the simulated devices' own, e.g. one that wraps it
# and misreports; tests set it. Production never does, and whatever it names runs on the coordinator's own
# simulated devices only.
TEST_CLIENTAPP_ENV = "FEDFLEET_TEST_SIMULATED_CLIENTAPP"
SERVERAPP = "server.fl.server_app:app"
CLIENTAPP = "server.fl.client_app:simulated_app"
ENGINE_START_SECONDS = 600.0  # Ray's node and the SuperLink (with their retries), then the greeting


@dataclass(frozen=True)
class TrainOutcome:
    run_id: str
    status: str
    model_version: str
    error: str
    rounds: list[dict[str, Any]]
    incidents: list[dict[str, Any]]


def simulated_device_ids(n: int) -> list[str]:
    return [f"sim-{i:03d}" for i in range(n)]


class _RoundWatch:
    """Calls `on_round` for every round the ServerApp has recorded since the last call, in order; says whether
    the ServerApp has recorded the run's end (then nothing more is to come)."""

    def __init__(
        self, runs: TrainingRuns, run_id: str, rounds: int, on_round: Callable[[RoundProgress], None] | None
    ) -> None:
        self.runs, self.run_id, self.rounds, self.on_round = runs, run_id, rounds, on_round
        self.shown = 0

    def __call__(self) -> bool:
        try:
            ended = bool(self.runs.run(self.run_id)["status"] != "running")  # read first: no round can follow
        except NotFoundError:
            return False  # the ServerApp has not started the run yet
        self._show()
        return ended

    def _show(self) -> None:
        if self.on_round is None:
            return
        new = self.runs.rounds(self.run_id)[self.shown :]
        if not new:
            return
        incidents = self.runs.incidents(self.run_id)
        for row in new:
            self.on_round(RoundProgress.from_records(self.run_id, self.rounds, row, incidents))
            self.shown += 1


def _simulate(
    d: DataDir,
    plan: TrainPlan,
    ids: Sequence[str],
    on_round: Callable[[RoundProgress], None] | None,
    verbose: bool,
    source_for: str | None,
) -> tuple[str, str]:
    """One run on an engine of its own: the run's id, and what went wrong with the engine ("" when nothing). A run
    the engine left unfinished (it stopped under the ServerApp) is recorded as failed: ENGINE_STOPPED, and why."""
    from server.fl.ray_head import RayHeadError
    from server.fl.registry import TrainingRuns
    from server.fl.server_app import consenting_devices
    from server.fl.simulation_engine import FlowerApp, run_app

    run_id = f"run-{uuid.uuid4().hex[:12]}"
    with d.store() as store:
        # Simulated devices consent as the coordinator's record of their device says.
        consenting = consenting_devices(store, ids, d.policy().require_consent)
        app = FlowerApp(
            serverapp=SERVERAPP,
            clientapp=os.environ.get(TEST_CLIENTAPP_ENV) or CLIENTAPP,
            run_config={
                "data-dir": str(d.root),
                "plan": json.dumps(plan.to_dict(), sort_keys=True),
                "run-id": run_id,
                "engine": "simulation",
                "device-ids": json.dumps(list(ids)),
                "consenting": json.dumps(sorted(consenting)),
                "data-source": source_for or "",
            },
        )
        runs = TrainingRuns(store)
        try:
            result = run_app(
                app,
                plan.clients,
                timeout=ENGINE_START_SECONDS + (plan.rounds + 3) * plan.round_timeout,  # + greeting, reference
                verbose=verbose,
                while_running=_RoundWatch(runs, run_id, plan.rounds, on_round),
            )
        except RayHeadError as e:
            return run_id, str(e)
        # The engine has stopped: a run still "running" lost its ServerApp with it.
        try:
            unfinished = runs.run(run_id)["status"] == "running"
        except NotFoundError:
            unfinished = False
        if unfinished:
            runs.finish(run_id, "failed", f"{ENGINE_STOPPED}: {result.failure or result.reason or 'no reason given'}")
    return run_id, result.failure


def run_training(
    data_dir: Path,
    plan: TrainPlan,
    device_ids: Sequence[str] | None = None,
    on_round: Callable[[RoundProgress], None] | None = None,
    verbose: bool = False,
    source_for: str | None = None,
) -> TrainOutcome:
    """Run `plan` on `plan.clients` virtual clients, device i named device_ids[i] (default sim-000...), each
    training on the data `source_for` names ("module:callable": a factory that, given the data directory, gives
    each device's data source, server.fl.client_app.SourceFor; default: the device's digits share).

    Simulated devices keep their own privacy records under DATA/fl-devices/<device>/privacy.json.
    """
    from server.fl.client_app import source_factory
    from server.fl.registry import TrainingRuns

    d = DataDir(data_dir).require()
    ids = list(device_ids) if device_ids is not None else simulated_device_ids(plan.clients)
    if len(ids) != plan.clients or len(set(ids)) != len(ids):
        raise CoordinatorError(f"{plan.clients} clients need {plan.clients} distinct device ids (got {len(ids)})")
    if source_for:
        source_factory(source_for)  # one that cannot load fails here, before any engine starts
    with d.store() as store:
        runs = TrainingRuns(store)
        for attempt in (1, 2):
            run_id, failure = _simulate(d, plan, ids, on_round, verbose, source_for)
            try:
                doc = runs.run(run_id)
            except CoordinatorError:
                raise CoordinatorError(
                    f"the training run never started: {failure or 'the simulation ended early'}"
                ) from None
            if attempt == 2 or not doc["error"].startswith(ENGINE_STOPPED) or runs.rounds(run_id):
                break
            # The engine failed before a single round was done (its Ray node stopped under it, say). Once more,
            # as a new run on a new engine (the failed one stays recorded as failed). Devices that trained already
            # counted their privacy spending in their own accountants.
            logger.warning("training run %s failed before any round (%s); trying once more", run_id, doc["error"])
        return TrainOutcome(
            run_id,
            doc["status"],
            doc["model_version"],
            doc["error"] or failure,
            runs.rounds(run_id),
            runs.incidents(run_id),
        )
