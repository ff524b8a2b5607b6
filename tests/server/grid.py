"""A base for test Grids: Flower's Grid interface (flwr 1.41) with the parts a ServerApp under test never uses."""

from __future__ import annotations

from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

__all__ = ["GridStub"]


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
