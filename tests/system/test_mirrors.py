"""Static mirrors: `fedfleet mirror sync` writes the TUF repository for nginx to serve over HTTPS (a certificate
from the fleet CA), and the agent's update takes metadata and targets there, falling back to the next mirror and
finally the coordinator's gRPC when a mirror serves nothing, stale or tampered metadata, or bad bytes.

The agent's real update function runs against the real FleetService on a free port (a subclass that counts
what it serves) and a real nginx; the mirror's files are edited on disk as whoever controls the mirror would.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import socket
import sys
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pytest
from tuf.api.exceptions import DownloadHTTPError

from edge_agent.assignment import load_director_keys
from edge_agent.config import config_from_dict
from edge_agent.contract._proto.fedfleet.v1 import fleet_pb2 as pb
from edge_agent.contract.reasons import Reason
from edge_agent.errors import ConfigError
from edge_agent.state import StateStore
from edge_agent.transport import GrpcTransport
from edge_agent.tuf_client import MirrorFetcher
from edge_agent.updater import Outcome, UpdateContext, UpdateResult, apply_assignment
from server.datadir import DataDir
from server.ingest.grpc_service import FleetService
from server.trust.mirror import MirrorError, sync_mirror
from server.trust.releases import publish_release
from simulations.dense_tflite import build_dense_model, random_dense_layers
from simulations.processes import run_bounded
from tests.nginx import Nginx, mirror_nginx
from tests.support import GrpcServerThread, fedfleet

DEVICE = "dev-1"


class CountingService(FleetService):
    """The real FleetService, counting the files it serves (class-level: the test reads it from its thread)."""

    served: ClassVar[Counter[str]] = Counter()

    async def FetchTarget(self, request: pb.FetchRequest, context: Any) -> AsyncIterator[pb.Chunk]:
        CountingService.served["target"] += 1
        async for chunk in super().FetchTarget(request, context):
            yield chunk

    async def FetchMetadata(self, request: pb.FetchRequest, context: Any) -> AsyncIterator[pb.Chunk]:
        CountingService.served["metadata"] += 1
        async for chunk in super().FetchMetadata(request, context):
            yield chunk

    async def FetchMetadataBundle(
        self, request: pb.MetadataBundleRequest, context: Any
    ) -> AsyncIterator[pb.MetadataPart]:
        CountingService.served["bundle"] += 1
        async for part in super().FetchMetadataBundle(request, context):
            yield part


@dataclass
class Env:
    d: DataDir
    ctx: UpdateContext
    events: list[pb.UpdateEvent]
    nginx: Nginx
    mirrors: Path  # nginx's root: one mirror per subdirectory
    sha: dict[str, str]

    def assign(self, version: str) -> bytes:
        with self.d.store() as store:
            self.d.director().assign(store, [DEVICE], store.release(f"digits@{version}"))
            row = store.current_assignment(DEVICE)
        assert row is not None
        signed: bytes = row["signed"]
        return signed

    def update(self, version: str, *mirrors: str) -> UpdateResult:
        """Apply an assignment to `version` with these mirrors (names under nginx's root, or URLs) in order."""
        self.ctx.mirrors = tuple(m if "://" in m else f"{self.nginx.url}{m}/" for m in mirrors)
        self.events.clear()
        return apply_assignment(self.assign(version), self.ctx)

    def sync(self, name: str) -> Path:
        dest = self.mirrors / name
        sync_mirror(self.d.repository(), dest)
        return dest

    def active_sha(self) -> str:
        state = self.ctx.store.load()
        assert state.active is not None
        return hashlib.sha256(self.ctx.store.model_path(state.active).read_bytes()).hexdigest()

    def mirror_failures(self) -> list[tuple[str, str]]:
        """(reason, detail) of each source the update gave up on."""
        return [(e.reason, e.detail) for e in self.events if e.kind == pb.EVENT_KIND_FAILED]

    def target_name(self, version: str) -> str:
        return f"targets/digits/{version}/{self.sha[version]}.model.tflite"


def _big_model(seed: int) -> bytes:
    """A real TFLite model of about 300 KB: big enough to cut a download of it half way."""
    return build_dense_model(random_dense_layers([64, 1024, 10], seed))


@pytest.fixture
def env(datadir: DataDir, model_bytes: dict[str, bytes], tmp_path: Path) -> Iterator[Env]:
    """Releases 1.0.0, 2.0.0 and a 300 KB 3.0.0; the device runs 1.0.0 (installed through the coordinator);
    nginx serves tmp/mirrors/ over HTTPS, with a mirror `good` synced to the repository."""
    CountingService.served.clear()
    mirrors = tmp_path / "mirrors"
    mirrors.mkdir()
    sync_mirror(datadir.repository(), mirrors / "stale")  # before any release: a mirror left behind
    store = datadir.store()
    store.register_device(DEVICE, "lab", {}, {}, "test")
    sha = {}
    for version, data in {**model_bytes, "3.0.0": _big_model(3)}.items():
        sha[version] = publish_release(datadir.repository(), store, data, "digits", version).release.sha256
    server = GrpcServerThread(store, datadir.repository(), service_class=CountingService)
    nginx = mirror_nginx(datadir, tmp_path / "nginx", mirrors)
    state = StateStore(tmp_path / "agent")
    state.seed_trust_root(datadir.trust / "root.json")
    events: list[pb.UpdateEvent] = []
    transport = GrpcTransport(server.address, DEVICE, timeout=10)
    keys = load_director_keys(json.loads((datadir.trust / "director_keys.json").read_text()))
    ctx = UpdateContext(DEVICE, state, transport, keys, events.append, mirror_ca=datadir.trust / "ca.pem")
    e = Env(datadir, ctx, events, nginx, mirrors, sha)
    e.sync("good")
    first = e.update("1.0.0")
    assert first.outcome is Outcome.COMMITTED, first
    assert CountingService.served["target"] == 1
    try:
        yield e
    finally:
        transport.close()
        server.stop()
        nginx.stop()
        store.close()


def test_an_agent_updates_from_an_nginx_mirror_over_https_without_the_coordinators_grpc(env: Env) -> None:
    served_before = CountingService.served.copy()

    result = env.update("2.0.0", "good")

    assert result.outcome is Outcome.COMMITTED, result
    assert env.active_sha() == env.sha["2.0.0"]
    assert CountingService.served == served_before  # neither a target nor any metadata over gRPC
    assert env.mirror_failures() == []
    fetched = {(r.status, r.uri) for r in env.nginx.requests()}
    assert (200, f"/good/{env.target_name('2.0.0')}") in fetched
    assert (200, "/good/metadata/timestamp.json") in fetched


def test_stale_metadata_on_a_mirror_is_refused_and_the_next_mirror_completes(env: Env) -> None:
    served_before = CountingService.served.copy()

    result = env.update("2.0.0", "stale", "good")  # stale: a timestamp older than the one the device trusts

    assert result.outcome is Outcome.COMMITTED, result
    failures = env.mirror_failures()
    assert len(failures) == 1 and failures[0][0] == Reason.METADATA_MISMATCH, failures
    assert "/stale/" in failures[0][1]
    assert CountingService.served == served_before  # the second mirror, not the coordinator


def test_tampered_metadata_on_a_mirror_is_refused_and_the_coordinator_completes(env: Env) -> None:
    tampered = env.sync("tampered")
    timestamp = json.loads((tampered / "metadata" / "timestamp.json").read_bytes())
    timestamp["signed"]["expires"] = "2099-01-01T00:00:00Z"  # a longer life, without the timestamp key
    (tampered / "metadata" / "timestamp.json").write_text(json.dumps(timestamp))
    targets_before = CountingService.served["target"]

    result = env.update("2.0.0", "tampered")

    assert result.outcome is Outcome.COMMITTED, result
    assert [reason for reason, _ in env.mirror_failures()] == [Reason.METADATA_BAD_SIGNATURE]
    assert CountingService.served["target"] == targets_before + 1
    assert env.active_sha() == env.sha["2.0.0"]


def test_a_tampered_artifact_on_a_mirror_is_refused_and_the_coordinator_completes(env: Env) -> None:
    tampered = env.sync("evil")
    target = tampered / env.target_name("2.0.0")
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same length, one byte flipped
    target.write_bytes(bytes(data))
    targets_before = CountingService.served["target"]

    result = env.update("2.0.0", "evil")

    assert result.outcome is Outcome.COMMITTED, result
    assert [reason for reason, _ in env.mirror_failures()] == [Reason.TARGET_HASH_MISMATCH]
    assert CountingService.served["target"] == targets_before + 1
    assert env.active_sha() == env.sha["2.0.0"]
    assert not list(env.ctx.store.downloads.glob("*.part"))  # the bad bytes were not kept


def test_mirrors_that_serve_nothing_are_passed_over_for_the_next(env: Env) -> None:
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    port = closed.getsockname()[1]
    served_before = CountingService.served.copy()
    try:
        result = env.update("2.0.0", "missing", f"https://127.0.0.1:{port}/", "good")
    finally:
        closed.close()

    assert result.outcome is Outcome.COMMITTED, result
    failures = env.mirror_failures()
    assert [reason for reason, _ in failures] == [Reason.TRANSIENT, Reason.TRANSIENT], failures
    assert "404" in failures[0][1]
    assert CountingService.served == served_before


def test_a_mirror_whose_certificate_the_fleet_ca_did_not_issue_is_refused(env: Env) -> None:
    env.ctx.mirror_ca = None  # the system's trust store, which does not know the fleet CA
    targets_before = CountingService.served["target"]

    result = env.update("2.0.0", "good")

    assert result.outcome is Outcome.COMMITTED, result
    failures = env.mirror_failures()
    assert len(failures) == 1 and "CERTIFICATE_VERIFY_FAILED" in failures[0][1], failures
    assert CountingService.served["target"] == targets_before + 1


class CuttingProxy:
    """A TCP relay in front of nginx (TLS passes through untouched) that cuts the first connection to carry
    `budget` bytes from the server right there: a network that drops a download half way. Later connections
    pass whole."""

    def __init__(self, upstream_port: int, budget: int) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.upstream_port, self.budget = upstream_port, budget
        self.connections = 0
        self.cut = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            limit = None if self.cut.is_set() else self.budget
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port))
            threading.Thread(target=self._pump, args=(client, upstream, None), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, limit), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, limit: int | None) -> None:
        sent = 0
        try:
            while data := src.recv(16384):
                if limit is not None and sent + len(data) >= limit:
                    dst.sendall(data[: limit - sent])
                    self.cut.set()
                    break
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def close(self) -> None:
        self.listener.close()


