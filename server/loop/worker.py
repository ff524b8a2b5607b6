"""A retrain job's worker: `python -m server.loop.worker --data-dir DATA JOB`, started by the coordinator.

It trains (Flower + Opacus) and releases (litert-torch export, parity check, policy, signing), recording each step
before the next, under an exclusive lock on DATA/loop/job-N.lock that tells the coordinator it is alive (see
server.loop.retrain). Run twice, the second exits at once; run for a `trained` job, it only releases.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import subprocess
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

__all__ = ["main", "run_job", "superlink_connection", "train_on_superlink"]

logger = logging.getLogger("server.loop.worker")


def _parent_version(store: Store, release_id: str) -> str:
    """The registered model version a release was made from ("" for a release from a file)."""
    card = store.release(release_id).custom.get("model_card") or {}
    version = (card.get("model") or {}).get("version", "")
    return str(version) if version else ""


def _source_for(policy: Policy) -> str | None:
    """The policy's data source factory ("module:callable", given the data directory), checked here so that one
    that cannot load fails the job before any engine starts; None: each device's digits share. The simulated
    devices load it themselves, in Flower's processes."""
    if not policy.retrain_data_source:
        return None
    from server.fl.client_app import source_factory

    try:
        source_factory(policy.retrain_data_source)
    except CoordinatorError as e:
        why = e.__cause__ or e
        raise CoordinatorError(f"retrain.data_source {policy.retrain_data_source!r} cannot be loaded: {why}") from e
    return policy.retrain_data_source


def _train(d: DataDir, store: Store, policy: Policy, job: dict[str, Any]) -> tuple[str, str, str]:
    """(run id, model version, error) of the job's training run."""
    from server.fl.plan import TrainPlan
    from server.fl.training import run_training

    parent = _parent_version(store, job["from_release"])
    ids = store.device_ids(job["fleet"])
    plan = TrainPlan(
        rounds=policy.retrain_rounds,
        clients=policy.retrain_clients or len(ids),
        target_epsilon=policy.retrain_target_epsilon,
        noise_multiplier=None,
        seed=int(job["id"]),
        model_name=parent.split("@")[0] if parent else "digits",
        parent=parent,
        cause=job["cause"],
        round_timeout=240.0,
        exact_reference=policy.retrain_exact_reference,
    )
    if job["engine"] == "deployment":
        return train_on_superlink(d, store, policy, plan.to_dict())
    outcome = run_training(d.root, plan, device_ids=ids, source_for=_source_for(policy))
    if outcome.status != "completed":
        return outcome.run_id, "", outcome.error or f"the run ended {outcome.status}"
    return outcome.run_id, outcome.model_version, ""


# The Flower App that `flwr run` submits: the installed fedfleet's ServerApp and ClientApp (as deploy/flower-app).
_FLOWER_APP = """[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "fedfleet-training"
version = "0.1.0"
dependencies = ["fedfleet[server]"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "fedfleet"

[tool.flwr.app.components]
serverapp = "server.fl.server_app:app"
clientapp = "server.fl.client_app:app"

[tool.flwr.app.config]
data-dir = ""
plan = "{}"
"""


def superlink_connection(d: DataDir, policy: Policy) -> str:
    """The [superlink.fedfleet] table `flwr` reads: the policy's address, verified with its root certificates (a
    path, relative to the data directory, e.g. flower/ca.pem from `fedfleet flower credentials`), or plaintext,
    which the policy allows only on loopback."""
    link = f"address = {json.dumps(policy.retrain_superlink)}\n"
    if not policy.retrain_superlink_root_certificates:
        return link + "insecure = true\n"
    path = Path(policy.retrain_superlink_root_certificates)
    path = (path if path.is_absolute() else d.root / path).resolve()
    if not path.is_file():
        raise CoordinatorError(
            f"retrain.superlink_root_certificates {path} is not a file: give the fleet CA bundle the SuperLink's "
            "certificate chains to (`fedfleet flower credentials` writes DATA/flower/ca.pem)"
        )
    return link + f"root-certificates = {json.dumps(str(path))}\n"


def train_on_superlink(d: DataDir, store: Store, policy: Policy, plan: dict[str, Any]) -> tuple[str, str, str]:
    """Submit the run to the policy's SuperLink with `flwr run` and wait for it; the devices' SuperNodes train.
    The ServerApp records the run in this data directory, where it is found again by its plan."""
    from server.fl.registry import TrainingRuns

    home = d.root / "loop" / "flwr"
    try:
        link = superlink_connection(d, policy)
    except CoordinatorError as e:
        return "", "", str(e)
    (home / "app").mkdir(mode=0o700, parents=True, exist_ok=True)
    (home / "app" / "pyproject.toml").write_text(_FLOWER_APP)
    (home / "config.toml").write_text(f'[superlink]\ndefault = "fedfleet"\n\n[superlink.fedfleet]\n{link}')
    flwr = Path(sys.executable).parent / "flwr"
    config = f"data-dir='{d.root}' plan='{json.dumps(plan)}'"
    timeout = 120 + plan["rounds"] * plan["round_timeout"]
    logger.info("submitting the run to the SuperLink at %s", policy.retrain_superlink)
    try:
        done = subprocess.run(
            [str(flwr), "run", str(home / "app"), "fedfleet", "--stream", "--run-config", config],
            env={**os.environ, "FLWR_HOME": str(home)},
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return "", "", f"the run on the SuperLink did not end within {timeout:.0f} s"
    sys.stdout.write(done.stdout[-20_000:])
    runs = TrainingRuns(store)
    mine = [r for r in reversed(runs.list()) if runs.run(r["id"])["plan"] == plan]
    if not mine:
        tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
        return "", "", f"`flwr run` exited {done.returncode} and no run was recorded: {' / '.join(tail)}"
    run = runs.run(mine[0]["id"])
    if run["status"] != "completed":
        return run["id"], "", run["error"] or f"the run ended {run['status']}"
    return run["id"], run["model_version"], ""


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
