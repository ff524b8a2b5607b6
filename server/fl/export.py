"""From a registered model version to a signed release: export to TFLite with litert-torch, check parity in the
interpreter the agent uses, optionally quantize to int8 (ai-edge-quantizer), attach the federated drift
reference, a held-out probe set and the model card, and publish through the secure update path.

Export is deterministic: the same version gives the same bytes, so repeating a release changes nothing.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from edge_agent.contract.arrays import encode_array
from edge_agent.runtime import load_model
from server.datadir import DataDir
from server.errors import ReleaseError
from server.fl.data import FEATURES, held_out
from server.fl.model import DigitsNet, predict_proba, set_weights
from server.fl.registry import ModelVersion, Registry, model_card, model_card_markdown
from server.trust.releases import PublishResult, publish_release

__all__ = ["PARITY_TOLERANCE", "ExportReport", "export_tflite", "parity", "release_model_version"]

PARITY_TOLERANCE = 1e-4  # max |TFLite - PyTorch| over held-out inputs, float export
PROBE_COUNT = 4
QUANTIZATIONS = ("int8",)


@dataclass(frozen=True)
class ExportReport:
    release: PublishResult
    facts: dict[str, Any]  # converter, quantize, parity_max_abs_diff, bytes, float_bytes, accuracy_* (held-out)


def export_tflite(weights: list[np.ndarray]) -> bytes:
    """The network with a softmax head (the agent reads class probabilities), converted by litert-torch."""
    os.environ.setdefault("LITERT_TORCH_SHOW_PROGRESS", "n")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # the converter's C++ op-count notices
    logging.getLogger("torchao").setLevel(logging.ERROR)  # optional CUDA kernels it cannot load on a CPU machine
    import litert_torch

    net = DigitsNet()
    set_weights(net, weights)
    module = torch.nn.Sequential(net, torch.nn.Softmax(dim=-1)).eval()
    sample = (torch.zeros(1, FEATURES),)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.tflite"
        try:
            with warnings.catch_warnings():
                # torch's export passes warn about their own deprecations (pytree LeafSpec); not ours to fix.
                warnings.simplefilter("ignore", FutureWarning)
                warnings.simplefilter("ignore", DeprecationWarning)
                litert_torch.convert(module, sample).export(str(path))
        except Exception as e:  # a converter failure is the release's failure, with the converter's words
            raise ReleaseError(f"litert-torch could not convert the model: {e}") from e
        return path.read_bytes()


def quantize_int8(model: bytes) -> bytes:
    """Dynamic-range int8 (weights int8, activations float) with ai-edge-quantizer: needs no calibration data."""
    from ai_edge_quantizer import quantizer, recipe

    q = quantizer.Quantizer(model)
    q.load_quantization_recipe(recipe.dynamic_wi8_afp32())
    with contextlib.redirect_stdout(io.StringIO()):  # it prints its size ratio
        result = q.quantize()
    if result.quantized_model is None:
        raise ReleaseError("ai-edge-quantizer returned no model")
    return bytes(result.quantized_model)


def _tflite_outputs(model: bytes, x: np.ndarray) -> np.ndarray:
    with tempfile.NamedTemporaryFile(suffix=".tflite") as f:
        f.write(model)
        f.flush()
        m = load_model(Path(f.name))
        return np.concatenate([m.predict(row[None]) for row in x])


def parity(model: bytes, weights: list[np.ndarray], x: np.ndarray) -> tuple[float, np.ndarray, np.ndarray]:
    """(max |TFLite - PyTorch| over x, TFLite outputs, PyTorch outputs), TFLite run in the agent's interpreter."""
    tflite, torch_out = _tflite_outputs(model, x), predict_proba(weights, x)
    return float(np.abs(tflite - torch_out).max()), tflite, torch_out


def _release_extra(m: ModelVersion, report: dict[str, Any]) -> dict[str, Any]:
    card = model_card(m)
    card["export"] = report
    return {"drift_reference": m.reference, "model_card": card, "model_card_markdown": model_card_markdown(m)}


def release_model_version(d: DataDir, version: str, quantize: str = "", actor: str = "cli") -> ExportReport:
    """Export, check, describe, sign and publish `version` as release `name@seq` (`name@seq-int8` quantized)."""
    if quantize and quantize not in QUANTIZATIONS:
        raise ReleaseError(f"unknown quantization {quantize!r}; choose from {', '.join(QUANTIZATIONS)}")
    with d.store() as store:
        m = Registry(store).get(version)
        seed = int(m.lineage["plan"]["seed"])
        x_test, y_test = held_out(seed)
        float_model = export_tflite(m.weights)
        diff, float_out, torch_out = parity(float_model, m.weights, x_test)
        if diff > PARITY_TOLERANCE:
            raise ReleaseError(f"parity check failed: TFLite and PyTorch differ by {diff:.2e} (> {PARITY_TOLERANCE:g})")
        torch_accuracy = float((torch_out.argmax(1) == y_test).mean())
        float_accuracy = float((float_out.argmax(1) == y_test).mean())
        data, outputs, accuracy = float_model, float_out, float_accuracy
        if quantize:
            data = quantize_int8(float_model)
            outputs = _tflite_outputs(data, x_test)
            accuracy = float((outputs.argmax(1) == y_test).mean())
        report = {
            "converter": "litert-torch",
            "quantize": quantize or "none",
            "parity_max_abs_diff": diff,
            "bytes": len(data),
            "float_bytes": len(float_model),
            "accuracy_tflite": accuracy,
            "accuracy_float_tflite": float_accuracy,
            "accuracy_torch": torch_accuracy,
        }
        probe = {
            "inputs": encode_array(x_test[:PROBE_COUNT]),
            "outputs": encode_array(outputs[:PROBE_COUNT].astype(np.float32)),
            "atol": "1e-4",
            "source": "held-out",
        }
        name, seq = m.name, str(m.seq) + ("-int8" if quantize else "")
        result = publish_release(
            d.repository(),
            store,
            data,
            name,
            seq,
            probe=probe,
            extra=_release_extra(m, report),
            policy=d.policy(),
            actor=actor,
        )
        return ExportReport(result, report)
