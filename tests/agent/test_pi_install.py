"""The Raspberry Pi install kit: install.sh into a root prefix, the systemd unit, the notify protocol, and
aarch64 wheels for every agent dependency."""

from __future__ import annotations

import contextlib
import shutil
import socket
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from server.datadir import DataDir
from server.trust.enrollment import write_bundle
from simulations.dense_tflite import build_dense_model, random_dense_layers
from simulations.processes import run_bounded, wait_for
from tests.support import enroll_agent

REPO = Path(__file__).resolve().parents[2]
KIT = REPO / "deploy" / "raspberry-pi"


def _bundle(datadir: DataDir, tmp_path: Path) -> Path:
    write_bundle(datadir, "pi-7", tmp_path / "bundle", "lab", {"site": "roof"})
    return tmp_path / "bundle"


def test_install_refuses_an_incomplete_bundle(datadir: DataDir, tmp_path: Path) -> None:
    bundle = _bundle(datadir, tmp_path)
    (bundle / "root.json").unlink()
    out = subprocess.run(
        ["bash", str(KIT / "install.sh"), "--bundle", str(bundle), "--prefix", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 2 and "root.json is missing" in out.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
@pytest.mark.network
@pytest.mark.timeout(900)  # install.sh gets 600 s (below this) to build the agent's virtualenv
def test_install_and_uninstall_in_a_fresh_root_prefix(datadir: DataDir, tmp_path: Path) -> None:
    root = tmp_path / "root"
    out = run_bounded(
        [
            "bash",
            str(KIT / "install.sh"),
            "--bundle",
            str(_bundle(datadir, tmp_path)),
            "--prefix",
            str(root),
            "--package",
            str(REPO),
        ],
        timeout=600,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    venv, conf = root / "opt/fedfleet-agent/venv", root / "etc/fedfleet-agent"
    status = subprocess.run(
        [str(venv / "bin/fedfleet-agent"), "status", "--config", str(conf / "agent.toml"), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert '"device_id": "pi-7"' in status.stdout
    for name in ("agent.toml", "ca.pem", "device.pem"):  # the TLS identity came along
        assert stat.S_IMODE((conf / name).stat().st_mode) == 0o640, name
    # The device's private key: no group or other bits, so applications in the agent's group cannot read it.
    assert stat.S_IMODE((conf / "device-key.pem").stat().st_mode) == 0o600
    assert 'chown "$user":root "$conf/device-key.pem"' in (KIT / "install.sh").read_text()  # as root: the agent's
    assert tomllib.loads((conf / "agent.toml").read_text())["state_dir"] == str(root / "var/lib/fedfleet-agent")
    heavy = [
        m
        for m in ("torch", "flwr", "opacus", "sqlite_utils", "typer")
        if list((venv / "lib").glob(f"python3*/site-packages/{m}"))
    ]
    assert heavy == [], f"the agent-only install pulled in {heavy}"
    # Slimmed (no pip, no test suites, no accelerators a Pi cannot use), and the interpreter still runs a model.
    site = next((venv / "lib").glob("python3*/site-packages"))
    assert not (site / "pip").exists() and not list(site.glob("numpy/**/tests"))
    model = tmp_path / "model.tflite"
    model.write_bytes(build_dense_model(random_dense_layers([64, 16, 10], seed=3)))
    run = subprocess.run(
        [
            str(venv / "bin/python"),
            "-c",
            "import sys, numpy as np, pathlib; from edge_agent.runtime import load_model;"
            "print(load_model(pathlib.Path(sys.argv[1])).predict(np.ones(64, np.float32)).sum())",
            str(model),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert run.returncode == 0 and abs(float(run.stdout.split()[-1]) - 1.0) < 1e-4, run.stderr[-2000:]
    unit = root / "etc/systemd/system/fedfleet-agent.service"
    text = unit.read_text()
    assert "@" not in text.split("[Service]")[1].split("#")[0] and f"ExecStart={venv}/bin/fedfleet-agent run" in text
    for directive in ("Restart=always", "WatchdogSec=", "Type=notify", "ProtectSystem=strict", "NoNewPrivileges=yes"):
        assert directive in text
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing (apt-get install systemd; scripts/setup.sh --dev does)"
    verify = subprocess.run([analyze, "verify", str(unit)], capture_output=True, text=True, check=False)
    assert verify.returncode == 0 and verify.stderr.strip() == "", verify.stderr

    (root / "var/lib/fedfleet-agent/keep-me").write_text("installed models live here")
    subprocess.run(["bash", str(KIT / "uninstall.sh"), "--prefix", str(root)], check=True, capture_output=True)
    assert not venv.exists() and not conf.exists() and not unit.exists()
    assert (root / "var/lib/fedfleet-agent/keep-me").exists()
    subprocess.run(
        ["bash", str(KIT / "uninstall.sh"), "--prefix", str(root), "--purge"], check=True, capture_output=True
    )
    assert not (root / "var/lib/fedfleet-agent").exists()


@pytest.mark.slow
@pytest.mark.network
def test_every_agent_dependency_has_an_aarch64_wheel_for_cpython_311(tmp_path: Path) -> None:
    """Raspberry Pi OS 12 is glibc 2.36: any manylinux tag up to that, for cp311, abi3 or pure Python."""
    deps = [
        d.split(";")[0].strip() for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    ]
    tags = [f"manylinux_2_{v}_aarch64" for v in range(17, 37)] + ["manylinux2014_aarch64"]
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "-q",
        "--only-binary=:all:",
        "--python-version",
        "3.11",
        "--implementation",
        "cp",
        "--abi",
        "cp311",
        "--abi",
        "abi3",
        "--abi",
        "none",
        "-d",
        str(tmp_path),
    ]
    for tag in tags:
        cmd += ["--platform", tag]
    out = run_bounded([*cmd, *deps], timeout=240)  # below pytest's 300 s
    assert out.returncode == 0, out.stderr[-3000:]
    wheels = sorted(p.name for p in tmp_path.glob("*.whl"))
    assert any(w.startswith("ai_edge_litert") and "aarch64" in w for w in wheels), wheels
    assert all(w.endswith(("-none-any.whl", "aarch64.whl")) for w in wheels), wheels


def test_agent_tells_systemd_it_is_ready_and_feeds_the_watchdog(
    datadir: DataDir, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(0.2)
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")  # keep-alives every 0.5 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    agent = enroll_agent(datadir, tmp_path, "pi-sd", extra={"local_endpoint": "off"}).start()
    received: list[str] = []

    def messages() -> bool:
        with contextlib.suppress(TimeoutError):
            received.append(sock.recv(256).decode())
        return received.count("WATCHDOG=1") >= 3

    try:
        wait_for(messages, 30, what="READY=1 and three WATCHDOG=1")
    finally:
        agent.kill()
        sock.close()
    assert received[0] == "READY=1"  # ready first, then keep-alives
