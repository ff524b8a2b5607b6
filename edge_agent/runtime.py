"""One wrapper over the TFLite interpreters a device may have.

`ai-edge-litert` (numpy 2) is preferred; `tflite-runtime` 2.14 (numpy<2, older Pi images) is the fallback.
Both expose the same `Interpreter` API, so everything else here is shared.

How a model is loaded is a `ModelOptions` (agent.toml `xnnpack`, `share_models`):

- `xnnpack = false` loads with `OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES`: the builtin kernels read the
  weights where they lie (the mapped file), where the default XNNPACK delegate first repacks them into memory
  of its own (about the model's size, per interpreter) to run faster.
- `share` (simulated fleets only): the agents of one process that load the same bytes get one `Model`, from a
  process-wide table keyed by (sha256 of the bytes, interpreter, xnnpack). The key is the digest of the bytes
  this load read from the device's own file, and a new entry's interpreter is built from exactly those bytes,
  so a device never runs bytes it did not hold itself. A shared model serialises every call on its own lock,
  `predict_serialized` included (each device's serving lock only keeps that device's calls apart). An entry
  lives as long as some device holds its model. A real agent (one device per process) leaves it off: there is
  nothing to share, and its model stays the mapped file its updater verified.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import threading
import weakref
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from edge_agent.contract.arrays import decode_array
from edge_agent.contract.reasons import Reason
from edge_agent.errors import InterpreterError

__all__ = ["Model", "ModelOptions", "ProbeFailed", "interpreter_name", "load_model"]

_BACKENDS = (("ai_edge_litert.interpreter", "ai-edge-litert"), ("tflite_runtime.interpreter", "tflite-runtime"))


class _Interpreter(Protocol):
    def allocate_tensors(self) -> None: ...
    def get_input_details(self) -> list[dict[str, Any]]: ...
    def get_output_details(self) -> list[dict[str, Any]]: ...
    def set_tensor(self, index: int, value: np.ndarray) -> None: ...
    def invoke(self) -> None: ...
    def get_tensor(self, index: int) -> np.ndarray: ...


@dataclass(frozen=True)
class ModelOptions:
    """How models are loaded (agent.toml). The defaults are what a device does unless told otherwise."""

    xnnpack: bool = True  # the interpreter's default XNNPACK delegate: faster, about the model's size more memory
    share: bool = False  # one Model per distinct bytes in this process (simulated fleets; see the module doc)


@functools.cache
def _backend(preferred: str | None = None) -> tuple[Any, str]:
    """The interpreter module and its "name version"; looked up once."""
    for module_name, dist in _BACKENDS:
        if preferred and dist != preferred:
            continue
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        return module, f"{dist} {_version(module_name, dist)}"
    wanted = preferred or " or ".join(d for _, d in _BACKENDS)
    raise InterpreterError(f"no TFLite interpreter installed; pip install {wanted}", Reason.INTERPRETER_MISSING)


def _version(module_name: str, dist: str) -> str:
    """The interpreter package's own `__version__` (both backends set it, to their distribution's version), else
    the distribution's metadata. importlib.metadata is imported only then: with the email, zipfile and csv modules
    it brings, it is about 0.8 MB that an agent would keep for one string (until an update's urllib3 imports it)."""
    version = getattr(importlib.import_module(module_name.rpartition(".")[0]), "__version__", None)
    if isinstance(version, str):
        return version
    from importlib import metadata

    return metadata.version(dist)


def interpreter_name(preferred: str | None = None) -> str:
    return _backend(preferred)[1]


class ProbeFailed(InterpreterError):
    reason = Reason.PROBE_FAILED


@dataclass(frozen=True)
class Model:
    """A loaded model. `predict` is thread-safe; the interpreter itself is not, so calls are serialized by `lock`,
    or by the caller of `predict_serialized` (the agent, whose serving lock already keeps inferences apart). A
    `shared` model (ModelOptions.share) is used by several devices, whose serving locks do not keep each other's
    calls apart: it takes `lock` in `predict_serialized` too. `path` is the file it was loaded from (for a shared
    model, the file of the device that loaded it first; every sharer's file has the same sha256)."""

    path: Path
    interpreter: _Interpreter
    input_index: int
    output_index: int
    input_shape: tuple[int, ...]
    input_dtype: np.dtype[Any]
    lock: threading.Lock
    shared: bool = False

    def predict(self, x: np.ndarray) -> np.ndarray:
        with self.lock:
            return self._invoke(x)

    def predict_serialized(self, x: np.ndarray) -> np.ndarray:
        """`predict` for a caller that itself keeps calls to this model from overlapping; takes no lock unless
        the model is shared with other devices."""
        if self.shared:
            return self.predict(x)
        return self._invoke(x)

    def _invoke(self, x: np.ndarray) -> np.ndarray:
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


def load_model(path: Path, preferred: str | None = None, options: ModelOptions | None = None) -> Model:
    """Load the model in `path` (InterpreterError if it does not load); `options` default to ModelOptions()."""
    options = options or ModelOptions()
    if options.share:
        return _SHARED.load(path, preferred, options.xnnpack)
    return _load(path, None, preferred, options.xnnpack)


def _load(path: Path, content: bytes | None, preferred: str | None, xnnpack: bool, shared: bool = False) -> Model:
    """A new interpreter over `content` if given (the bytes read from `path`), else over the file itself."""
    module, _ = _backend(preferred)
    kwargs: dict[str, Any] = {"num_threads": 1}
    if not xnnpack:
        resolvers = getattr(module, "OpResolverType", None)
        if resolvers is None or not hasattr(resolvers, "BUILTIN_WITHOUT_DEFAULT_DELEGATES"):
            raise InterpreterError(
                f"{interpreter_name(preferred)} cannot load without XNNPACK; set xnnpack = true", Reason.LOAD_FAILED
            )
        kwargs["experimental_op_resolver_type"] = resolvers.BUILTIN_WITHOUT_DEFAULT_DELEGATES
    try:
        if content is None:
            interpreter = module.Interpreter(model_path=str(path), **kwargs)
        else:
            interpreter = module.Interpreter(model_content=content, **kwargs)
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
        shared=shared,
    )


class _SharedModels:
    """The process's shared models, by (sha256 of the bytes, interpreter, xnnpack); weakly held, so a model no
    device uses any more is freed. Loads are serialised: two devices committing the same release at once get
    one interpreter."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._models: weakref.WeakValueDictionary[tuple[str, str, bool], Model] = weakref.WeakValueDictionary()

    def load(self, path: Path, preferred: str | None, xnnpack: bool) -> Model:
        try:
            content = path.read_bytes()
        except OSError as e:
            raise InterpreterError(f"model {path.name} unreadable: {e.strerror}", Reason.LOAD_FAILED) from e
        key = (hashlib.sha256(content).hexdigest(), interpreter_name(preferred), xnnpack)
        with self._lock:
            model = self._models.get(key)
            if model is None:
                model = _load(path, content, preferred, xnnpack, shared=True)
                self._models[key] = model
            return model

    def __len__(self) -> int:
        return len(self._models)


# Process-wide by nature: what it shares is this process's memory, among the devices this process simulates.
_SHARED = _SharedModels()
