"""What a drift alarm leads to: a retrain job that trains (Flower + Opacus), releases and rolls out, each step
recorded before the next begins, so a coordinator killed at any point resumes without a second training run or a
second release.

    proposed ─approve─► approved ─worker─► training ─► trained ─worker─► released ─tick─► rolling_out ─► completed
       └─reject─► rejected          any step that fails ─► failed (alert: training_failed; nothing released)

- `proposed` waits for a person (`fedfleet loop approve|reject ID`, or the dashboard) when retrain.on_drift is
  "review"; "retrain" creates the job `approved`.
- Training and release run in a worker process (`python -m server.loop.worker`), never in the coordinator's tick.
  The worker holds an exclusive lock on DATA/loop/job-N.lock while it runs; it survives the coordinator (its own
  session), and a restarted coordinator sees the lock held and waits. A job left `training` with its lock free
  lost its worker: it fails (a run that ended halfway leaves no model to release). A job `approved` or `trained`
  with no worker gets one: a `trained` job's worker only releases, and releasing the same model version twice
  gives the same release (never a second one).
- The coordinator starts the rollout of a `released` job (policy checks, default gates) and marks it
  `rolling_out` in one transaction; the rollout's end completes or fails the job.
- One retrain job per alarm (a UNIQUE column), and one job at a time per fleet.
"""

from __future__ import annotations

import fcntl
import logging
import os
import subprocess
import sys
from enum import StrEnum
from pathlib import Path
from typing import Any

from server import audit
from server.crashpoints import crash_point
from server.datadir import DataDir
from server.errors import ConflictError, CoordinatorError
from server.loop.alerts import Alerts
from server.loop.drift_watch import DriftReading
from server.loop.kinds import AlertKind
from server.policy import Policy
from server.rollout.driver import Rollouts
from server.rollout.engine import ACTIVE, Phase
from server.rollout.spec import RolloutSpec, load_spec
from server.store import Store
from server.store.loop import JobRecords

__all__ = ["ACTOR", "FINAL", "JobState", "RetrainController", "answer_proposal", "fail_job", "job_lock_path"]

logger = logging.getLogger(__name__)

ACTOR = "coordinator"


class JobState(StrEnum):
    PROPOSED = "proposed"
    REJECTED = "rejected"
    APPROVED = "approved"
    TRAINING = "training"
    TRAINED = "trained"
    RELEASED = "released"
    ROLLING_OUT = "rolling_out"
    COMPLETED = "completed"
    FAILED = "failed"


FINAL = frozenset({JobState.REJECTED, JobState.COMPLETED, JobState.FAILED})
# The audit action that records what the policy's retrain.on_drift made of a new alarm.
_DECISION_AUDIT = {"alert": "retrain.not-decided", "review": "retrain.proposed", "retrain": "retrain.decided"}
_WORKER_STATES = (JobState.APPROVED, JobState.TRAINING, JobState.TRAINED)


def job_lock_path(d: DataDir, job_id: int) -> Path:
    return d.root / "loop" / f"job-{job_id}.lock"


def _proposal_key(job_id: int) -> str:
    return f"retrain:{job_id}:proposed"


def fail_job(store: Store, alerts: Alerts, job: dict[str, Any], error: str) -> bool:
    """Fail a job that is not final yet: its state, an audit entry and a training_failed alert, together."""
    with store.transaction():
        if not JobRecords(store).update(
            job["id"], tuple(s for s in JobState if s not in FINAL), state="failed", error=error
        ):
            return False
        audit.append(store, "retrain.failed", job["fleet"], {"job": job["id"], "error": error}, ACTOR)
        alerts.raise_alert(
            AlertKind.TRAINING_FAILED,
            job["fleet"],
            f"retrain:{job['id']}:failed",
            f"retrain job {job['id']} ({job['cause']}) failed: {error}",
            {"job": job["id"], "error": error},
        )
        alerts.resolve(_proposal_key(job["id"]), "the job failed")
    logger.error("retrain job %d failed: %s", job["id"], error)
    return True


def answer_proposal(store: Store, alerts: Alerts, job_id: int, approve: bool, actor: str) -> dict[str, Any]:
    """A person's answer to a proposed retraining: approved (a worker trains at the next tick) or rejected."""
    jobs = JobRecords(store)
    with store.transaction():
        job = jobs.get(job_id)
        state = JobState.APPROVED if approve else JobState.REJECTED
        if not jobs.update(job_id, JobState.PROPOSED, state=str(state), decided_by=actor):
            raise ConflictError(f"retrain job {job_id} is {job['state']}, not proposed: there is nothing to decide")
        audit.append(store, f"retrain.{state}", job["fleet"], {"job": job_id, "cause": job["cause"]}, actor)
        alerts.resolve(_proposal_key(job_id), f"{state} by {actor}")
    return jobs.get(job_id)