def test_a_download_cut_half_way_resumes_from_the_mirror_with_a_range_request(env: Env) -> None:
    length = len(_big_model(3))
    # The metadata an update reads (timestamp, snapshot, targets, the release's role) is well under half the
    # target: the connection carrying the target is cut between a third and a half of the way into it.
    proxy = CuttingProxy(env.nginx.port, budget=length // 2)
    served_before = CountingService.served.copy()
    try:
        result = env.update("3.0.0", f"https://127.0.0.1:{proxy.port}/good/")
    finally:
        proxy.close()

    assert proxy.cut.is_set()
    assert result.outcome is Outcome.COMMITTED, result
    assert env.active_sha() == env.sha["3.0.0"]
    target = [r for r in env.nginx.requests() if r.uri == f"/good/{env.target_name('3.0.0')}"]
    resumed = [r for r in target if r.status == 206]
    assert len(resumed) == 1, target
    start = int(resumed[0].range.removeprefix("bytes=").rstrip("-"))
    assert 0 < start < length
    assert resumed[0].body_bytes == length - start  # only the rest was sent again
    assert CountingService.served == served_before
    assert env.mirror_failures() == []


# ----- mirror sync -----


def _mirror_state(dest: Path) -> dict[str, tuple[int, int]]:
    """Every file under the mirror with its size and modification time."""
    return {
        p.relative_to(dest).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns) for p in dest.rglob("*") if p.is_file()
    }


