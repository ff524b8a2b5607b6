"""What keeps a running agent small (issue 22): the unit's -OO and its bytecode cache (edge_agent.bytecode), and
the modules a running agent does not import. Resident memory itself is measured by benchmarks/agent_footprint.py."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
KIT = REPO / "deploy" / "raspberry-pi"


def _python(args: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if k not in ("PYTHONDONTWRITEBYTECODE", "PYTHONOPTIMIZE")}
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, check=False, env={**base, **(env or {})}, cwd=REPO
    )


def test_the_unit_runs_the_agent_with_OO_and_the_bytecode_install_sh_compiles() -> None:
    # Prepare
    unit = (KIT / "fedfleet-agent.service.in").read_text()
    install = (KIT / "install.sh").read_text()
    # Execute
    environment = re.findall(r"^Environment=(.*)$", unit, re.MULTILINE)
    # Assert
    assert environment == ["PYTHONOPTIMIZE=2 PYTHONPYCACHEPREFIX=@PYCACHE@"]
    assert "s|@PYCACHE@|$pycache|g" in install
    assert 'PYTHONPYCACHEPREFIX="$pycache" "$venv/bin/python" -OO -m edge_agent.bytecode' in install
    assert 'rm -rf "$pycache"' in install  # an upgrade starts from an empty cache
    assert "ReadWritePaths=@STATE@" in unit and "@PYCACHE@" not in unit.split("ReadWritePaths=")[1].split("\n")[0]


def test_bytecode_compiles_the_agent_and_what_it_imports_later_into_the_cache(tmp_path: Path) -> None:
    # Prepare
    cache = tmp_path / "pycache"
    # Execute
    out = _python(["-OO", "-m", "edge_agent.bytecode"], {"PYTHONPYCACHEPREFIX": str(cache)})
    # Assert
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.startswith("   interpreter: ")
    compiled = {p.name.split(".")[0] for p in cache.rglob("*.opt-2.pyc")}
    assert {"agent", "tuf_client", "updater", "_channel", "_strptime", "fractions"} <= compiled
    assert all(".opt-2." in p.name for p in cache.rglob("*.pyc"))  # -OO bytecode only: what the unit's agent reads


def test_bytecode_refuses_to_run_without_OO(tmp_path: Path) -> None:
    # Execute
    out = _python(["-m", "edge_agent.bytecode"], {"PYTHONPYCACHEPREFIX": str(tmp_path)})
    # Assert
    assert out.returncode == 1 and "python -OO" in out.stderr
    assert not list(tmp_path.rglob("agent.*.pyc"))  # it stopped before importing the agent


_AGENT_IMPORTS = """
import json, sys
import edge_agent.cli, edge_agent.agent
from edge_agent.runtime import interpreter_name
name = interpreter_name()
loaded = [m for m in ("importlib.metadata", "fractions", "decimal") if m in sys.modules]
from importlib import metadata
print(json.dumps([name, metadata.version(name.split()[0]), loaded]))
"""


def test_a_running_agent_imports_neither_package_metadata_nor_fractions() -> None:
    """importlib.metadata (with email, zipfile, csv) and fractions (with decimal) cost about 1.2 MB resident; the
    interpreter's version comes from its package, the exact ε arithmetic is imported by a monitoring budget."""
    # Execute
    out = _python(["-c", _AGENT_IMPORTS])
    # Assert
    assert out.returncode == 0, out.stderr[-2000:]
    name, version, loaded = json.loads(out.stdout.strip().splitlines()[-1])
    assert name.split()[1] == version  # the version the distribution's metadata names
    assert loaded == []
