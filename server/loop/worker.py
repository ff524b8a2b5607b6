"""A retrain job's worker: `python -m server.loop.worker --data-dir DATA JOB`, started by the coordinator.

It trains (Flower + Opacus) and releases (litert-torch export, parity check, policy, signing), recording each step
before the next, under an exclusive lock on DATA/loop/job-N.lock that tells the coordinator it is alive (see
server.loop.retrain). Run twice, the second exits at once; run for a `trained` job, it only releases.
"""

from __future__ import annotations

import argparse
import fcntl
import importlib
import logging
import os
import sys
from pathlib import Path
from typing import Any

from server import audit
from server.datadir import DataDir
from server.errors import CoordinatorError, NotFoundError
from server.loop.alerts import Alerts
from server.loop.retrain import ACTOR, JobState, fail_job, job_lock_path
from server.policy import Policy
from server.store import Store
from server.store.loop import JobRecords

__all__ = ["main", "run_job"]

logger = logging.getLogger("server.loop.worker")


def _parent_version(store: Store, release_id: str) -> str:
    """The registered model version a release was made from ("" for a release from a file)."""
    card = store.release(release_id).custom.get("model_card") or {}
    version = (card.get("model") or {}).get("version", "")
    return str(version) if version else ""


def _source_for(d: DataDir, policy: Policy) -> Any:
    """The policy's data source factory ("module:callable", given the data directory), or None: digits shares."""
    if not policy.retrain_data_source:
        return None
    module, _, name = policy.retrain_data_source.partition(":")
    try:
        factory = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise CoordinatorError(f"retrain.data_source {policy.retrain_data_source!r} cannot be loaded: {e}") from e
    return factory(d)


def _train(d: DataDir, store: Store, policy: Policy, job: dict[str, Any]) -> tuple[str, str, str]:
    """(run id, model version, error) of the job's training run."""
    from server.fl.plan import TrainPlan
    from server.fl.training import run_training

    parent = _parent_version(store, job["from_release"])
    ids = store.device_ids(job["fleet"])
    plan = TrainPlan(
        rounds=policy.retrain_rounds,
        clients=len(ids),
        target_epsilon=policy.retrain_target_epsilon,
        noise_multiplier=None,
        seed=int(job["id"]),
        model_name=parent.split("@")[0] if parent else "digits",
        parent=parent,
        cause=job["cause"],
        round_timeout=240.0,
    )
    outcome = run_training(d.root, plan, device_ids=ids, source_for=_source_for(d, policy))
    if outcome.status != "completed":
        return outcome.run_id, "", outcome.error or f"the run ended {outcome.status}"
    return outcome.run_id, outcome.model_version, ""


def _release(d: DataDir, store: Store, model_version: str) -> str:
    """Release the model version once: an existing release of it is the answer (a worker killed after publishing)."""
    from server.fl.export import release_model_version
    from server.fl.registry import Registry

    m = Registry(store).get(model_version)
    release_id = f"{m.name}@{m.seq}"
    try:
        store.release(release_id)
        return release_id
    except NotFoundError:
        pass
    report = release_model_version(d, model_version, actor=ACTOR)
    return report.release.release.id


def run_job(d: DataDir, job_id: int) -> str:
    """Do what the job's state asks (train, release); returns the state it ends in."""
    lock_path = job_lock_path(d, job_id)
    lock_path.parent.mkdir(mode=0o700, exist_ok=True)
    with lock_path.open("a+b") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logger.info("retrain job %d: another worker holds it", job_id)
            return "busy"
        lock.truncate(0)
        lock.write(str(os.getpid()).encode())
        lock.flush()
        store = d.store()
        try:
            return _run_locked(d, store, job_id)
        finally:
            store.close()


def _run_locked(d: DataDir, store: Store, job_id: int) -> str:
    policy = d.policy()
    alerts = Alerts(store, policy.webhooks)
    jobs = JobRecords(store)
    job = jobs.get(job_id)
    if job["state"] == JobState.APPROVED:
        with store.transaction():
            jobs.update(job_id, JobState.APPROVED, state=str(JobState.TRAINING))
            audit.append(store, "retrain.training", job["fleet"], {"job": job_id, "cause": job["cause"]}, ACTOR)
        try:
            run_id, version, error = _train(d, store, policy, job)
        except Exception as e:
            logger.exception("retrain job %d: training failed", job_id)
            run_id, version, error = "", "", f"{type(e).__name__}: {e}"
        if error:
            fail_job(store, alerts, {**job, "run_id": run_id}, f"training run {run_id or '-'}: {error}")
            return str(JobState.FAILED)
        with store.transaction():
            jobs.update(job_id, JobState.TRAINING, state=str(JobState.TRAINED), run_id=run_id, model_version=version)
            detail = {"job": job_id, "run": run_id, "model_version": version, "cause": job["cause"]}
            audit.append(store, "retrain.trained", job["fleet"], detail, ACTOR)
        job = jobs.get(job_id)
    if job["state"] == JobState.TRAINED:
        try:
            release_id = _release(d, store, job["model_version"])
        except Exception as e:
            logger.exception("retrain job %d: release failed", job_id)
            fail_job(store, alerts, job, f"releasing {job['model_version']}: {type(e).__name__}: {e}")
            return str(JobState.FAILED)
        with store.transaction():
            jobs.update(job_id, JobState.TRAINED, state=str(JobState.RELEASED), release_id=release_id)
            detail = {
                "job": job_id,
                "model_version": job["model_version"],
                "release": release_id,
                "cause": job["cause"],
            }
            audit.append(store, "retrain.released", job["fleet"], detail, ACTOR)
    return str(jobs.get(job_id)["state"])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m server.loop.worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("job", type=int)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    state = run_job(DataDir(args.data_dir).require(), args.job)
    logger.info("retrain job %d: %s", args.job, state)
    return 0


if __name__ == "__main__":
    sys.exit(main())
