"""The same Flower app on Flower's deployment engine, secured as a real fleet runs it: a SuperLink (the
coordinator's side) with TLS from the fleet CA and SuperNode authentication, SuperNodes (devices) holding keys
made from their enrollment bundles and registered with it (`fedfleet flower credentials`, `fedfleet flower
node-key`), a run submitted by the retrain worker's own `flwr run`, the outcome read from the coordinator's
database. A SuperNode whose key was never registered, and one that does not trust the fleet CA, are refused.
The quick tests check the commands' refusals: bad input changes nothing."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from server import audit
from server.cli.flower import LOOPBACK_HOSTS, NODE_KEY
from server.datadir import DataDir
from server.errors import CoordinatorError
from server.fl.plan import TrainPlan
from server.fl.registry import Ledger, Registry, TrainingRuns
from server.ingest.broker import free_port
from server.loop import worker
from server.policy import Policy
from simulations.processes import kill_tree
from tests.support import fedfleet, wait_for

APP = Path(__file__).resolve().parents[2] / "deploy" / "flower-app"
BIN = Path(sys.executable).parent
FLWR = 180.0  # bound on a `fedfleet flower` command that runs `flwr` (60 s of its own per call) on a loaded machine


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _ok(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert done.returncode == 0, done.stdout + done.stderr
    doc: dict[str, Any] = json.loads(done.stdout)
    return doc


def _enroll(d: DataDir, bundle: Path, *extra: str) -> None:
    _ok(fedfleet(d, "devices", "enroll", bundle.name, "--out", str(bundle), "--json", *extra))


def _fresh_key(path: Path) -> None:
    key = ec.generate_private_key(ec.SECP384R1())
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    )
    path.chmod(0o600)


@dataclass
class Federation:
    """A SuperLink on loopback and the SuperNodes a test starts: with TLS from the fleet CA and SuperNode
    authentication (`d` is the coordinator's data directory), or plaintext (`d` is None), which loopback allows."""

    d: DataDir | None
    root: Path
    port: int
    env: dict[str, str]
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: list[IO[bytes]] = field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, name: str, *args: str) -> subprocess.Popen[bytes]:
        log = (self.root / f"{name}.log").open("wb")
        self.logs.append(log)
        proc = subprocess.Popen(
            [shutil.which(args[0], path=str(BIN)) or args[0], *args[1:]],
            env=self.env,
            stdout=log,
            stderr=log,
            start_new_session=True,  # stopped with whatever it starts (the SuperLink's SuperExec)
        )
        self.procs.append(proc)
        return proc

    def device(self, name: str) -> Path:
        """An enrolled device whose Flower key is made from its bundle and registered with the SuperLink."""
        assert self.d is not None
        bundle = self.root / name
        _enroll(self.d, bundle)
        made = _ok(
            fedfleet(self.d, "flower", "node-key", str(bundle), "--superlink", self.address, "--json", timeout=FLWR)
        )
        assert made["device"] == name and made["node_id"] > 0
        return bundle

    def supernode(self, name: str, key: Path | None, ca: Path | None, node_config: str = "") -> subprocess.Popen[bytes]:
        tls = ["--root-certificates", str(ca)] if ca is not None else []
        auth = ["--auth-supernode-private-key", str(key)] if key is not None else []  # none: it registers itself
        return self.start(
            name,
            "flower-supernode",
            *(tls if self.d is not None else ["--insecure"]),
            *auth,
            "--superlink",
            self.address,
            "--host",
            "127.0.0.1",
            "--port",
            str(free_port()),
            *(["--node-config", node_config] if node_config else []),
        )

    def nodes(self) -> list[dict[str, Any]]:
        """The SuperLink's SuperNodes, as Flower's own `flwr supernode list` reports them."""
        listed = subprocess.run(
            [str(BIN / "flwr"), "supernode", "list", "--format", "json"],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=FLWR,
            check=False,
        )
        nodes: list[dict[str, Any]] = _ok(listed)["nodes"]
        return nodes

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")


def _digits_share(fed: Federation, i: int) -> str:
    """Device pi-i's node config: its share of the digits data, its privacy record under the test's directory, and
    its owner's consent to train (agent.toml [consent] training; without it the ClientApp refuses)."""
    return (
        f"partition-id={i} num-partitions=2 device-id='pi-{i}' state-dir='{fed.root / 'devices'}' consent-training=true"
    )