def test_mirror_sync_is_idempotent_and_writes_the_standard_layout(
    datadir: DataDir, model_bytes: dict[str, bytes]
) -> None:
    with datadir.store() as store:
        sha = publish_release(datadir.repository(), store, model_bytes["1.0.0"], "digits", "1.0.0").release.sha256
    dest = datadir.root.parent / "mirror"

    first = sync_mirror(datadir.repository(), dest)
    before = _mirror_state(dest)
    second = sync_mirror(datadir.repository(), dest)

    assert f"targets/digits/1.0.0/{sha}.model.tflite" in first.written
    assert first.written[-1] == "metadata/timestamp.json"  # last: everything it names is there before it
    assert {"metadata/1.root.json", "metadata/timestamp.json"} <= set(before)
    assert second.written == [] and second.deleted == []
    assert _mirror_state(dest) == before  # not one file rewritten
    for name in before:
        if not name.startswith("."):
            source = datadir.repository_dir / name
            assert source.read_bytes() == (dest / name).read_bytes(), name


def _consistent(dest: Path) -> tuple[int, str]:
    """Read the mirror as a client would: timestamp, the snapshot it names, every role that names, every target
    those list (whole, by hash). Returns (timestamp version, "" or what was inconsistent)."""
    try:
        timestamp = json.loads((dest / "metadata" / "timestamp.json").read_bytes())["signed"]
        snapshot_name = f"{timestamp['meta']['snapshot.json']['version']}.snapshot.json"
        snapshot = json.loads((dest / "metadata" / snapshot_name).read_bytes())["signed"]
        for role, info in snapshot["meta"].items():
            signed = json.loads((dest / "metadata" / f"{info['version']}.{role}").read_bytes())["signed"]
            for path, target in signed["targets"].items():
                directory, _, base = path.rpartition("/")
                data = (dest / "targets" / directory / f"{target['hashes']['sha256']}.{base}").read_bytes()
                if hashlib.sha256(data).hexdigest() != target["hashes"]["sha256"]:
                    return timestamp["version"], f"{path}: partial or wrong bytes"
    except (OSError, ValueError, KeyError) as e:
        return -1, f"{type(e).__name__}: {e}"
    return int(timestamp["version"]), ""


