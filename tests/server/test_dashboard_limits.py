"""The dashboard's API takes small JSON bodies only: a large one, declared or streamed without a length, is refused
with 413 before the app holds it, on the endpoint anyone may call (POST /api/session) as on the others."""

from __future__ import annotations

from collections.abc import Iterator

from fastapi.testclient import TestClient

from server.dashboard.api import MAX_BODY_BYTES, DashboardOptions, create_app
from server.datadir import DataDir


def _chunks(total: int) -> Iterator[bytes]:
    for _ in range(total // 65536):
        yield b"x" * 65536


def test_large_request_bodies_are_refused_and_small_ones_served(datadir: DataDir) -> None:
    token = datadir.operator_token()
    with TestClient(create_app(datadir, DashboardOptions(token))) as c:
        big = c.post("/api/session", content=b"{" + b" " * (50 * 1024 * 1024) + b"}")
        assert big.status_code == 413 and "limited to" in big.json()["detail"]
        streamed = c.post("/api/session", content=_chunks(4 * MAX_BODY_BYTES))  # no Content-Length: chunked
        assert streamed.status_code == 413
        assert c.post("/api/session", json={"token": "wrong"}).status_code == 401  # small bodies are read
        assert c.post("/api/session", json={"token": token}).status_code == 200
