"""The fleet's certificate authority: who may talk to the coordinator and the broker at all.

DATA/keys/ca-key.pem     the CA key (0600); DATA/trust/ca.pem its certificate, which devices and the broker trust
DATA/tls/                the coordinator's own certificates: its gRPC server certificate and its MQTT client one
DATA/trust/crl.pem       revoked certificates, re-signed at every revocation (Mosquitto's crlfile)

Every certificate is ECDSA P-256 (what Mosquitto's OpenSSL and gRPC's BoringSSL both accept). A device
certificate's common name is the device id: the broker uses it as the MQTT username for the ACL, and the gRPC
server takes the device's identity from it, never from a request body.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edge_agent.contract.files import atomic_write_bytes
from server.errors import CoordinatorError
from server.store import Store

__all__ = ["COORDINATOR_IDENTITY", "FleetCA", "Issued", "serial_of"]

COORDINATOR_IDENTITY = "fedfleet-coordinator"  # the coordinator's MQTT username (common name)
_YEAR = dt.timedelta(days=365)


@dataclass(frozen=True)
class Issued:
    cert_pem: bytes
    key_pem: bytes
    serial: str  # hex
    not_after: dt.datetime


def serial_of(cert_pem: bytes) -> str:
    return format(x509.load_pem_x509_certificate(cert_pem).serial_number, "x")


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedfleet"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class FleetCA:
    def __init__(self, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate, trust_dir: Path) -> None:
        self._key = key
        self.cert = cert
        self.trust_dir = trust_dir

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @classmethod
    def open(cls, keys_dir: Path, trust_dir: Path) -> FleetCA:
        """Load the CA, creating it on first use (data directories made before it existed get one then)."""
        key_path, cert_path = keys_dir / "ca-key.pem", trust_dir / "ca.pem"
        if key_path.exists() and cert_path.exists():
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise CoordinatorError(f"{key_path} is not an EC key")
            return cls(key, x509.load_pem_x509_certificate(cert_path.read_bytes()), trust_dir)
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(_name("fedfleet fleet CA"))
            .issuer_name(_name("fedfleet fleet CA"))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5))
            .not_valid_after(now + 10 * _YEAR)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )  # key_cert_sign, crl_sign
            .sign(key, hashes.SHA256())
        )
        atomic_write_bytes(key_path, _key_pem(key))  # created 0600
        atomic_write_bytes(cert_path, cert.public_bytes(serialization.Encoding.PEM))
        return cls(key, cert, trust_dir)

    def issue(self, common_name: str, client: bool, hosts: tuple[str, ...] = (), years: int = 1) -> Issued:
        """A leaf certificate: a client one (devices, the coordinator's MQTT session) or a server one for `hosts`
        (names or IP addresses: the broker, the gRPC server)."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        not_after = now + years * _YEAR
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
            cert.public_bytes(serialization.Encoding.PEM), _key_pem(key), format(cert.serial_number, "x"), not_after
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
        """Sign a CRL of (serial hex, revoked at ms) and write it to trust/crl.pem; returns its path."""
        now = dt.datetime.now(dt.UTC)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
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
        crl = builder.sign(self._key, hashes.SHA256())
        path = self.trust_dir / "crl.pem"
        atomic_write_bytes(path, crl.public_bytes(serialization.Encoding.PEM))
        return path
