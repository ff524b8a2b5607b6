"""Publishing a TFLite model as a signed release: check it runs, describe it, sign it as a TUF target; and retiring
one: out of the update repository once no device or rollout needs it."""

from __future__ import annotations

import hashlib
import math
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.contract import LIMITS
from edge_agent.contract.arrays import encode_array
from edge_agent.contract.drift import DriftReference
from edge_agent.contract.schema import InputSchema
from edge_agent.errors import InterpreterError
from edge_agent.runtime import Model, load_model
from server import audit
from server.errors import ConflictError, NotFoundError, ReleaseError
from server.policy import Policy, PolicyViolation
from server.store import Release, Store, now_ms
from server.store.releases import ReleaseRecords
from server.trust.repository import Repository

__all__ = ["PublishResult", "RetireResult", "auto_probe", "publish_release", "release_source", "retire_release"]

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
_VERSION = re.compile(r"^[0-9A-Za-z][0-9A-Za-z.+_-]{0,63}$")
PROBE_INPUTS = 4


@dataclass(frozen=True)
class PublishResult:
    release: Release
    created: bool  # False: the same release already existed and nothing changed


def _schema(model: Model, reference: Any = None) -> dict[str, Any]:
    """The release's input and output schema. The input's valid range per feature (what agents check inputs
    against: edge_agent/contract/schema.py) is the drift reference's feature ranges — for a federated reference
    the public schema bounds, never the devices' data — and is left out without a reference that fits."""
    out = model.interpreter.get_output_details()[0]
    shape, dtype = tuple(model.input_shape), str(model.input_dtype)
    inputs: dict[str, Any] = {"shape": list(shape), "dtype": dtype}
    if reference:
        try:
            ranges = DriftReference.from_metadata(reference).feature_ranges
            inputs = InputSchema(shape, dtype, ranges[:, 0].copy(), ranges[:, 1].copy()).to_metadata()
        except ValueError:
            pass  # a reference of other features: no valid range to state (the policy sees the rest)
    return {
        "input": inputs,
        "output": {"shape": [int(d) for d in out["shape"]], "dtype": str(np.dtype(out["dtype"]))},
    }


def auto_probe(model: Model, sha256: str, count: int = PROBE_INPUTS) -> dict[str, Any]:
    """A probe set from inputs seeded by the model's hash and the outputs this interpreter gives for them.

    It proves on the device that the installed bytes load and compute what they computed here. A release
    made from training data carries held-out inputs instead (see `probe` in publish_release).
    """
    rng = np.random.default_rng(int(sha256[:16], 16))
    inputs = rng.random((count, *model.input_shape), dtype=np.float32)
    outputs = np.stack([model.predict(x) for x in inputs])
    return {"inputs": encode_array(inputs), "outputs": encode_array(outputs), "atol": "1e-4", "source": "auto"}


def _canonical(doc: Any) -> Any:
    """Signed metadata is canonical JSON, which has no floats: each float becomes its shortest decimal string
    (the policy has already read the numbers). Infinities and NaN are refused: they have no honest string."""
    if isinstance(doc, bool) or doc is None or isinstance(doc, int | str):
        return doc
    if isinstance(doc, float):
        if not math.isfinite(doc):
            raise ReleaseError(f"release metadata holds a non-finite number ({doc})")
        return repr(doc)
    if isinstance(doc, dict):
        return {str(k): _canonical(v) for k, v in doc.items()}
    if isinstance(doc, list | tuple):
        return [_canonical(v) for v in doc]
    raise ReleaseError(f"release metadata holds a {type(doc).__name__}, which JSON cannot carry")


