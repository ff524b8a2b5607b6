"""Pure parts: encoded arrays, agent config validation, topics, store migrations, TUF expiry renewal."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from tuf.api.metadata import Metadata, Targets

from edge_agent.config import config_from_dict
from edge_agent.contract import Topics, device_id_is_valid
from edge_agent.contract.arrays import decode_array, encode_array
from edge_agent.contract.mqtt_session import raise_lost_cancel
from edge_agent.errors import ConfigError
from server.datadir import DataDir
from server.errors import ConflictError, DataDirError
from server.store import SCHEMA_VERSION, Store
from server.trust.repository import release_role


@settings(max_examples=200, deadline=None)
@given(
    hnp.arrays(
        st.sampled_from([np.float32, np.float64, np.int32, np.int64, np.uint8, np.int8]),
        hnp.array_shapes(min_dims=0, max_dims=3, max_side=6),
    )
)
def test_encoded_arrays_round_trip_exactly(a: np.ndarray) -> None:
    doc = encode_array(a)
    json.dumps(doc)  # plain JSON, no floats: TUF canonical JSON can sign it
    back = decode_array(doc)
    assert back.dtype == a.dtype and back.shape == a.shape
    assert np.array_equal(back, a, equal_nan=a.dtype.kind == "f")


@pytest.mark.parametrize(
    "doc",
    [
        None,
        {},
        {"dtype": "float32", "shape": [2], "b64": "!!!"},
        {"dtype": "complex64", "shape": [1], "b64": ""},
        {"dtype": "float32", "shape": [3], "b64": "AAAA"},
        {"dtype": "float32", "shape": [-1], "b64": ""},
        {"dtype": "float32", "shape": [10**9], "b64": ""},
    ],
)
def test_malformed_encoded_arrays_are_refused(doc: object) -> None:
    with pytest.raises(ValueError):
        decode_array(doc)


def test_topics_and_ids() -> None:
    t = Topics("fedfleet/v1")
    assert t.device_of(t.status("pi-1"), "status") == "pi-1"
    assert t.device_of(t.events("pi-1"), "status") is None
    assert t.device_of("fedfleet/v1/devices/a/b/status", "status") is None
    assert t.device_of("other/v1/devices/pi-1/status", "status") is None
    assert not device_id_is_valid("") and not device_id_is_valid("a/b") and not device_id_is_valid("+")
    assert not device_id_is_valid(".hidden") and not device_id_is_valid("x" * 129) and device_id_is_valid("pi_1.a-b")


def _config(tmp_path: Path, **changes: object) -> dict[str, object]:
    (tmp_path / "keys.json").write_text("{}")
    base: dict[str, object] = {
        "device_id": "pi-1",
        "state_dir": "s",
        "grpc_target": "127.0.0.1:1",
        "mqtt_url": "mqtt://127.0.0.1:1",
        "trust_root": "root.json",
        "director_keys": "keys.json",
    }
    return {**base, **changes}


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"device_id": "a/b"}, "device_id"),
        ({"mqtt_url": "http://x"}, "mqtt_url"),
        ({"interpreter": "onnx"}, "interpreter"),
        ({"debug_pause_at": "nowhere"}, "debug_pause_at"),
        ({"labels": "x"}, "labels"),
        ({"director_keys": "missing.json"}, "director keys"),
        ({"allow_plaintext": "yes"}, "allow_plaintext"),
        ({"outbox_cap": 10**6}, "outbox_cap must be between"),
    ],
)
def test_bad_agent_config_is_refused(tmp_path: Path, changes: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict(_config(tmp_path, **changes), tmp_path)
    missing = _config(tmp_path)
    del missing["grpc_target"]
    with pytest.raises(ConfigError, match="grpc_target"):
        config_from_dict(missing, tmp_path)


def test_agent_refuses_plaintext_beyond_loopback_unless_a_lab_allows_it(tmp_path: Path) -> None:
    for changes in ({"grpc_target": "coordinator.lan:50051"}, {"mqtt_url": "mqtt://10.0.0.2:1883"}):
        with pytest.raises(ConfigError, match=r"plaintext beyond this machine.*allow_plaintext = true"):
            config_from_dict(_config(tmp_path, **changes), tmp_path)
        allowed = config_from_dict(_config(tmp_path, allow_plaintext=True, **changes), tmp_path)
        assert allowed.allow_plaintext
    for name in ("ca.pem", "d.pem", "d-key.pem"):
        (tmp_path / name).write_text("x")
    tls = {"tls_ca": "ca.pem", "tls_cert": "d.pem", "tls_key": "d-key.pem", "grpc_tls": True}
    secure = config_from_dict(
        _config(tmp_path, grpc_target="coordinator.lan:50051", mqtt_url="mqtts://coordinator.lan:8883", **tls),
        tmp_path,
    )
    assert secure.grpc_tls and secure.mqtt_tls and not secure.allow_plaintext
    assert config_from_dict(_config(tmp_path), tmp_path).grpc_target == "127.0.0.1:1"  # loopback: plaintext is fine


def test_store_migrates_once_and_refuses_a_newer_schema(tmp_path: Path) -> None:
    store = Store(tmp_path / "f.db")
    assert store.schema_version() == SCHEMA_VERSION and store.migrate() == 0
    assert store.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    store.close()
    conn = sqlite3.connect(tmp_path / "f.db")
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(DataDirError, match="newer than this fedfleet"):
        Store(tmp_path / "f.db")


def test_online_roles_are_re_signed_before_they_expire(datadir: DataDir) -> None:
    repo = datadir.repository()
    meta = datadir.repository_dir / "metadata"
    assert repo.refresh_expiring() == []  # all fresh
    ts_version = repo.timestamp_version()
    later = datetime.now(UTC) + timedelta(hours=13)  # past half of the timestamp's one day
    assert repo.refresh_expiring(now=later) == ["timestamp"]
    ts = Metadata.from_file(str(meta / "timestamp.json"))
    assert ts.signed.version == ts_version + 1
    much_later = datetime.now(UTC) + timedelta(days=50)
    assert repo.refresh_expiring(now=much_later) == ["targets", "snapshot", "timestamp"]


def test_release_roles_are_re_signed_before_they_expire(datadir: DataDir) -> None:
    repo = datadir.repository()
    repo.add_target("digits/1.0.0/model.tflite", b"model", {"model": "digits"}, delegate=True)
    role = release_role("digits/1.0.0/model.tflite")
    meta = datadir.repository_dir / "metadata"
    assert (meta / f"1.{role}.json").is_file()
    assert repo.refresh_expiring(now=datetime.now(UTC) + timedelta(days=30)) == ["snapshot", "timestamp"]
    assert not (meta / f"2.{role}.json").exists()  # 60 of 90 days left
    renewed = repo.refresh_expiring(now=datetime.now(UTC) + timedelta(days=50))
    assert renewed == ["targets", "1 release role(s)", "snapshot", "timestamp"]
    again: Metadata[Targets] = Metadata.from_file(str(meta / f"2.{role}.json"))
    assert again.signed.expires > datetime.now(UTC) + timedelta(days=89)
    snapshot = max(meta.glob("*.snapshot.json"), key=lambda p: int(p.name.split(".")[0]))
    assert Metadata.from_file(str(snapshot)).signed.meta[f"{role}.json"].version == 2


def test_a_release_published_before_release_roles_stays_in_the_top_level_role(datadir: DataDir) -> None:
    repo = datadir.repository()
    old = repo.add_target("digits/0.9.0/model.tflite", b"old", {"model": "digits"})  # the layout before roles
    assert repo.add_target("digits/0.9.0/model.tflite", b"old", {"model": "digits"}, delegate=True) == old
    meta = datadir.repository_dir / "metadata"
    assert not list(meta.glob("*.r-*.json"))
    with pytest.raises(ConflictError):
        repo.add_target("digits/0.9.0/model.tflite", b"other bytes", {"model": "digits"}, delegate=True)
    repo.add_target("digits/1.0.0/model.tflite", b"new", {"model": "digits"}, delegate=True)
    with pytest.raises(ConflictError):  # a path taken in a release role is refused the same way
        repo.add_target("digits/1.0.0/model.tflite", b"other bytes", {"model": "digits"}, delegate=True)


def test_a_cancel_that_meets_a_result_still_stops_the_task() -> None:
    """aiomqtt awaits each PUBACK through asyncio.wait_for, which on Python 3.11 drops a cancellation arriving in
    the same loop turn as the result: a stopping agent's event sender then ran on and used its closed gRPC channel.
    The agent calls raise_lost_cancel after such awaits."""

    async def scenario(guarded: bool) -> bool:
        """Whether the task went on running after being cancelled."""
        puback: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        ran_on = asyncio.Event()

        async def sender() -> None:
            await asyncio.wait_for(puback, 10)
            if guarded:
                raise_lost_cancel()
            ran_on.set()
            await asyncio.sleep(3600)

        task = asyncio.create_task(sender())
        await asyncio.sleep(0)  # the sender now waits for its PUBACK
        puback.set_result(None)
        task.cancel()  # the stop, in the same loop turn
        with contextlib.suppress(asyncio.CancelledError, TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), 1.0)
        went_on = ran_on.is_set()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return went_on

    assert asyncio.run(scenario(guarded=True)) is False
    if sys.version_info < (3, 12):  # the race this guards against; later Pythons keep the cancel themselves
        assert asyncio.run(scenario(guarded=False)) is True
