"""Start a training run in Flower's simulation engine (Ray; one CPU per virtual client) and report its outcome.

The same ServerApp and ClientApp run on Flower's deployment engine (SuperLink + SuperNodes): see
docs/training.md.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from server.datadir import DataDir
from server.errors import CoordinatorError
from server.fl.plan import TrainPlan

if TYPE_CHECKING:
    from server.fl.client_app import SourceFor
    from server.fl.registry import TrainingRuns
from server.fl.server_app import ENGINE_STOPPED, RoundProgress

__all__ = ["TrainOutcome", "run_training", "simulated_device_ids"]

logger = logging.getLogger(__name__)


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


def _quiet_flower(verbose: bool) -> None:
    level = logging.INFO if verbose else logging.ERROR
    logging.getLogger("flwr").setLevel(level)
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")


def _settled_run(runs: TrainingRuns, run_id: str, seconds: float = 10.0) -> dict[str, Any]:
    """The run's record once the ServerApp has finished it (it may still be giving up when the engine ended)."""
    deadline = time.monotonic() + seconds
    doc = runs.run(run_id)
    while doc["status"] == "running" and time.monotonic() < deadline:
        time.sleep(0.2)
        doc = runs.run(run_id)
    return doc


def _simulate(
    d: DataDir,
    plan: TrainPlan,
    ids: Sequence[str],
    on_round: Callable[[RoundProgress], None] | None,
    verbose: bool,
    source_for: SourceFor | None,
) -> tuple[str, str]:
    """One run in Flower's simulation engine, on a Ray node of its own (server/fl/ray_head.py says why it is not
    started in this process): the run's id, and what the engine raised ("" when nothing)."""
    import ray
    from flwr.simulation import run_simulation

    from server.fl.client_app import build_client_app
    from server.fl.ray_head import RayHeadError, ray_head
    from server.fl.server_app import build_server_app, consenting_devices

    run_id = f"run-{uuid.uuid4().hex[:12]}"
    # One CPU per virtual client: as many clients train at once as this machine has cores.
    backend_config: Any = {"client_resources": {"num_cpus": 1, "num_gpus": 0.0}}
    engine_stopped = threading.Event()
    server_app = build_server_app(d.root, plan, run_id, "simulation", on_round, engine_stopped)
    # Simulated devices are the coordinator's own: a lab plan's exact drift reference is theirs to allow, and
    # each consents to training as the coordinator's record of its device says (server_app.consenting_devices).
    with d.store() as store:
        consenting = consenting_devices(store, ids, d.policy().require_consent)
    client_app = build_client_app(
        tuple(ids), d.root / "fl-devices", source_for, plan.exact_reference, consenting=consenting
    )
    failure = ""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # run_simulation is deprecated in favour of `flwr run`
        try:
            with ray_head(os.cpu_count() or 1, verbose) as address:
                # Flower finds Ray initialised and runs its clients on this node.
                ray.init(
                    address=address,
                    runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(sys.path)}},
                    logging_level=logging.INFO if verbose else logging.ERROR,
                    log_to_driver=verbose,
                )
                try:
                    run_simulation(
                        server_app=server_app,
                        client_app=client_app,
                        num_supernodes=plan.clients,
                        backend_config=backend_config,
                        verbose_logging=verbose,
                    )
                finally:
                    ray.shutdown()  # this driver only (Flower's own shutdown may have done it); the node stops next
        except RayHeadError as e:
            failure = str(e)
        except Exception as e:  # the ServerApp recorded what failed; keep the message for the outcome
            failure = f"{type(e).__name__}: {e}"
        finally:
            engine_stopped.set()  # a ServerApp thread still waiting for clients gives up now
    return run_id, failure


def run_training(
    data_dir: Path,
    plan: TrainPlan,
    device_ids: Sequence[str] | None = None,
    on_round: Callable[[RoundProgress], None] | None = None,
    verbose: bool = False,
    source_for: SourceFor | None = None,
) -> TrainOutcome:
    """Run `plan` on `plan.clients` virtual clients, device i named device_ids[i] (default sim-000...).

    Simulated devices keep their own privacy records under DATA/fl-devices/<device>/privacy.json.
    """
    from server.fl.registry import TrainingRuns

    d = DataDir(data_dir).require()
    ids = list(device_ids) if device_ids is not None else simulated_device_ids(plan.clients)
    if len(ids) != plan.clients or len(set(ids)) != len(ids):
        raise CoordinatorError(f"{plan.clients} clients need {plan.clients} distinct device ids (got {len(ids)})")
    _quiet_flower(verbose)
    with d.store() as store:
        runs = TrainingRuns(store)
        for attempt in (1, 2):
            run_id, failure = _simulate(d, plan, ids, on_round, verbose, source_for)
            try:
                doc = _settled_run(runs, run_id)
            except CoordinatorError:
                raise CoordinatorError(
                    f"the training run never started: {failure or 'the simulation ended early'}"
                ) from None
            if attempt == 2 or doc["error"] != ENGINE_STOPPED or runs.rounds(run_id):
                break
            # The engine failed before a single round was done (its Ray node stopped under it, say). Once more,
            # as a new run on a new node (the failed one stays recorded as failed). Devices that trained already
            # counted their privacy spending in their own accountants.
            logger.warning(
                "training run %s: the engine failed before any round (%s); trying once more", run_id, failure
            )
        return TrainOutcome(
            run_id,
            doc["status"],
            doc["model_version"],
            doc["error"] or failure,
            runs.rounds(run_id),
            runs.incidents(run_id),
        )