@contextlib.contextmanager
def _running(tmp_path: Path, tls: bool) -> Iterator[Federation]:
    port = free_port()
    home = tmp_path / "flwr-home"  # how an operator's `flwr` reaches the SuperLink
    home.mkdir()
    connection = f'address = "127.0.0.1:{port}"\ninsecure = true\n'
    command = ["flower-superlink", "--insecure", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--disable-runtime-dependency-installation"]
    d = None
    if tls:
        d, _ = DataDir.init(tmp_path / "data")
        creds = _ok(fedfleet(d, "flower", "credentials", "--host", "127.0.0.1", "--port", str(port), "--json"))
        # The command line `fedfleet flower credentials` prints: TLS on every API, SuperNode authentication on.
        assert "--enable-supernode-auth" in creds["command"] and "--insecure" not in creds["command"]
        command = creds["command"]
        connection = f'address = "127.0.0.1:{port}"\nroot-certificates = "{creds["ca"]}"\n'  # the fleet CA
    (home / "config.toml").write_text(f'[superlink]\ndefault = "fedfleet"\n\n[superlink.fedfleet]\n{connection}')
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{BIN}:{os.environ['PATH']}"}
    fed = Federation(d, tmp_path, port, env)
    fed.start("superlink", *command, "--database", str(tmp_path / "superlink.db"))
    try:
        wait_for(lambda: _port_open(port), 60, 0.2, what="the SuperLink listening")
        yield fed
    finally:
        for p in fed.procs:
            if p.poll() is None:
                p.terminate()
        for p in fed.procs:
            try:
                p.wait(20)
            finally:
                kill_tree(p.pid)  # what it left behind, or all of it if it did not stop
                p.wait()
        for log in fed.logs:
            log.close()
        # The SuperLink's SuperExec watches its parent's pid and exits on its own.


@pytest.fixture
def secure_federation(tmp_path: Path) -> Iterator[Federation]:
    """A SuperLink with TLS from a fresh data directory's fleet CA and SuperNode authentication; no SuperNodes."""
    with _running(tmp_path, tls=True) as fed:
        yield fed


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[tuple[dict[str, str], int]]:
    """A plaintext SuperLink on loopback with SuperNodes pi-0 and pi-1: (flwr's environment, its port).
    tests/system/test_loop_deployment.py retrains on it through `fedfleet serve`'s loop."""
    with _running(tmp_path, tls=False) as fed:
        for i in range(2):
            fed.supernode(f"supernode-{i}", None, None, _digits_share(fed, i))
        yield fed.env, fed.port


@pytest.mark.timeout(900)  # `flwr run` gets 600 s (below this) on a slow machine
@pytest.mark.slow
@pytest.mark.ray
def test_a_superlink_and_two_supernodes_train_and_register(secure_federation: Federation) -> None:
    # Prepare: two enrolled devices with registered keys; the policy names the SuperLink and the CA bundle.
    fed, d = secure_federation, secure_federation.d
    assert d is not None
    for i in range(2):
        bundle = fed.device(f"pi-{i}")
        fed.supernode(f"supernode-{i}", bundle / NODE_KEY, bundle / "ca.pem", _digits_share(fed, i))
    (d.root / "policy.toml").write_text(
        f'[retrain]\nengine = "deployment"\nsuperlink = "{fed.address}"\n'
        'superlink_root_certificates = "flower/ca.pem"\n'
    )
    plan = TrainPlan(rounds=2, clients=2, noise_multiplier=1.0, seed=5, round_timeout=240.0).to_dict()

    # Execute: the retrain worker's deployment path submits the run (`flwr run` over TLS).
    with d.store() as store:
        run_id, version, error = worker.train_on_superlink(d, store, d.policy(), plan)

    # Assert
    assert error == "" and run_id and version, (error, fed.log("supernode-0")[-3000:])
    store = d.store()
    try:
        runs = TrainingRuns(store).list()
        assert [r["status"] for r in runs] == ["completed"], runs
        model = Registry(store).get(runs[0]["model_version"])
        assert model.lineage["engine"] == "deployment"
        assert model.lineage["devices"] == ["pi-0", "pi-1"]
        ledger = [r for r in Ledger(store, 10.0).rows() if r.get("purpose", "training") == "training"]
        assert sorted(r["device"] for r in ledger) == ["pi-0", "pi-1"] and all(r["rounds"] == 2 for r in ledger)
        assert model.lineage["metrics"]["test_accuracy"] > 0.3
        keyed = {e["subject"]: e["detail"] for e in audit.entries(store, action="flower.node-key")}
        assert sorted(keyed) == ["pi-0", "pi-1"] and all(v["node_id"] for v in keyed.values())
    finally:
        store.close()
    # Each device kept its own record of what it spent, beside the coordinator's ledger.
    assert (fed.root / "devices" / "pi-0" / "privacy.json").exists()


@pytest.mark.timeout(300)
@pytest.mark.slow
@pytest.mark.ray
def test_the_superlink_refuses_unregistered_keys_and_a_supernode_without_the_ca(
    secure_federation: Federation,
) -> None:
    # Prepare: pi-0 and pi-1 are registered; a stranger holds a fresh key and the fleet's (public) CA bundle.
    fed = secure_federation
    pi0, pi1 = fed.device("pi-0"), fed.device("pi-1")
    _fresh_key(fed.root / "stranger-key")

    # Execute
    stranger = fed.supernode("stranger", fed.root / "stranger-key", pi0 / "ca.pem")
    anonymous = fed.supernode("anonymous", None, pi0 / "ca.pem")  # no key: asks the Fleet API to register it
    no_ca = fed.supernode("no-ca", pi1 / NODE_KEY, None)  # a registered key, but the system's roots only
    control = fed.supernode("pi-0", pi0 / NODE_KEY, pi0 / "ca.pem")

    # Assert: the control comes online; the others give up with an error, and none of them joined.
    wait_for(lambda: [n["status"] for n in fed.nodes()].count("online") == 1, 120, 1.0, what="pi-0 online")
    assert stranger.wait(120) != 0 and anonymous.wait(120) != 0 and no_ca.wait(120) != 0
    link = fed.log("superlink")
    assert "No SuperNode found with the given public key" in link  # the stranger's activation
    assert '/v1/fleet/register-node HTTP/1.1" 4' in link  # the anonymous one's self-registration: a 4xx
    assert "CERTIFICATE_VERIFY_FAILED" in fed.log("no-ca")
    nodes = fed.nodes()
    assert sorted(n["status"] for n in nodes) == ["online", "registered"], nodes  # pi-0 online, pi-1 never
    assert control.poll() is None

    # And the retrain worker, given another fleet's CA for this SuperLink, submits nothing.
    assert fed.d is not None
    other, _ = DataDir.init(fed.root / "other-fleet")
    foreign = Policy(retrain_superlink=fed.address, retrain_superlink_root_certificates=str(other.trust / "ca.pem"))
    plan = TrainPlan(rounds=1, clients=1, round_timeout=60.0).to_dict()
    with fed.d.store() as store:
        run_id, version, error = worker.train_on_superlink(fed.d, store, foreign, plan)
        assert TrainingRuns(store).list() == []
    # flwr says only "unavailable" when TLS verification fails; the SuperLink saw no run start.
    assert (run_id, version) == ("", "") and "Connection to the SuperLink is unavailable" in error, error
    assert "/v1/control/start-run" not in fed.log("superlink")


@pytest.mark.timeout(300)
@pytest.mark.slow
@pytest.mark.ray
def test_a_replaced_or_unregistered_key_is_refused(secure_federation: Federation) -> None:
    # Prepare: pi-0 and pi-1 registered; pi-1's first key kept aside before it is replaced.
    fed = secure_federation
    assert fed.d is not None
    pi0, pi1 = fed.device("pi-0"), fed.device("pi-1")
    shutil.copy(pi1 / NODE_KEY, fed.root / "pi-1-old-key")
    first = {n["node-id"] for n in fed.nodes()}

    # Execute: a new key for pi-1 (its earlier node goes), and pi-0 unregistered as after `devices revoke`.
    replaced = _ok(
        fedfleet(fed.d, "flower", "node-key", str(pi1), "--replace", "--superlink", fed.address, "--json", timeout=FLWR)
    )
    gone = _ok(fedfleet(fed.d, "flower", "unregister", "pi-0", "--superlink", fed.address, "--json", timeout=FLWR))
    old_key = fed.supernode("pi-1-old", fed.root / "pi-1-old-key", pi1 / "ca.pem")
    revoked = fed.supernode("pi-0", pi0 / NODE_KEY, pi0 / "ca.pem")
    new_key = fed.supernode("pi-1", pi1 / NODE_KEY, pi1 / "ca.pem")

    # Assert: both refused; the new key comes online; the SuperLink says which nodes are gone.
    assert len(replaced["unregistered"]) == 1 and len(gone["unregistered"]) == 1
    assert {str(i) for i in replaced["unregistered"] + gone["unregistered"]} == first
    assert old_key.wait(120) != 0 and revoked.wait(120) != 0
    online = str(replaced["node_id"])
    wait_for(lambda: {n["node-id"]: n["status"] for n in fed.nodes()}.get(online) == "online", 120, 1.0, what="pi-1")
    statuses = {n["node-id"]: n["status"] for n in fed.nodes()}
    assert statuses == {**dict.fromkeys(first, "unregistered"), online: "online"}, statuses
    assert new_key.poll() is None
    again = fedfleet(fed.d, "flower", "unregister", "pi-0", "--superlink", fed.address, timeout=FLWR)
    assert again.returncode == 1 and "no registered SuperLink node on record" in again.stderr


# ----- the commands' refusals, no Flower process needed -----


def test_credentials_name_the_hosts_and_chain_to_the_fleet_ca(datadir: DataDir, tmp_path: Path) -> None:
    # Execute
    first = _ok(
        fedfleet(datadir, "flower", "credentials", "--host", "coordinator.lan", "--out", str(tmp_path / "a"), "--json")
    )
    second = _ok(
        fedfleet(datadir, "flower", "credentials", "--host", "10.1.2.3", "--out", str(tmp_path / "b"), "--json")
    )

    # Assert: the names SuperNodes dial plus loopback (the SuperExec's), the chain up to the bundle's root.
    assert first["hosts"] == ["coordinator.lan", *LOOPBACK_HOSTS] and second["hosts"] == ["10.1.2.3", *LOOPBACK_HOSTS]
    leaf, intermediate = x509.load_pem_x509_certificates(Path(second["cert"]).read_bytes())
    root, bundle_intermediate = x509.load_pem_x509_certificates(Path(second["ca"]).read_bytes())
    assert intermediate == bundle_intermediate
    leaf.verify_directly_issued_by(intermediate)
    intermediate.verify_directly_issued_by(root)
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)] == ["10.1.2.3", "127.0.0.1"]
    assert stat.S_IMODE(Path(second["key"]).stat().st_mode) == 0o600
    with datadir.store() as store:
        assert store.certificate_revoked(first["serial"]) and not store.certificate_revoked(second["serial"])
    assert "0.0.0.0" in second["command"] and "--enable-supernode-auth" in second["command"]


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "not a name", "-lan"])
def test_credentials_refuse_a_host_nobody_dials_and_write_nothing(datadir: DataDir, tmp_path: Path, host: str) -> None:
    # Prepare
    with datadir.store() as store:
        before = audit.entries(store)

    # Execute
    done = fedfleet(datadir, "flower", "credentials", f"--host={host}", "--out", str(tmp_path / "tls"))

    # Assert
    assert done.returncode == 1 and "--host" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "tls").exists()
    with datadir.store() as store:
        assert audit.entries(store) == before