def test_a_mirror_read_during_syncs_is_always_consistent(datadir: DataDir) -> None:
    dest = datadir.root.parent / "mirror"
    sync_mirror(datadir.repository(), dest)
    done = threading.Event()
    seen: list[tuple[int, str]] = []

    def reader() -> None:
        deadline = time.monotonic() + 120
        while not done.is_set() and len(seen) < 100_000 and time.monotonic() < deadline:
            seen.append(_consistent(dest))

    thread = threading.Thread(target=reader)
    thread.start()
    try:
        with datadir.store() as store:
            for i in range(6):  # each release: a new target, role, targets, snapshot and timestamp, then a sync
                publish_release(datadir.repository(), store, _big_model(10 + i), "digits", f"9.{i}.0")
                sync_mirror(datadir.repository(), dest)
    finally:
        done.set()
        thread.join(30)

    problems = [p for _, p in seen if p]
    assert problems == [], problems[:3]
    versions = {v for v, _ in seen}
    assert len(versions) >= 3, f"the reader saw too few syncs to judge ({sorted(versions)}, {len(seen)} reads)"


def test_mirror_sync_deletes_only_what_nothing_published_names(datadir: DataDir, model_bytes: dict[str, bytes]) -> None:
    with datadir.store() as store:
        publish_release(datadir.repository(), store, model_bytes["1.0.0"], "digits", "1.0.0")
    dest = datadir.root.parent / "mirror"
    sync_mirror(datadir.repository(), dest)
    orphan = dest / "targets" / "digits" / "0.1.0" / f"{'0' * 64}.model.tflite"  # the repository dropped it
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"retired")
    published = next((datadir.repository_dir / "targets" / "digits" / "1.0.0").glob("*.model.tflite"))
    published.rename(published.with_suffix(".moved"))  # gone from the repository, still named by its metadata

    with pytest.raises(MirrorError, match="changed during the sync"):
        sync_mirror(datadir.repository(), dest)
    assert (dest / published.relative_to(datadir.repository_dir)).is_file()  # kept: the timestamp names it

    published.with_suffix(".moved").rename(published)
    result = sync_mirror(datadir.repository(), dest)
    assert result.deleted == ["targets/digits/0.1.0/" + orphan.name]
    assert not orphan.parent.exists()
    assert _consistent(dest)[1] == ""


def test_mirror_sync_command_reports_and_refuses_a_destination_inside_the_repository(datadir: DataDir) -> None:
    dest = datadir.root.parent / "mirror"

    first = fedfleet(datadir, "mirror", "sync", str(dest), "--json")
    again = fedfleet(datadir, "mirror", "sync", str(dest), "--json")
    inside = fedfleet(datadir, "mirror", "sync", str(datadir.repository_dir / "mirror"))

    assert first.returncode == 0, first.stderr
    assert json.loads(first.stdout)["written"][-1] == "metadata/timestamp.json"
    assert json.loads(again.stdout)["written"] == []
    assert inside.returncode == 1
    assert inside.stderr.strip().count("\n") == 0 and "inside the repository" in inside.stderr
    assert not (datadir.repository_dir / "mirror").exists()


