"""The Raspberry Pi install proven on arm64: a Debian bookworm arm64 root built with debootstrap from this
machine's Debian mirror, run through qemu-user-static. Inside it deploy/raspberry-pi/install.sh installs the
agent from the package index's aarch64 wheels; the installed agent, emulated, registers with a coordinator on
loopback, installs and commits a release after `fedfleet assign`, and serves an inference.

Needs root (debootstrap, chroot, mounts, binfmt_misc), debootstrap and qemu-user-static (scripts/setup.sh
installs both), and the internet (the Debian mirror, the package index). The finished debootstrap root is cached
as a tarball in pytest's temporary area (/tmp/pytest-of-USER), so a second run on the same machine skips the
2.5 to 3.5 minutes of debootstrap; CI starts clean and builds it."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.runtime import load_model
from server.datadir import DataDir
from server.trust.enrollment import write_bundle
from server.trust.releases import publish_release
from simulations.dense_tflite import build_dense_model, random_dense_layers
from simulations.processes import kill_tree, run_bounded, wait_for
from tests.agent.test_telemetry import FEATURES, digits_reference
from tests.support import CoordinatorProcess, Mosquitto, fedfleet

pytestmark = [pytest.mark.slow, pytest.mark.network, pytest.mark.broker, pytest.mark.timeout(1500)]

REPO = Path(__file__).resolve().parents[2]
SUITE = "bookworm"  # Raspberry Pi OS 12 is Debian 12
PACKAGES = "python3,python3-venv,ca-certificates"
QEMU = Path("/usr/bin/qemu-aarch64-static")
BINFMT = Path("/proc/sys/fs/binfmt_misc")
# The qemu-user-static package's own registration (flags F: the interpreter is opened now, so it works in a chroot).
BINFMT_CONF = Path("/usr/lib/binfmt.d/qemu-aarch64.conf")
DEVICE = "pi-arm64"
VENV = "/opt/fedfleet-agent/venv"
CONF = "/etc/fedfleet-agent/agent.toml"
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def debian_mirror(sources: Path = Path("/etc/apt")) -> str:
    """The mirror this machine's apt uses for the bookworm suite (one-line .list or deb822 .sources)."""
    for path in [sources / "sources.list", *sorted((sources / "sources.list.d").glob("*"))]:
        if not path.is_file() or path.suffix not in (".list", ".sources"):
            continue
        text = path.read_text()
        if path.suffix == ".sources":
            for stanza in re.split(r"\n\s*\n", text):
                fields: dict[str, list[str]] = {}
                for line in stanza.splitlines():
                    if ":" in line and not line.lstrip().startswith("#"):
                        key, value = line.split(":", 1)
                        fields[key.strip().lower()] = value.split()
                if "deb" in fields.get("types", []) and SUITE in fields.get("suites", []) and fields.get("uris"):
                    return fields["uris"][0]
        else:
            for line in text.splitlines():
                words = re.sub(r"\[[^]]*\]", "", line.split("#", 1)[0]).split()
                if len(words) >= 3 and words[0] == "deb" and words[2] == SUITE:
                    return words[1]
    raise AssertionError(f"no `deb … {SUITE}` source in {sources}: which Debian mirror does this machine use?")


def _ensure_binfmt() -> None:
    """aarch64 binaries run through qemu: binfmt_misc mounted and the interpreter registered (the package
    registers it on a machine with systemd-binfmt; a container may not have run that)."""
    assert QEMU.exists(), f"{QEMU} is missing: apt-get install qemu-user-static (scripts/setup.sh --dev does)"
    if not (BINFMT / "register").exists():
        subprocess.run(["mount", "-t", "binfmt_misc", "binfmt_misc", str(BINFMT)], check=True, capture_output=True)
    if not (BINFMT / "qemu-aarch64").exists():
        (BINFMT / "register").write_text(BINFMT_CONF.read_text().strip())
    assert (BINFMT / "qemu-aarch64").read_text().startswith("enabled"), "binfmt_misc: qemu-aarch64 is disabled"


def _cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """pytest's temporary area for this user (it outlives one run; CI starts without it)."""
    base = tmp_path_factory.getbasetemp()
    for parent in (base, *base.parents):
        if parent.name.startswith("pytest-of-"):
            return parent
    return base