def test_node_key_is_made_from_a_live_enrollment_bundle(datadir: DataDir, tmp_path: Path) -> None:
    # Prepare
    bundle = tmp_path / "pi-kitchen"
    _enroll(datadir, bundle)

    # Execute
    made = _ok(fedfleet(datadir, "flower", "node-key", str(bundle), "--json"))

    # Assert: an OpenSSH EC key on a NIST curve (what flower-supernode loads), readable by its owner only.
    assert made == {
        "device": "pi-kitchen",
        "private_key": str(bundle / NODE_KEY),
        "public_key": str(bundle / f"{NODE_KEY}.pub"),
        "node_id": None,
        "unregistered": [],
    }
    key = serialization.load_ssh_private_key((bundle / NODE_KEY).read_bytes(), None)
    public = serialization.load_ssh_public_key((bundle / f"{NODE_KEY}.pub").read_bytes())
    assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
    assert public == key.public_key()
    assert stat.S_IMODE((bundle / NODE_KEY).stat().st_mode) == 0o600


@pytest.mark.slow
def test_node_key_refusals_change_nothing(datadir: DataDir, tmp_path: Path) -> None:
    # Prepare: pi-a enrolled twice (the first bundle's certificate is revoked), pi-b with a key already.
    old, new, keyed = tmp_path / "old" / "pi-a", tmp_path / "new" / "pi-a", tmp_path / "pi-b"
    _enroll(datadir, old)
    _enroll(datadir, new, "--force")
    _enroll(datadir, keyed)
    _ok(fedfleet(datadir, "flower", "node-key", str(keyed), "--json"))
    key_before = (keyed / NODE_KEY).read_bytes()
    with datadir.store() as store:
        entries_before = audit.entries(store)

    # Execute
    revoked = fedfleet(datadir, "flower", "node-key", str(old))
    not_a_bundle = fedfleet(datadir, "flower", "node-key", str(tmp_path))
    again = fedfleet(datadir, "flower", "node-key", str(keyed))
    unreachable = fedfleet(
        datadir, "flower", "node-key", str(new), "--superlink", f"127.0.0.1:{free_port()}", timeout=FLWR
    )

    # Assert: one sentence each, no key written, nothing audited.
    assert revoked.returncode == 1 and "not a live certificate of this fleet" in revoked.stderr
    assert not_a_bundle.returncode == 1 and "not an enrollment bundle" in not_a_bundle.stderr
    assert again.returncode == 1 and "--replace" in again.stderr
    assert unreachable.returncode == 1 and "did not register pi-a's key" in unreachable.stderr
    assert not (old / NODE_KEY).exists() and not (new / NODE_KEY).exists() and not (tmp_path / NODE_KEY).exists()
    assert (keyed / NODE_KEY).read_bytes() == key_before
    with datadir.store() as store:
        assert audit.entries(store) == entries_before

    # And --replace does make a new key.
    _ok(fedfleet(datadir, "flower", "node-key", str(keyed), "--replace", "--json"))
    assert (keyed / NODE_KEY).read_bytes() != key_before


