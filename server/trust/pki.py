"""The fleet's certificate authority: who may talk to the coordinator and the broker at all.

Two levels: a root CA that signs only intermediates, and an online intermediate that issues every leaf.

OFFLINE/ca-root-key.pem  the root CA's key: on a USB stick with `fedfleet init --offline-keys`, else in DATA/keys/
DATA/trust/ca-root.pem   the root CA's certificate
DATA/keys/ca-key.pem     the issuing (intermediate) CA's key (0600), online: it enrolls devices
DATA/trust/ca-intermediate.pem  its certificate
DATA/trust/ca.pem        the trust bundle devices and the broker get: the root, then the issuing intermediate
DATA/tls/                the coordinator's own certificates: its gRPC server certificate and its MQTT client one
DATA/trust/crl.pem       revoked certificates: one CRL per intermediate that issued leaves, re-signed at every
                         revocation (Mosquitto's crlfile; OpenSSL checks a leaf against its issuer's CRL)

Every leaf file holds the leaf and then its intermediate, so peers that trust only the root still build the
chain, and a device enrolled under an earlier intermediate keeps working after `fedfleet keys new-intermediate`
(whose retired key stays online to sign its CRL). Data directories made before intermediates existed have one
self-signed CA in ca.pem whose key is keys/ca-key.pem; it goes on issuing leaves itself.

Every certificate is ECDSA P-256 (what Mosquitto's OpenSSL and gRPC's BoringSSL both accept). A device
certificate's common name is the device id: the broker uses it as the MQTT username for the ACL, and the gRPC
server takes the device's identity from it, never from a request body.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edge_agent.contract.files import atomic_write_bytes
from server.errors import ConflictError, CoordinatorError
from server.store import Store
from server.trust.keyfile import OfflineKeyError, read_key, write_key

__all__ = ["CA_ROOT_KEY", "COORDINATOR_IDENTITY", "FleetCA", "Issued", "OfflineKeyError", "serial_of"]

COORDINATOR_IDENTITY = "fedfleet-coordinator"  # the coordinator's MQTT username (common name)
CA_ROOT_KEY = "ca-root-key.pem"  # the root CA's key file, in DATA/keys or the offline directory
_YEAR = dt.timedelta(days=365)
_PEM = serialization.Encoding.PEM


@dataclass(frozen=True)
class Issued:
    cert_pem: bytes  # the leaf, then the intermediate that issued it
    key_pem: bytes
    serial: str  # hex
    not_after: dt.datetime


def serial_of(cert_pem: bytes) -> str:
    """The serial of the first certificate in a PEM (the leaf of a chain file)."""
    return format(x509.load_pem_x509_certificate(cert_pem).serial_number, "x")


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedfleet"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(_PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())


def _read_ec_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = read_key(path)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise CoordinatorError(f"{path} is not an EC key")
    return key


def _ca_certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    years: int,
    path_length: int,
) -> x509.Certificate:
    """A CA certificate: self-signed (a root) when issuer is None, else signed by issuer_key."""
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer.subject if issuer is not None else _name(subject))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + years * _YEAR)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
        )  # key_cert_sign, crl_sign
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), critical=False)
    )
    return builder.sign(issuer_key, hashes.SHA256())


class FleetCA:
    def __init__(
        self,
        key: ec.EllipticCurvePrivateKey,
        cert: x509.Certificate,
        keys_dir: Path,
        trust_dir: Path,
        retired: list[tuple[ec.EllipticCurvePrivateKey, x509.Certificate]] | None = None,
    ) -> None:
        self._key = key
        self.cert = cert  # the issuing CA (the intermediate; in old data directories the root itself)
        self.keys_dir = keys_dir
        self.trust_dir = trust_dir
        self._retired = retired or []  # earlier intermediates: they still sign the CRL of what they issued

    @property
    def is_intermediate(self) -> bool:
        return self.cert.subject != self.cert.issuer

    @property
    def bundle_pem(self) -> bytes:
        """What devices and the broker trust (trust/ca.pem): the root, then the issuing intermediate."""
        return (self.trust_dir / "ca.pem").read_bytes()

    @property
    def chain_pem(self) -> bytes:
        """What a leaf file carries after the leaf: the issuing intermediate (nothing for a self-signed CA)."""
        return self.cert.public_bytes(_PEM) if self.is_intermediate else b""

    @classmethod
    def create(cls, keys_dir: Path, trust_dir: Path, root_key_dir: Path | None = None) -> FleetCA:
        """A root CA (its key in root_key_dir, offline, or keys_dir) and the first intermediate signed by it."""
        root_key = ec.generate_private_key(ec.SECP256R1())
        root = _ca_certificate("fedfleet fleet root CA", root_key, None, root_key, 20, path_length=1)
        write_key((root_key_dir or keys_dir) / CA_ROOT_KEY, root_key)
        atomic_write_bytes(trust_dir / "ca-root.pem", root.public_bytes(_PEM))
        return cls._new_intermediate(keys_dir, trust_dir, root_key, root, number=1)

    @classmethod
    def _new_intermediate(
        cls, keys_dir: Path, trust_dir: Path, root_key: ec.EllipticCurvePrivateKey, root: x509.Certificate, number: int
    ) -> FleetCA:
        key = ec.generate_private_key(ec.SECP256R1())
        # A name of its own: OpenSSL finds a leaf's CRL by its issuer's name, and old intermediates keep theirs.
        cert = _ca_certificate(f"fedfleet issuing CA {number}", key, root, root_key, 5, path_length=0)
        write_key(keys_dir / "ca-key.pem", key)
        atomic_write_bytes(trust_dir / "ca-intermediate.pem", cert.public_bytes(_PEM))
        atomic_write_bytes(trust_dir / "ca.pem", root.public_bytes(_PEM) + cert.public_bytes(_PEM))  # last: done
        return cls.open(keys_dir, trust_dir)

    @classmethod
    def open(cls, keys_dir: Path, trust_dir: Path) -> FleetCA:
        """Load the issuing CA, creating the CA on first use (data directories made before it existed get one
        then, its root key online)."""
        key_path, bundle = keys_dir / "ca-key.pem", trust_dir / "ca.pem"
        if not (key_path.exists() and bundle.exists()):
            return cls.create(keys_dir, trust_dir)
        intermediate = trust_dir / "ca-intermediate.pem"
        cert = x509.load_pem_x509_certificate((intermediate if intermediate.exists() else bundle).read_bytes())
        retired = []
        for old_key in sorted((keys_dir / "retired").glob("ca-key-*.pem")):
            old_cert = trust_dir / "retired" / old_key.name.replace("ca-key-", "ca-intermediate-")
            retired.append((_read_ec_key(old_key), x509.load_pem_x509_certificate(old_cert.read_bytes())))
        return cls(_read_ec_key(key_path), cert, keys_dir, trust_dir, retired)

    def _root(self, offline_dir: Path | None) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
        """The root CA's key, from offline_dir or DATA/keys, checked against the root certificate."""
        root = x509.load_pem_x509_certificate((self.trust_dir / "ca-root.pem").read_bytes())
        online = self.keys_dir / CA_ROOT_KEY
        if offline_dir is None and not online.exists():
            raise OfflineKeyError(
                "the root CA key is offline (not in the data directory); give the directory that holds "
                f"{CA_ROOT_KEY}: --offline-keys DIR"
            )
        path = offline_dir / CA_ROOT_KEY if offline_dir is not None else online
        if not path.is_file():
            raise OfflineKeyError(
                f"{path} does not exist; --offline-keys must name the directory holding {CA_ROOT_KEY}"
            )
        key = _read_ec_key(path)
        spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        if key.public_key().public_bytes(*spki) != root.public_key().public_bytes(*spki):
            raise ConflictError(f"{path} is not the key of this fleet's root CA (trust/ca-root.pem)")
        return key, root

    def new_intermediate(self, offline_dir: Path | None = None) -> FleetCA:
        """Sign a new issuing intermediate with the root CA key; the current one is retired (its key kept online
        to sign the CRL of the certificates it issued, which stay valid). Returns the CA with the new one."""
        if not self.is_intermediate:
            raise ConflictError(
                "this fleet CA predates intermediates: its root issues certificates itself and may not sign an "
                "intermediate; keep using it, or start a new data directory"
            )
        root_key, root = self._root(offline_dir)  # checked before anything changes
        serial = format(self.cert.serial_number, "x")
        (self.keys_dir / "retired").mkdir(mode=0o700, exist_ok=True)
        os.replace(self.keys_dir / "ca-key.pem", self.keys_dir / "retired" / f"ca-key-{serial}.pem")
        atomic_write_bytes(self.trust_dir / "retired" / f"ca-intermediate-{serial}.pem", self.cert.public_bytes(_PEM))
        return self._new_intermediate(self.keys_dir, self.trust_dir, root_key, root, len(self._retired) + 2)

    def issue(self, common_name: str, client: bool, hosts: tuple[str, ...] = (), years: int = 1) -> Issued:
        """A leaf certificate: a client one (devices, the coordinator's MQTT session) or a server one for `hosts`
        (names or IP addresses: the broker, the gRPC server)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        not_after = min(now + years * _YEAR, self.cert.not_valid_after_utc)
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(common_name))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH]),
                critical=False,
            )
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()), critical=False)
        )
        if hosts:
            names: list[x509.GeneralName] = []
            for host in hosts:
                try:
                    names.append(x509.IPAddress(ipaddress.ip_address(host)))
                except ValueError:
                    names.append(x509.DNSName(host))
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = builder.sign(self._key, hashes.SHA256())
        return Issued(
            cert.public_bytes(_PEM) + self.chain_pem, _key_pem(key), format(cert.serial_number, "x"), not_after
        )

    def ensure_files(
        self, store: Store, common_name: str, kind: str, hosts: tuple[str, ...], cert_path: Path, key_path: Path
    ) -> None:
        """Keep a certificate and its key at these paths: issued once (a client certificate when `hosts` is
        empty, else a server one for them) and again only when the hosts change; each issue is recorded."""
        marker = cert_path.with_suffix(".hosts")
        wanted = ",".join(hosts) or "client"
        if cert_path.exists() and key_path.exists() and marker.exists() and marker.read_text() == wanted:
            return
        issued = self.issue(common_name, client=not hosts, hosts=hosts)
        atomic_write_bytes(key_path, issued.key_pem)
        atomic_write_bytes(cert_path, issued.cert_pem)
        atomic_write_bytes(marker, wanted.encode())
        store.record_certificate(issued.serial, common_name, kind, int(issued.not_after.timestamp() * 1000))

    def write_crl(self, revoked: list[tuple[str, int]]) -> Path:
        """Sign the CRL of (serial hex, revoked at ms) and write it to trust/crl.pem; returns its path. Every
        issuer (the current intermediate and retired ones) signs a CRL of its own over the same serials: a serial
        is random and unique, so each lists what it issued among them, and OpenSSL finds each leaf's."""
        now = dt.datetime.now(dt.UTC)
        pem = b""
        for key, cert in [(self._key, self.cert), *self._retired]:
            builder = (
                x509.CertificateRevocationListBuilder()
                .issuer_name(cert.subject)
                .last_update(now - dt.timedelta(minutes=5))
                .next_update(now + 30 * dt.timedelta(days=1))
            )
            for serial, at_ms in revoked:
                builder = builder.add_revoked_certificate(
                    x509.RevokedCertificateBuilder()
                    .serial_number(int(serial, 16))
                    .revocation_date(dt.datetime.fromtimestamp(at_ms / 1000, dt.UTC))
                    .build()
                )
            pem += builder.sign(key, hashes.SHA256()).public_bytes(_PEM)
        path = self.trust_dir / "crl.pem"
        atomic_write_bytes(path, pem)
        return path
