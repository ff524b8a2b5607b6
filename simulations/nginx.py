"""A private nginx serving a static directory over HTTPS on a free loopback port: a TUF mirror for tests and
benchmarks (Debian's package, /usr/sbin/nginx; never the system's instance, its configuration or its logs).

Everything nginx writes (pid, logs, temp files) stays under its work directory. The access log has one
tab-separated line per request: status, method, URI, the Range header, body bytes sent.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

from server.datadir import DataDir
from server.ingest.broker import free_port
from simulations.processes import wait_for

__all__ = ["AccessLogLine", "Nginx", "start_mirror"]


@dataclass(frozen=True)
class AccessLogLine:
    status: int
    method: str
    uri: str
    range: str  # the request's Range header, "" without one
    body_bytes: int


_CONF = """daemon off;
{user}worker_processes {workers};
pid {work}/nginx.pid;
error_log {work}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    log_format fedfleet "$status\\t$request_method\\t$uri\\t$http_range\\t$body_bytes_sent";
    access_log {work}/access.log fedfleet;
    client_body_temp_path {work}/tmp/body;
    proxy_temp_path {work}/tmp/proxy;
    fastcgi_temp_path {work}/tmp/fastcgi;
    uwsgi_temp_path {work}/tmp/uwsgi;
    scgi_temp_path {work}/tmp/scgi;
    default_type application/octet-stream;
    types {{ application/json json; }}
    sendfile on;
    keepalive_requests 10000;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        ssl_protocols TLSv1.2 TLSv1.3;
        root {root};
        autoindex off;
        location ~ /\\. {{ return 404; }}
    }}
}}
"""


class Nginx:
    """nginx serving `root` at https://127.0.0.1:PORT/ with the certificate and key given (PEM files)."""

    def __init__(self, workdir: Path, root: Path, cert: Path, key: Path, workers: int = 1) -> None:
        self.binary = shutil.which("nginx") or "/usr/sbin/nginx"
        if not Path(self.binary).exists():
            raise RuntimeError("nginx is not installed: apt-get install -y nginx-light (scripts/setup.sh does this)")
        self.workdir = workdir
        (workdir / "tmp").mkdir(parents=True, exist_ok=True)
        self.root, self.cert, self.key, self.workers = root, cert, key, workers
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0
        for attempt in range(5):
            self.port = free_port()
            try:
                self.start()
                return
            except RuntimeError as e:
                if "Address already in use" not in str(e) or attempt == 4:
                    raise

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/"

    @property
    def access_log(self) -> Path:
        return self.workdir / "access.log"

    @property
    def error_log(self) -> Path:
        return self.workdir / "error.log"

    def start(self) -> None:
        conf = self.workdir / "nginx.conf"
        conf.write_text(
            _CONF.format(
                work=self.workdir.resolve(),
                port=self.port,
                cert=self.cert.resolve(),
                key=self.key.resolve(),
                root=self.root.resolve(),
                workers=self.workers,
                # As root, nginx's workers would run as nobody and could not read a mirror written 0600 (like the
                # test Mosquitto's `user root`); as anyone else they run as that user.
                user="user root;\n" if os.geteuid() == 0 else "",
            )
        )
        with (self.workdir / "stderr.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [self.binary, "-p", str(self.workdir.resolve()), "-c", str(conf), "-e", str(self.error_log.resolve())],
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        proc = self.proc
        wait_for(lambda: proc.poll() is not None or self._accepting(), 10, what="nginx listening")
        if proc.poll() is not None:
            self.proc = None
            errors = self.error_log.read_text(errors="replace") if self.error_log.exists() else ""
            raise RuntimeError(f"nginx exited ({proc.returncode}): {errors[-2000:]}")

    def _accepting(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                return True
        except OSError:
            return False

    def requests(self) -> list[AccessLogLine]:
        """Every request logged so far (nginx writes a line when a response ends)."""
        if not self.access_log.exists():
            return []
        lines = []
        for line in self.access_log.read_text(errors="replace").splitlines():
            status, method, uri, range_, sent = line.split("\t")
            lines.append(AccessLogLine(int(status), method, uri, "" if range_ == "-" else range_, int(sent)))
        return lines

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                os.killpg(self.proc.pid, signal.SIGTERM)  # the master and its workers
            self.proc.wait(10)
            self.proc = None


def start_mirror(d: DataDir, root: Path) -> Nginx:
    """The mirror `fedfleet serve` keeps (mirror_dirs), served by nginx over HTTPS with a fleet-CA certificate."""
    timestamp = d.repository_dir / "metadata" / "timestamp.json"
    published = root / "mirror" / "metadata" / "timestamp.json"
    wait_for(lambda: published.exists() and published.read_bytes() == timestamp.read_bytes(), 60, what="mirror sync")
    issued = d.ca().issue("mirror", client=False, hosts=("127.0.0.1",))
    (root / "nginx").mkdir()
    cert, key = root / "nginx" / "mirror.pem", root / "nginx" / "mirror-key.pem"
    cert.write_bytes(issued.cert_pem)
    key.write_bytes(issued.key_pem)
    return Nginx(root / "nginx", root / "mirror", cert, key, workers=1)