def test_the_worker_verifies_the_superlink_with_the_policy_ca(datadir: DataDir, tmp_path: Path) -> None:
    # Prepare
    _ok(fedfleet(datadir, "flower", "credentials", "--json"))
    tls = Policy(retrain_superlink="coordinator.lan:9091", retrain_superlink_root_certificates="flower/ca.pem")
    loopback = Policy(retrain_superlink="127.0.0.1:9091")
    missing = Policy(retrain_superlink="coordinator.lan:9091", retrain_superlink_root_certificates="nowhere.pem")

    # Execute
    with_tls = tomllib.loads(worker.superlink_connection(datadir, tls))
    plaintext = tomllib.loads(worker.superlink_connection(datadir, loopback))
    with datadir.store() as store:
        outcome = worker.train_on_superlink(datadir, store, missing, {"rounds": 1, "round_timeout": 1.0})

    # Assert: a relative path is the data directory's, and a missing bundle stops the job with one sentence.
    assert with_tls == {"address": "coordinator.lan:9091", "root-certificates": str(datadir.root / "flower" / "ca.pem")}
    assert plaintext == {"address": "127.0.0.1:9091", "insecure": True}
    assert outcome[:2] == ("", "") and "nowhere.pem is not a file" in outcome[2]
    with pytest.raises(CoordinatorError, match="is not a file"):
        worker.superlink_connection(datadir, missing)


def test_the_worker_submits_the_app_deploy_flower_app_describes() -> None:
    """The worker writes its own copy of deploy/flower-app (the installed package has no deploy/): the same
    components and settings, so the deployment test's run through the worker covers the shipped app too."""
    shipped = tomllib.loads((APP / "pyproject.toml").read_text())["tool"]["flwr"]["app"]
    submitted = tomllib.loads(worker._FLOWER_APP)["tool"]["flwr"]["app"]
    assert submitted["components"] == shipped["components"]
    assert submitted["config"].keys() == shipped["config"].keys()
