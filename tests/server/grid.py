"""Flower's Grid interface (flwr 1.41) for ServerApps under test: a base with the parts a ServerApp never uses, and
a grid over ClientApps in this process, with what Flower's runtime sets before a ServerApp runs."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from flwr.app import Context, Message, Metadata, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

__all__ = ["GridStub", "LocalGrid", "message", "run_server_app", "server_task"]


class GridStub(Grid):
    """set_run, run and create_message as a Grid whose ServerApp builds its own messages needs them; a subclass
    gives the nodes and how messages travel (get_node_ids, push_messages, pull_messages, send_and_receive)."""

    def set_run(self, run: Any) -> None:
        pass

    @property
    def run(self) -> Any:
        return None

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        raise NotImplementedError


def message(content: RecordDict, message_type: str, node: int = 7) -> Message:
    """A message from the ServerApp (node 0) to `node`, as a SuperLink would deliver it."""
    metadata = Metadata(
        run_id=1,
        message_id=uuid.uuid4().hex,
        src_node_id=0,
        dst_node_id=node,
        reply_to_message_id="",
        group_id="",
        created_at=time.time(),
        ttl=600.0,
        message_type=message_type,
    )
    return Message(content=content, metadata=metadata)


class LocalGrid(GridStub):
    """Flower's Grid interface over ClientApps in this process: each message goes to its node's ClientApp with that
    node's own context (node config, state), and the reply comes back as a SuperNode's would."""

    def __init__(self, app: ClientApp, node_configs: dict[int, dict[str, Any]]) -> None:
        self.app = app
        self.contexts = {
            node: Context(run_id=1, node_id=node, node_config=cfg, state=RecordDict(), run_config={})
            for node, cfg in node_configs.items()
        }
        self.delivered: list[tuple[int, str]] = []  # (node, message type) of every message delivered

    def get_node_ids(self) -> list[int]:
        return sorted(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        raise NotImplementedError("send_and_receive delivers at once")

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        raise NotImplementedError("send_and_receive delivers at once")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        replies = []
        for m in messages:
            node = m.metadata.dst_node_id
            self.delivered.append((node, m.metadata.message_type))
            replies.append(self.app(message(m.content, m.metadata.message_type, node), self.contexts[node]))
        return replies


@contextlib.contextmanager
def server_task() -> Iterator[None]:
    """What Flower's runtime sets in a ServerApp's process before it runs (messages take their ids from it)."""
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    try:
        yield
    finally:
        TaskIdentity._run_id = TaskIdentity._node_id = TaskIdentity._task_id = None


def run_server_app(root: Path, plan: Any, run_id: str, grid: Grid) -> None:
    """One run of fedfleet's real ServerApp for the data directory at `root` over `grid`."""
    from server.fl.server_app import build_server_app

    with server_task():
        build_server_app(root, plan, run_id, "simulation")(
            grid, Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config={})
        )
