"""Numeric arrays inside signed TUF metadata.

TUF signs canonical JSON, which has no floats. Arrays travel as {"dtype", "shape", "b64"} (little-endian raw
bytes, exact), and scalars such as tolerances as decimal strings. Both sides use these two functions.
"""

from __future__ import annotations

import base64
import binascii
from typing import Any

import numpy as np

__all__ = ["decode_array", "encode_array"]

_DTYPES = {"float32", "float64", "int32", "int64", "uint8", "int8"}
_MAX_ELEMENTS = 10_000_000


def encode_array(array: np.ndarray) -> dict[str, Any]:
    a = np.asarray(array)
    if a.dtype.name not in _DTYPES:
        raise ValueError(f"dtype {a.dtype} cannot be encoded; use one of {sorted(_DTYPES)}")
    return {
        "dtype": a.dtype.name,
        "shape": [int(d) for d in a.shape],
        "b64": base64.b64encode(np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes()).decode(),
    }


def decode_array(doc: Any) -> np.ndarray:
    """Inverse of encode_array; raises ValueError for anything malformed."""
    if not isinstance(doc, dict) or not {"dtype", "shape", "b64"} <= doc.keys():
        raise ValueError("an encoded array needs dtype, shape and b64")
    dtype, shape = doc["dtype"], doc["shape"]
    if dtype not in _DTYPES:
        raise ValueError(f"unsupported dtype {dtype!r}")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ValueError("shape must be a list of non-negative integers")
    count = int(np.prod(shape)) if shape else 1
    if count > _MAX_ELEMENTS:
        raise ValueError(f"array of {count} elements exceeds {_MAX_ELEMENTS}")
    try:
        raw = base64.b64decode(doc["b64"], validate=True)
    except (binascii.Error, TypeError) as e:
        raise ValueError("b64 is not valid base64") from e
    dt = np.dtype(dtype).newbyteorder("<")
    if len(raw) != count * dt.itemsize:
        raise ValueError(f"{len(raw)} bytes do not fill shape {shape} of {dtype}")
    return np.frombuffer(raw, dtype=dt).reshape(shape).astype(np.dtype(dtype))
