"""The suite's own scheduling: under `--dist loadgroup` every Ray test goes to one worker (tests/conftest.py), shown
on a small suite run by pytest-xdist in a subprocess with the project's hooks; and the pytest/pytest-xdist pair
that silently grouped nothing is refused in one sentence."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

import tests.conftest as project_conftest
from simulations.processes import run_bounded

SUITE_CONFTEST = "from tests.conftest import pytest_collection_modifyitems, pytest_configure  # noqa: F401\n"
PLAIN = "def test_plain_{n}():\n    pass\n"
RAY = "import pytest\n\n\n@pytest.mark.ray\ndef test_ray_{n}():\n    pass\n"


@pytest.mark.slow
def test_ray_tests_share_one_worker_under_loadgroup(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text(SUITE_CONFTEST)
    (tmp_path / "pytest.ini").write_text("[pytest]\nmarkers =\n    ray: starts Ray\n")
    for n in range(4):  # ray and plain modules alternate: without the groups xdist spreads them over both workers
        (tmp_path / f"test_{n}_ray.py").write_text(RAY.format(n=n))
        (tmp_path / f"test_{n}_plain.py").write_text(PLAIN.format(n=n))
    ini = tmp_path / "pytest.ini"
    args = ["-n", "2", "--dist", "loadgroup", "-v", "-p", "no:cacheprovider", "-c", str(ini), str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}  # for `tests.conftest`
    out = run_bounded([sys.executable, "-m", "pytest", *args], timeout=120, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    ran = re.findall(r"\[(gw\d)\] \[\s*\d+%\] PASSED (\S+)", out.stdout)
    assert len(ran) == 8, out.stdout[-3000:]
    ray = {node: worker for worker, node in ran if "_ray.py" in node}
    assert {node.rsplit("/", 1)[-1] for node in ray} == {
        f"test_{n}_ray.py::test_ray_{n}@ray" for n in range(4)
    }  # grouped: the id says so
    assert len(set(ray.values())) == 1  # and one worker ran them all


@pytest.mark.parametrize(
    ("dist", "versions", "refused"),
    [
        ("loadgroup", {"pytest": "9.2.0", "pytest-xdist": "3.8.0"}, True),
        ("loadgroup", {"pytest": "9.1.1", "pytest-xdist": "3.8.0"}, False),
        ("loadgroup", {"pytest": "9.2.0", "pytest-xdist": "3.9.0"}, False),
        ("no", {"pytest": "9.2.0", "pytest-xdist": "3.8.0"}, False),
    ],
)
def test_the_pair_that_groups_nothing_is_refused(
    monkeypatch: pytest.MonkeyPatch, dist: str, versions: dict[str, str], refused: bool
) -> None:
    monkeypatch.setattr(project_conftest, "version", versions.__getitem__)
    config = SimpleNamespace(option=SimpleNamespace(dist=dist))
    if refused:
        with pytest.raises(pytest.UsageError, match=r"pytest 9\.2\.0 with pytest-xdist 3\.8\.0 does not group"):
            project_conftest.pytest_configure(config)  # type: ignore[arg-type]
    else:
        project_conftest.pytest_configure(config)  # type: ignore[arg-type]
