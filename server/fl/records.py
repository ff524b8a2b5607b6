"""Typed reads from Flower's records (ConfigRecord and MetricRecord values are unions of scalars and lists)."""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["as_bool", "as_float", "as_int", "as_str"]


def _scalar(record: Mapping[str, object], key: str) -> int | float | str | bool:
    value = record[key]
    if not isinstance(value, int | float | str | bool):
        raise TypeError(f"record entry {key!r} is a {type(value).__name__}, not a scalar")
    return value


def as_float(record: Mapping[str, object], key: str) -> float:
    return float(_scalar(record, key))


def as_int(record: Mapping[str, object], key: str) -> int:
    return int(_scalar(record, key))


def as_str(record: Mapping[str, object], key: str) -> str:
    return str(_scalar(record, key))


def as_bool(record: Mapping[str, object], key: str) -> bool:
    return bool(_scalar(record, key))