def publish_release(
    repository: Repository,
    store: Store,
    data: bytes,
    name: str,
    version: str,
    probe: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    policy: Policy | None = None,
    actor: str = "cli",
) -> PublishResult:
    """Check, sign and publish. Repeating it with the same bytes changes nothing; other bytes are refused, and so
    is a release that breaks the policy (every broken rule named, the refusal audited)."""
    if not _NAME.match(name):
        raise ReleaseError(f"model name {name!r} must be 1-64 letters, digits, '_' or '-', starting alphanumeric")
    if not _VERSION.match(version):
        raise ReleaseError(f"version {version!r} must be 1-64 of letters, digits, '.', '+', '_', '-'")
    if not data:
        raise ReleaseError("the model file is empty")
    if len(data) > LIMITS.target_file:
        raise ReleaseError(f"the model is {len(data)} bytes; the limit is {LIMITS.target_file}")
    sha = hashlib.sha256(data).hexdigest()
    release_id = f"{name}@{version}"
    try:
        existing = store.release(release_id)
    except NotFoundError:
        pass
    else:
        if ReleaseRecords(store).retired(release_id) is not None:
            raise ConflictError(f"release {release_id} was retired; publish the model under a new version")
        if existing.sha256 == sha:
            return PublishResult(existing, created=False)
        raise ConflictError(f"release {release_id} exists with other bytes; publish a new version instead")

    with tempfile.NamedTemporaryFile(suffix=".tflite") as tmp:
        tmp.write(data)
        tmp.flush()
        try:
            model = load_model(Path(tmp.name))
        except InterpreterError as e:
            raise ReleaseError(f"not a loadable TFLite model: {e}") from e
        if probe is not None:
            try:
                model.run_probe(probe)
            except InterpreterError as e:
                raise ReleaseError(f"the model fails its own probe set: {e}") from e
        else:
            probe = auto_probe(model, sha)
        schema = _schema(model, (extra or {}).get("drift_reference"))

    custom: dict[str, Any] = {
        "model": {"name": name, "version": version},
        "schema": schema,
        "probe": probe,
        **(extra or {}),
    }
    rules = (policy or Policy()).release_violations(len(data), custom)
    if rules:
        audit.append(store, "policy.refused", release_id, {"what": "release", "rules": rules}, actor)
        raise PolicyViolation(f"release {release_id}", rules, (policy or Policy()).source)
    custom = _canonical(custom)
    target_path = f"{name}/{version}/model.tflite"
    info = repository.add_target(target_path, data, custom, delegate=True)
    release = Release(release_id, name, version, target_path, info.hashes["sha256"], info.length, custom, now_ms())
    with store.transaction():
        store.add_release(release)
        detail = {"target": target_path, "sha256": release.sha256, "length": release.length}
        audit.append(store, "release.publish", release_id, detail, actor)
    return PublishResult(release, created=True)


def release_source(custom: dict[str, Any]) -> dict[str, Any]:
    """Where a release came from, from its custom metadata: `trained`, a registered model version exported by
    `fedfleet release NAME@SEQ` (its card names the version and the export's parity report), or `file`, a .tflite
    file released as NAME@MAJOR.MINOR.PATCH."""
    card = custom.get("model_card")
    model = card.get("model") if isinstance(card, dict) else None
    version = model.get("version") if isinstance(model, dict) else None
    if isinstance(card, dict) and "export" in card and isinstance(version, str) and version:
        return {"kind": "trained", "model_version": version}
    return {"kind": "file", "model_version": None}


@dataclass(frozen=True)
class RetireResult:
    release: Release
    deleted: list[str]  # files taken out of the repository (role metadata, target bytes)


def retire_release(
    repository: Repository, store: Store, release_id: str, live_phases: tuple[str, ...], actor: str = "cli"
) -> RetireResult:
    """Take a release out of the update repository (targets and snapshot shrink, the bytes are deleted), mark it
    retired and audit it. Refused, changing nothing, while a device runs it or is assigned it, or while a live
    rollout (a phase in `live_phases`) rolls it out or could roll devices back to it."""
    release = store.release(release_id)  # NotFoundError: one sentence naming `releases list`
    records = ReleaseRecords(store)
    with store.transaction():  # the write lock: no assignment or rollout starts between the checks and the mark
        if records.retired(release_id) is not None:
            raise ConflictError(f"release {release_id} is already retired")
        blockers: list[str] = []
        running = records.devices_running(release_id)
        if running:
            blockers.append(f"device(s) {', '.join(running)} run it")
        assigned = [d for d in records.devices_assigned(release_id) if d not in running]
        if assigned:
            blockers.append(f"device(s) {', '.join(assigned)} are assigned it")
        blockers += [f"rollout {r} {why}" for r, why in records.rollouts_needing(release_id, live_phases)]
        if blockers:
            raise ConflictError(
                f"release {release_id} is still needed ({'; '.join(blockers)}); assign those devices another "
                "release or let the rollout end first"
            )
        deleted = repository.remove_target(release.target_path)
        records.mark_retired(release_id, now_ms(), actor)
        detail = {"target": release.target_path, "sha256": release.sha256, "deleted": [p.name for p in deleted]}
        audit.append(store, "release.retire", release_id, detail, actor)
    return RetireResult(release, [str(p) for p in deleted])