def _debootstrap(root: Path, cache: Path) -> str:
    """A bookworm arm64 minbase root with python3-venv at `root`, from the cached tarball when there is one.
    Returns how it was made."""
    mirror = debian_mirror()
    key = hashlib.sha256(f"{SUITE} arm64 minbase {PACKAGES} {mirror}".encode()).hexdigest()[:12]
    tarball = cache / f"fedfleet-{SUITE}-arm64-{key}.tar"
    root.mkdir()
    if tarball.exists():
        subprocess.run(["tar", "-xpf", str(tarball), "--numeric-owner", "-C", str(root)], check=True)
        return f"from the cached {tarball.name}"
    start = time.monotonic()
    cmd = ["debootstrap", "--arch=arm64", "--variant=minbase", f"--include={PACKAGES}", SUITE, str(root), mirror]
    out = run_bounded(cmd, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    partial = tarball.with_suffix(".tar.partial")
    subprocess.run(["tar", "-cpf", str(partial), "--numeric-owner", "-C", str(root), "."], check=True)
    partial.replace(tarball)
    return f"debootstrap from {mirror} in {time.monotonic() - start:.0f} s"


def _copy_host_trust_and_pip_config(root: Path) -> list[str]:
    """What pip on this machine needs to reach the package index: its CA bundle and configuration files. A
    configuration's local paths (find-links, file:// indexes) do not exist in the root; pip passes them by."""
    copied = []
    for name in ("/etc/ssl/certs/ca-certificates.crt", "/etc/resolv.conf", "/etc/pip.conf"):
        if Path(name).is_file():
            shutil.copyfile(name, root / name.lstrip("/"))
            copied.append(name)
    for directory in ("/etc/xdg/pip", str(Path.home() / ".config/pip")):
        if Path(directory).is_dir():
            target = root / ("root/.config/pip" if directory.startswith(str(Path.home())) else directory.lstrip("/"))
            shutil.copytree(directory, target, dirs_exist_ok=True)
            copied.append(directory)
    return copied


def _pi_cpuinfo(cpus: int) -> str:
    """A Raspberry Pi 4's /proc/cpuinfo (Cortex-A72), one entry per CPU. Bookworm's qemu-user (7.2) shows an
    emulated program the host's x86 /proc/cpuinfo, and LiteRT, detecting the CPU from it, dies with a
    segmentation fault as it loads a model."""
    cpu = "BogoMIPS\t: 108.00\nFeatures\t: fp asimd evtstrm crc32 cpuid\nCPU implementer\t: 0x41\n"
    cpu += "CPU architecture: 8\nCPU variant\t: 0x0\nCPU part\t: 0xd08\nCPU revision\t: 3\n"
    entries = [f"processor\t: {i}\n{cpu}" for i in range(cpus)]
    return "\n".join([*entries, "Revision\t: c03111\nModel\t\t: Raspberry Pi 4 Model B Rev 1.1\n"])


def _mounts(root: Path) -> list[tuple[Path, list[str]]]:
    """What the root gets mounted, in order; its /proc/cpuinfo is a Pi's (written beside the root)."""
    return [
        (root / "proc", ["-t", "proc", "proc"]),
        (root / "proc/cpuinfo", ["--bind", str(root.parent / "pi-cpuinfo")]),
        (root / "sys", ["-t", "sysfs", "sysfs"]),
        (root / "dev", ["--bind", "/dev"]),
    ]


def _unmount(root: Path) -> list[str]:
    """Stop whatever still runs inside the root, then unmount what was mounted there; returns what failed."""
    real = str(root.resolve())
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            if os.readlink(proc / "root") == real:
                kill_tree(int(proc.name))
    failed = []
    for target, _ in reversed(_mounts(root)):
        if os.path.ismount(target):
            done = subprocess.run(["umount", str(target)], capture_output=True, check=False).returncode == 0
            if not done and subprocess.run(["umount", "-l", str(target)], check=False).returncode != 0:
                failed.append(str(target))
    return failed


@pytest.fixture
def arm64_root(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """An emulated Debian bookworm arm64 root with /proc, /sys and /dev mounted, unmounted whatever happens."""
    assert os.geteuid() == 0, "this test builds a chroot: run it as root (CI does)"
    assert shutil.which("debootstrap"), "debootstrap is missing: apt-get install debootstrap"
    _ensure_binfmt()
    root = tmp_path / "arm64-root"
    made = _debootstrap(root, _cache_dir(tmp_path_factory))
    print(f"arm64 root: {made}")
    copied = _copy_host_trust_and_pip_config(root)
    print(f"copied into the root: {', '.join(copied)}")
    (root.parent / "pi-cpuinfo").write_text(_pi_cpuinfo(os.cpu_count() or 1))
    try:
        for target, how in _mounts(root):
            subprocess.run(["mount", *how, str(target)], check=True, capture_output=True)
        arch = subprocess.run(["chroot", str(root), "uname", "-m"], capture_output=True, text=True, check=True)
        assert arch.stdout.strip() == "aarch64", arch.stdout
        yield root
    finally:
        failed = _unmount(root)
        assert not failed, f"could not unmount {failed}"


def _chroot_env() -> dict[str, str]:
    """A clean environment for the root: the pip settings this machine uses (its PIP_* variables; paths to
    the CA bundle are the same inside, since it was copied to the same place), nothing else of the host's."""
    env = {"PATH": PATH, "HOME": "/root", "LANG": "C.UTF-8"}
    env.update({k: v for k, v in os.environ.items() if k.startswith("PIP_") or k.endswith("_CA_BUNDLE")})
    env.update({k: os.environ[k] for k in ("SSL_CERT_FILE", "SSL_CERT_DIR") if k in os.environ})
    return env


def _in_root(root: Path, *args: str, timeout: float = 120, user: str | None = None) -> subprocess.CompletedProcess[str]:
    spec = [f"--userspec={user}:{user}"] if user else []
    return run_bounded(["chroot", *spec, str(root), *args], timeout=timeout, env=_chroot_env())


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


EM_AARCH64 = 183


def _elf_machine(path: Path) -> int:
    header = path.read_bytes()[:20]
    assert header[:4] == b"\x7fELF", path
    return int.from_bytes(header[18:20], "little")


def _while_running(agent: subprocess.Popen[bytes], log: Path, predicate: Callable[[], Any]) -> Callable[[], Any]:
    """`predicate` for wait_for, failing at once when the agent has exited (under qemu, a crash in native code
    kills it with no Python traceback) instead of waiting out the timeout."""

    def check() -> Any:
        assert agent.poll() is None, f"the arm64 agent exited with {agent.returncode}: {log.read_text()[-2000:]}"
        return predicate()

    return check


def _tree_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink()) / 1e6


def _source_copy(tmp_path: Path) -> Path:
    """What the wheel is built from, copied out of the checkout (setuptools writes build/ beside its input)."""
    source = tmp_path / "source"
    skip = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in ("edge_agent", "server", "simulations"):
        shutil.copytree(REPO / name, source / name, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    return source


def test_the_pi_install_runs_the_agent_on_arm64(
    arm64_root: Path, datadir: DataDir, mosquitto: Mosquitto, tmp_path: Path
) -> None:
    # Prepare: the project's wheel and the install kit in the root, a release and a coordinator on loopback.
    root, started = arm64_root, time.monotonic()
    wheels = tmp_path / "wheels"
    built = run_bounded(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(_source_copy(tmp_path))],
        timeout=300,
    )
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = wheels.glob("fedfleet-*.whl")
    shutil.copy(wheel, root / "root" / wheel.name)
    shutil.copytree(REPO / "deploy" / "raspberry-pi", root / "root" / "raspberry-pi")
    model = build_dense_model(random_dense_layers([FEATURES, 16, 10], 7))
    store = datadir.store()
    publish_release(
        datadir.repository(),
        store,
        model,
        "digits",
        "1.0.0",
        extra={"drift_reference": digits_reference().to_metadata()},
    )
    coordinator = CoordinatorProcess(datadir, mosquitto.url).start()
    write_bundle(
        datadir,
        DEVICE,
        root / "root" / "bundle",
        "lab",
        {"hw": "pi4"},
        coordinator.endpoints["grpc"],
        coordinator.endpoints["mqtt"],
        extra={"retry_seconds": 0.5},
    )
    agent: subprocess.Popen[bytes] | None = None
    try:
        # Execute: install.sh as on a Pi (as root, no prefix; no systemd in a chroot, so nothing is started).
        t = time.monotonic()
        install = _in_root(
            root,
            "bash",
            "/root/raspberry-pi/install.sh",
            "--bundle",
            "/root/bundle",
            "--package",
            f"/root/{wheel.name}",
            timeout=900,
        )
        install_seconds = time.monotonic() - t
        assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
        assert "interpreter: " in install.stdout, install.stdout
        venv = root / VENV.lstrip("/")
        site = next((venv / "lib").glob("python3*/site-packages"))
        litert = [p.name for p in site.glob("ai_edge_litert*.dist-info")]
        assert litert, "ai-edge-litert was not installed"
        native = next(site.glob("numpy/**/_multiarray_umath*.so"))
        assert _elf_machine(native) == EM_AARCH64, native  # the index's aarch64 wheels, not the host's

        log = tmp_path / "agent.log"  # conftest checks it for tracebacks
        with log.open("ab") as f:
            agent = subprocess.Popen(
                [
                    "chroot",
                    "--userspec=fedfleet:fedfleet",
                    str(root),
                    f"{VENV}/bin/fedfleet-agent",
                    "run",
                    "--config",
                    CONF,
                ],
                stdout=f,
                stderr=subprocess.STDOUT,
                env=_chroot_env(),
                start_new_session=True,
            )
        running = functools.partial(_while_running, agent, log)
        wait_for(running(lambda: store.is_device(DEVICE)), 120, interval=0.5, what="the arm64 agent's registration")
        t = time.monotonic()
        assigned = fedfleet(datadir, "assign", DEVICE, "digits@1.0.0")
        assert assigned.returncode == 0, assigned.stdout + assigned.stderr
        wait_for(
            running(lambda: store.device(DEVICE)["running_release"] == "digits@1.0.0"),
            120,
            interval=0.2,
            what="the release committed on arm64",
        )
        commit_seconds = time.monotonic() - t
        x = np.linspace(0, 1, FEATURES, dtype=np.float32)
        sock = root / "var/lib/fedfleet-agent/agent.sock"
        wait_for(running(sock.exists), 60, interval=0.5, what="the local endpoint")
        inferred = _in_root(
            root,
            f"{VENV}/bin/fedfleet-agent",
            "infer",
            "--config",
            CONF,
            "--input",
            ",".join(f"{v:.9g}" for v in x),
            "--json",
        )
        status = _in_root(root, f"{VENV}/bin/fedfleet-agent", "status", "--config", CONF, "--json")
        rss = _rss_mb(agent.pid)
    finally:
        if agent is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(agent.pid, signal.SIGKILL)
            agent.wait(10)
        coordinator.kill()
        store.close()

    # Assert: the device committed the release and answers with what the x86 interpreter computes.
    assert inferred.returncode == 0, inferred.stderr
    answer = json.loads(inferred.stdout)
    assert answer["release"] == "digits@1.0.0"
    expected = load_model_output(model, x, tmp_path)
    diff = float(np.max(np.abs(np.asarray(answer["output"], np.float32) - expected)))
    assert diff < 1e-4, f"arm64 output differs from x86 by {diff}"
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["release"] == "digits@1.0.0", status.stdout
    installed = _tree_mb(root / VENV.lstrip("/"))
    print(
        f"arm64: install.sh {install_seconds:.0f} s, venv {installed:.0f} MB; committed {commit_seconds:.1f} s after "
        f"`fedfleet assign`; inference max diff vs x86 {diff:.1e}; agent RSS under qemu {rss:.0f} MB "
        f"(qemu's translator included); test {time.monotonic() - started:.0f} s"
    )


def load_model_output(model: bytes, x: np.ndarray, tmp_path: Path) -> np.ndarray:
    path = tmp_path / "x86.tflite"
    path.write_bytes(model)
    return np.asarray(load_model(path).predict(x), np.float32)
