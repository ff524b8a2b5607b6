#!/usr/bin/env bash
# Set up (scripts/setup.sh --dev) and run every check: pip check, generated code, lint, format, types, the import
# contract, the agent installed alone, and the test suite. CI runs exactly this (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --dev
py=.venv/bin/python

echo "== the installed packages agree with each other (pip check)"
$py -m pip check
echo "== generated protobuf code is current"
$py scripts/gen_protos.py --check
echo "== ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== mypy (strict)"
.venv/bin/mypy
echo "== import contract: the agent never imports the server or heavy packages"
.venv/bin/lint-imports

echo "== the agent installed alone, without extras"
agent_venv=$(mktemp -d)/agent-venv
python3 -m venv "$agent_venv"
"$agent_venv/bin/python" -m pip install -q --upgrade pip
"$agent_venv/bin/python" -m pip install -q .
"$agent_venv/bin/fedfleet-agent" --help >/dev/null
"$agent_venv/bin/python" - <<'PY'
import importlib.util, sys
import edge_agent.agent, edge_agent.cli  # the whole agent imports with the base dependencies only
heavy = [m for m in ("torch", "flwr", "opacus", "sqlite_utils", "typer", "litert_torch", "sklearn") if importlib.util.find_spec(m)]
if heavy:
    sys.exit(f"the agent-only install pulled in {heavy}")
print("agent-only install: fedfleet-agent --help works, no server packages installed")
PY
echo "agent-only venv (plain pip install; install.sh slims it further): $(du -sm "$agent_venv" | cut -f1) MB"
rm -rf "$(dirname "$agent_venv")"

echo "== tests"
# Two workers by default (FEDFLEET_TEST_WORKERS=0: one process). --dist loadgroup keeps every test that starts
# Flower's Ray engine on one worker (tests/conftest.py groups them), so two workers never start Ray at once.
# The slowest 30 tests are listed at the end of every run, so a test that grows slow shows in CI.
$py -m pytest -n "${FEDFLEET_TEST_WORKERS:-2}" --dist loadgroup --durations=30 "$@"