def test_serve_setting_mirror_dirs_is_checked_and_kept(datadir: DataDir) -> None:
    assert datadir.config().mirror_dirs == ()
    datadir.set_config("mirror_dirs", "mirror-a, /srv/mirror-b")
    assert datadir.config().mirror_dirs == ("mirror-a", "/srv/mirror-b")
    datadir.set_config("mirror_dirs", "")
    assert datadir.config().mirror_dirs == ()


# ----- agent.toml -----


def _agent_config(tmp_path: Path, **extra: Any) -> dict[str, Any]:
    (tmp_path / "keys.json").write_text("{}")
    (tmp_path / "ca.pem").write_text("")
    return {
        "device_id": "d",
        "state_dir": "state",
        "grpc_target": "127.0.0.1:1",
        "mqtt_url": "mqtt://127.0.0.1:1883",
        "trust_root": "root.json",
        "director_keys": "keys.json",
        **extra,
    }


def test_agent_config_takes_https_mirrors_and_plain_http_only_on_loopback(tmp_path: Path) -> None:
    config = config_from_dict(
        _agent_config(tmp_path, mirrors=["https://mirror.lan/repo", "http://127.0.0.1:8080/"]), tmp_path
    )
    assert config.mirrors == ("https://mirror.lan/repo/", "http://127.0.0.1:8080/")
    assert config.mirror_ca is None  # no fleet CA given: the system's trust store
    with_ca = config_from_dict(_agent_config(tmp_path, mirrors=[], mirror_ca="ca.pem"), tmp_path)
    assert with_ca.mirror_ca == tmp_path / "ca.pem"

    for bad, message in (
        (["http://mirror.lan/"], "plaintext beyond this machine"),
        (["ftp://mirror.lan/"], "https:// URL"),
        (["https://mirror.lan/?x=1"], "without query"),
        ("https://mirror.lan/", "list of at most"),
        ([f"https://m{i}.lan/" for i in range(9)], "list of at most"),
    ):
        with pytest.raises(ConfigError, match=message):
            config_from_dict(_agent_config(tmp_path, mirrors=bad), tmp_path)
    with pytest.raises(ConfigError, match="is not a file"):
        config_from_dict(_agent_config(tmp_path, mirror_ca="missing.pem"), tmp_path)
    lab = config_from_dict(_agent_config(tmp_path, mirrors=["http://mirror.lan/"], allow_plaintext=True), tmp_path)
    assert lab.mirrors == ("http://mirror.lan/",)


def test_nginx_helper_serves_only_the_mirror_root(env: Env) -> None:
    """The mirror's sync lock (a dot file) is not served."""
    lock = env.mirrors / "good" / ".fedfleet-sync.lock"
    assert lock.exists()
    fetcher = MirrorFetcher(env.d.trust / "ca.pem")
    with pytest.raises(DownloadHTTPError) as refused:
        fetcher.download_bytes(env.nginx.url + "good/.fedfleet-sync.lock", 10_000)
    assert refused.value.status_code == 404


@pytest.mark.slow
@pytest.mark.broker
def test_fanout_benchmark_measures_the_coordinators_cpu_per_update_on_both_paths(tmp_path: Path) -> None:
    fanout = Path(__file__).resolve().parents[2] / "benchmarks" / "fanout.py"
    args = ["--devices", "3", "--size-mb", "0.05", "--workers", "2", "--mirror", "--skip-floor"]

    out = run_bounded([sys.executable, str(fanout), *args, "--workdir", str(tmp_path)], timeout=240)

    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert set(result["coordinator_cpu_ms_per_update"]) == {"grpc", "mirror"}
    assert set(result["agent_cpu_ms_per_update"]) == {"grpc", "mirror"}
    assert result["seconds_by_path"]["mirror"] > 0 and result["seconds"] == result["seconds_by_path"]["grpc"]
    assert result["mirror_server_cpu_ms_per_update"] is not None
    assert "fedfleet through the mirror: 3 devices committed" in out.stdout
    assert list(tmp_path.iterdir()) == []  # nginx's and the mirror's files are gone with the rest
