"""Build a real TFLite model (a stack of dense layers) straight from numpy weights.

Used where a model is needed without a training run: tests and benchmarks make releases of a chosen size in
milliseconds, and simulations make deliberately broken variants of a trained model (scrambled weights). Trained
models come from the PyTorch export path instead. The file is an ordinary TFLite flatbuffer (FULLY_CONNECTED
operators, optional SOFTMAX) that any TFLite interpreter runs.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as tfl

__all__ = ["DenseLayer", "build_dense_model", "dense_model_of_size", "random_dense_layers"]

_RELU = 1  # tfl.ActivationFunctionType.RELU


@dataclass(frozen=True)
class DenseLayer:
    weights: np.ndarray  # shape (out, in), as TFLite's FULLY_CONNECTED expects
    bias: np.ndarray  # shape (out,)
    relu: bool = False


def random_dense_layers(sizes: Sequence[int], seed: int) -> list[DenseLayer]:
    """Layers for sizes [in, h1, ..., out] with ReLU between them (He-style init)."""
    if len(sizes) < 2 or any(s <= 0 for s in sizes):
        raise ValueError(f"need at least an input and an output size, all positive; got {list(sizes)}")
    rng = np.random.default_rng(seed)
    layers = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        w = rng.normal(0.0, np.sqrt(2.0 / n_in), size=(n_out, n_in)).astype(np.float32)
        b = rng.normal(0.0, 0.01, size=(n_out,)).astype(np.float32)
        layers.append(DenseLayer(w, b, relu=i < len(sizes) - 2))
    return layers


def _tensor(shape: Sequence[int], buffer: int, name: str) -> tfl.TensorT:
    t = tfl.TensorT()
    t.shape = list(shape)
    t.type = tfl.TensorType.FLOAT32
    t.buffer = buffer
    t.name = name
    return t


def build_dense_model(layers: Sequence[DenseLayer], softmax: bool = True, description: str = "fedfleet") -> bytes:
    """Serialize layers into a TFLite model taking float32 [1, in] and giving float32 [1, out]."""
    if not layers:
        raise ValueError("a model needs at least one layer")
    for prev, layer in itertools.pairwise(layers):
        if layer.weights.shape[1] != prev.weights.shape[0]:
            raise ValueError(f"layer shapes do not chain: {prev.weights.shape} then {layer.weights.shape}")
    buffers = [tfl.BufferT()]  # buffer 0 is the empty sentinel TFLite requires
    tensors: list[tfl.TensorT] = []
    operators: list[tfl.OperatorT] = []

    def add_const(array: np.ndarray, name: str) -> int:
        buf = tfl.BufferT()
        buf.data = np.ascontiguousarray(array, dtype=np.float32).view(np.uint8).ravel()
        buffers.append(buf)
        tensors.append(_tensor(array.shape, len(buffers) - 1, name))
        return len(tensors) - 1

    tensors.append(_tensor([1, layers[0].weights.shape[1]], 0, "input"))
    current = 0
    for i, layer in enumerate(layers):
        w = add_const(layer.weights, f"dense{i}/weights")
        b = add_const(layer.bias, f"dense{i}/bias")
        tensors.append(_tensor([1, layer.weights.shape[0]], 0, f"dense{i}/out"))
        out = len(tensors) - 1
        op = tfl.OperatorT()
        op.opcodeIndex = 0
        op.inputs, op.outputs = [current, w, b], [out]
        op.builtinOptionsType = tfl.BuiltinOptions.FullyConnectedOptions
        options = tfl.FullyConnectedOptionsT()
        options.fusedActivationFunction = _RELU if layer.relu else 0
        op.builtinOptions = options
        operators.append(op)
        current = out
    codes = [tfl.OperatorCodeT()]
    codes[0].builtinCode = codes[0].deprecatedBuiltinCode = tfl.BuiltinOperator.FULLY_CONNECTED
    codes[0].version = 1
    if softmax:
        code = tfl.OperatorCodeT()
        code.builtinCode = code.deprecatedBuiltinCode = tfl.BuiltinOperator.SOFTMAX
        code.version = 1
        codes.append(code)
        tensors.append(_tensor([1, layers[-1].weights.shape[0]], 0, "probabilities"))
        op = tfl.OperatorT()
        op.opcodeIndex = 1
        op.inputs, op.outputs = [current], [len(tensors) - 1]
        op.builtinOptionsType = tfl.BuiltinOptions.SoftmaxOptions
        op.builtinOptions = tfl.SoftmaxOptionsT()
        op.builtinOptions.beta = 1.0
        operators.append(op)
        current = len(tensors) - 1
    graph = tfl.SubGraphT()
    graph.tensors, graph.inputs, graph.outputs, graph.operators = tensors, [0], [current], operators
    graph.name = "main"
    model = tfl.ModelT()
    model.version = 3
    model.description = description
    model.operatorCodes, model.subgraphs, model.buffers = codes, [graph], buffers
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output())


def dense_model_of_size(size_mb: float) -> bytes:
    """A digits-shaped dense model (64 -> H -> 10) whose file is about size_mb."""
    hidden = max(8, int(size_mb * 1_000_000 / 4 / (64 + 10 + 1)))
    return build_dense_model(random_dense_layers([64, hidden, 10], seed=7))
