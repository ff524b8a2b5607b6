"""nginx as a TUF mirror in tests: a private instance (simulations/nginx.py) serving HTTPS with a server
certificate from the data directory's fleet CA, which the agent verifies (its tls_ca)."""

from __future__ import annotations

from pathlib import Path

from server.datadir import DataDir
from simulations.nginx import AccessLogLine, Nginx

__all__ = ["AccessLogLine", "Nginx", "mirror_nginx"]


def mirror_nginx(d: DataDir, workdir: Path, root: Path) -> Nginx:
    """nginx serving `root` over HTTPS for 127.0.0.1, with a certificate the fleet CA of `d` issued."""
    issued = d.ca().issue("mirror", client=False, hosts=("127.0.0.1", "localhost"))
    workdir.mkdir(parents=True, exist_ok=True)
    cert, key = workdir / "mirror.pem", workdir / "mirror-key.pem"
    cert.write_bytes(issued.cert_pem)
    key.write_bytes(issued.key_pem)
    key.chmod(0o600)
    return Nginx(workdir, root, cert, key)