class RetrainController:
    """Retrain jobs over one store (the coordinator's rollout thread's), started and followed by `tick`."""

    def __init__(self, datadir: DataDir, store: Store, alerts: Alerts, rollouts: Rollouts, policy: Policy) -> None:
        self.datadir = datadir
        self.store = store
        self.alerts = alerts
        self.rollouts = rollouts
        self.policy = policy
        self.jobs = JobRecords(store)
        self._workers: dict[int, subprocess.Popen[bytes]] = {}

    # ----- deciding (inside the transaction that opens the alarm) -----

    def decide(self, alarm_id: int, reading: DriftReading) -> str:
        """What the policy makes of a new alarm; records the job it creates and says the decision."""
        action = self.policy.retrain_on_drift
        cause = f"retrained because {reading.describe()}, alarm {alarm_id}"
        busy = [j for j in self.jobs.in_states(*(s for s in JobState if s not in FINAL)) if j["fleet"] == reading.fleet]
        if action == "alert":
            decision = "alert only (retrain.on_drift = 'alert')"
        elif busy:
            decision = f"no new retraining: job {busy[0]['id']} for fleet {reading.fleet} is still {busy[0]['state']}"
        else:
            state = JobState.PROPOSED if action == "review" else JobState.APPROVED
            job_id = self.jobs.create(
                alarm_id, reading.fleet, reading.release_id, cause, self.policy.retrain_engine, state
            )
            if state is JobState.PROPOSED:
                decision = f"retrain proposed as job {job_id}; waiting for `fedfleet loop approve {job_id}`"
                self.alerts.raise_alert(
                    AlertKind.RETRAIN_PROPOSED,
                    reading.fleet,
                    _proposal_key(job_id),
                    f"retrain job {job_id} waits for approval: {cause}",
                    {"job": job_id, "alarm": alarm_id},
                )
            else:
                decision = f"retrain started as job {job_id}"
        action_name = _DECISION_AUDIT[action]

        audit.append(
            self.store, action_name, reading.fleet, {"alarm": alarm_id, "decision": decision, "cause": cause}, ACTOR
        )
        return decision

    # ----- driving -----

    def running_workers(self) -> dict[int, int]:
        """Job id → pid of the workers this coordinator started that still run (finished ones are reaped)."""
        for job_id, proc in list(self._workers.items()):
            if proc.poll() is not None:
                del self._workers[job_id]
        return {job_id: proc.pid for job_id, proc in self._workers.items()}

    def tick(self) -> None:
        self.running_workers()
        for job in self.jobs.in_states(*_WORKER_STATES):
            if self._worker_alive(job["id"]):
                if job["state"] == JobState.TRAINING:
                    crash_point("loop.training:running")
                continue
            if job["state"] == JobState.TRAINING:
                fail_job(self.store, self.alerts, job, "the training process ended before it recorded a model")
            else:
                self._spawn(job["id"])
        for job in self.jobs.in_states(JobState.RELEASED):
            crash_point("loop.rollout:before-start")
            self._start_rollout(job)
        for job in self.jobs.in_states(JobState.ROLLING_OUT):
            self._follow_rollout(job)

    def _worker_alive(self, job_id: int) -> bool:
        proc = self._workers.get(job_id)
        if proc is not None and proc.poll() is None:
            return True  # ours, maybe not holding its lock yet
        self._workers.pop(job_id, None)
        path = job_lock_path(self.datadir, job_id)
        if not path.exists():
            return False
        with path.open("rb") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True  # a worker (perhaps from before a coordinator restart) holds it
            fcntl.flock(f, fcntl.LOCK_UN)
        return False

    def _spawn(self, job_id: int) -> None:
        (self.datadir.root / "loop").mkdir(mode=0o700, exist_ok=True)
        log = (self.datadir.root / "loop" / f"job-{job_id}.log").open("ab")
        env = {k: v for k, v in os.environ.items() if k != "FEDFLEET_CRASH_AT"}
        proc = subprocess.Popen(
            [sys.executable, "-m", "server.loop.worker", "--data-dir", str(self.datadir.root), str(job_id)],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # a coordinator killed mid-training does not take the run with it
            env=env,
        )
        log.close()
        self._workers[job_id] = proc
        logger.info("retrain job %d: worker process %d started", job_id, proc.pid)

    def _rollout_spec(self, job: dict[str, Any]) -> RolloutSpec:
        overrides = {"release": job["release_id"], "fleet": job["fleet"]}
        if self.policy.retrain_rollout_spec:
            return load_spec(self.datadir.root / self.policy.retrain_rollout_spec, **overrides)
        return RolloutSpec(job["release_id"], job["fleet"], canary=max(1, self.policy.min_canary))

    def _start_rollout(self, job: dict[str, Any]) -> None:
        try:
            with self.store.transaction():
                rollout_id = self.rollouts.start(self._rollout_spec(job), actor=ACTOR)
                self.jobs.update(job["id"], JobState.RELEASED, state=str(JobState.ROLLING_OUT), rollout_id=rollout_id)
                detail = {"job": job["id"], "release": job["release_id"], "rollout": rollout_id, "cause": job["cause"]}
                audit.append(self.store, "retrain.rollout", job["fleet"], detail, ACTOR)
        except CoordinatorError as e:
            fail_job(self.store, self.alerts, job, f"the rollout of {job['release_id']} could not start: {e}")
            return
        logger.info("retrain job %d: rolling out %s as %s", job["id"], job["release_id"], rollout_id)

    def _follow_rollout(self, job: dict[str, Any]) -> None:
        phase = self.rollouts.phase(job["rollout_id"])
        if phase in ACTIVE:
            return
        if phase is Phase.COMPLETED:
            with self.store.transaction():
                if self.jobs.update(job["id"], JobState.ROLLING_OUT, state=str(JobState.COMPLETED)):
                    detail = {"job": job["id"], "release": job["release_id"], "rollout": job["rollout_id"]}
                    audit.append(self.store, "retrain.completed", job["fleet"], detail, ACTOR)
            logger.info("retrain job %d completed: %s runs on fleet %s", job["id"], job["release_id"], job["fleet"])
        else:
            fail_job(self.store, self.alerts, job, f"rollout {job['rollout_id']} of {job['release_id']} ended {phase}")
