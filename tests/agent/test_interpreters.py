"""One runtime wrapper, both interpreters: ai-edge-litert here, tflite-runtime 2.14 (numpy<2, older Pi images)
in a virtualenv of its own, on the same model bytes and probe set."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_agent.contract.arrays import decode_array, encode_array
from edge_agent.runtime import ProbeFailed, interpreter_name, load_model
from server.trust.releases import auto_probe
from simulations.dense_tflite import build_dense_model, random_dense_layers
from simulations.processes import run_bounded

REPO = Path(__file__).resolve().parents[2]

SCRIPT = """
import json, sys
import numpy as np
from edge_agent.contract.arrays import decode_array
from edge_agent.runtime import ModelOptions, interpreter_name, load_model
model = load_model(__import__("pathlib").Path(sys.argv[1]))
plain = load_model(__import__("pathlib").Path(sys.argv[1]), options=ModelOptions(xnnpack=False))
probe = json.loads(open(sys.argv[2]).read())
worst = model.run_probe(probe)
x = decode_array(probe["inputs"])
print(json.dumps({"interpreter": interpreter_name(), "numpy": np.__version__, "worst": worst,
                  "outputs": [model.predict(v).ravel().tolist() for v in x],
                  "ops": [op["op_name"] for op in model.interpreter._get_ops_details()],
                  "plain_ops": [op["op_name"] for op in plain.interpreter._get_ops_details()],
                  "plain_worst": plain.run_probe(probe)}))
"""


@pytest.mark.slow
@pytest.mark.network
@pytest.mark.timeout(900)  # the install gets 600 s (below this) on a slow index
def test_tflite_runtime_runs_the_same_model_and_probe(tmp_path: Path) -> None:
    venv = tmp_path / "old-pi"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    install = run_bounded(
        [str(venv / "bin/python"), "-m", "pip", "install", "-q", "numpy<2", "tflite-runtime==2.14.0"], timeout=600
    )
    assert install.returncode == 0, install.stderr[-2000:]
    model_path = tmp_path / "m.tflite"
    model_path.write_bytes(build_dense_model(random_dense_layers([64, 32, 10], 5)))
    here = load_model(model_path)
    probe = auto_probe(here, "ab" * 32)
    (tmp_path / "probe.json").write_text(json.dumps(probe))
    out = subprocess.run(
        [str(venv / "bin/python"), "-c", SCRIPT, str(model_path), str(tmp_path / "probe.json")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    there = json.loads(out.stdout.strip().splitlines()[-1])
    assert there["interpreter"].startswith("tflite-runtime 2.14") and there["numpy"].startswith("1.")
    assert interpreter_name().startswith("ai-edge-litert")
    ours = np.stack([here.predict(v) for v in decode_array(probe["inputs"])])
    assert np.max(np.abs(np.asarray(there["outputs"]) - ours.reshape(len(ours), -1))) <= 1e-5
    assert there["worst"] <= 1e-4
    # xnnpack = false works there too: the same op resolver enum, no delegate node, the probe still passes.
    assert "DELEGATE" in there["ops"] and "DELEGATE" not in there["plain_ops"] and there["plain_worst"] <= 1e-4


def test_a_wrong_probe_fails_in_the_interpreter(tmp_path: Path) -> None:
    model_path = tmp_path / "m.tflite"
    model_path.write_bytes(build_dense_model(random_dense_layers([64, 32, 10], 5)))
    model = load_model(model_path)
    probe = auto_probe(model, "cd" * 32)
    wrong = {**probe, "outputs": encode_array(np.zeros((4, 1, 10), dtype=np.float32))}
    with pytest.raises(ProbeFailed, match="differs by"):
        model.run_probe(wrong)
    assert model.run_probe(probe) <= 1e-6
