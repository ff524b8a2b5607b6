"""One wrapper over the TFLite interpreters a device may have.

`ai-edge-litert` (numpy 2) is preferred; `tflite-runtime` 2.14 (numpy<2, older Pi images) is the fallback.
Both expose the same `Interpreter` API, so everything else here is shared.
"""

from __future__ import annotations

import functools
import importlib
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edge_agent.contract.arrays import decode_array
from edge_agent.contract.reasons import Reason
from edge_agent.errors import InterpreterError

__all__ = ["Model", "ProbeFailed", "interpreter_name", "load_model"]

_BACKENDS = (("ai_edge_litert.interpreter", "ai-edge-litert"), ("tflite_runtime.interpreter", "tflite-runtime"))


class _Interpreter(Protocol):
    def allocate_tensors(self) -> None: ...
    def get_input_details(self) -> list[dict[str, Any]]: ...
    def get_output_details(self) -> list[dict[str, Any]]: ...
    def set_tensor(self, index: int, value: np.ndarray) -> None: ...
    def invoke(self) -> None: ...
    def get_tensor(self, index: int) -> np.ndarray: ...


@functools.cache
def _backend(preferred: str | None = None) -> tuple[Any, str]:
    """The interpreter class and its "name version"; looked up once (package metadata reads are slow)."""
    for module_name, dist in _BACKENDS:
        if preferred and dist != preferred:
            continue
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        return module.Interpreter, f"{dist} {metadata.version(dist)}"
    wanted = preferred or " or ".join(d for _, d in _BACKENDS)
    raise InterpreterError(f"no TFLite interpreter installed; pip install {wanted}", Reason.INTERPRETER_MISSING)


def interpreter_name(preferred: str | None = None) -> str:
    return _backend(preferred)[1]


class ProbeFailed(InterpreterError):
    reason = Reason.PROBE_FAILED


@dataclass(frozen=True)
class Model:
    """A loaded model. `predict` is thread-safe; the interpreter itself is not, so calls are serialized by `lock`,
    or by the caller of `predict_serialized` (the agent, whose serving lock already keeps inferences apart)."""

    path: Path
    interpreter: _Interpreter
    input_index: int
    output_index: int
    input_shape: tuple[int, ...]
    input_dtype: np.dtype[Any]
    lock: threading.Lock

    def predict(self, x: np.ndarray) -> np.ndarray:
        with self.lock:
            return self.predict_serialized(x)

    def predict_serialized(self, x: np.ndarray) -> np.ndarray:
        """`predict` for a caller that itself keeps calls to this model from overlapping; takes no lock."""
        arr = np.asarray(x, dtype=self.input_dtype).reshape(self.input_shape)
        self.interpreter.set_tensor(self.input_index, arr)
        self.interpreter.invoke()
        return np.array(self.interpreter.get_tensor(self.output_index))

    def run_probe(self, probe: Mapping[str, Any]) -> float:
        """Run the release's probe set; return the max abs difference, raise ProbeFailed past tolerance.

        The probe is {"inputs": encoded array [n, *input_shape], "outputs": encoded array [n, ...],
        "atol": "1e-4"} (see edge_agent.contract.arrays).
        """
        try:
            inputs = decode_array(probe.get("inputs"))
            expected = decode_array(probe.get("outputs")).astype(np.float64)
            atol = float(probe.get("atol", "1e-4"))
        except (ValueError, TypeError) as e:
            raise ProbeFailed(f"probe set is malformed: {e}") from e
        if len(inputs) != len(expected) or len(inputs) == 0:
            raise ProbeFailed("probe set is empty or its inputs and outputs differ in number")
        worst = 0.0
        for i, (x, want) in enumerate(zip(inputs, expected, strict=True)):
            try:
                got = self.predict(x)
                diff = float(np.max(np.abs(got.ravel() - want.ravel())))
            except (ValueError, RuntimeError) as e:
                raise ProbeFailed(f"probe input {i} could not be run: {e}") from e
            if not np.isfinite(diff) or diff > atol:
                raise ProbeFailed(f"probe input {i} differs by {diff:.3g} (tolerance {atol:g})")
            worst = max(worst, diff)
        return worst


def load_model(path: Path, preferred: str | None = None) -> Model:
    interpreter_cls, _ = _backend(preferred)
    try:
        interpreter = interpreter_cls(model_path=str(path), num_threads=1)
        interpreter.allocate_tensors()
        inp = interpreter.get_input_details()[0]
        out = interpreter.get_output_details()[0]
    except (ValueError, RuntimeError, IndexError) as e:
        raise InterpreterError(
            f"model {path.name} does not load in the TFLite interpreter: {e}", Reason.LOAD_FAILED
        ) from e
    return Model(
        path=path,
        interpreter=interpreter,
        input_index=int(inp["index"]),
        output_index=int(out["index"]),
        input_shape=tuple(int(d) for d in inp["shape"]),
        input_dtype=np.dtype(inp["dtype"]),
        lock=threading.Lock(),
    )
