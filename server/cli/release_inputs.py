"""What `fedfleet release FILE` reads besides the model (a model card, a probe set), and the release of a file to a
remote coordinator, where the same policy checks run (server.trust.releases.publish_release behind the API)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from edge_agent.contract.arrays import encode_array
from server.cli.common import out, print_json
from server.cli.remote import RemoteFleet, connect
from server.errors import CoordinatorError

__all__ = ["read_card", "read_probe", "release_remotely"]


def read_card(card: Path | None) -> dict[str, Any] | None:
    """The model card file as a JSON object (None without one)."""
    if card is None:
        return None
    try:
        doc = json.loads(card.read_text())
    except (OSError, ValueError) as e:
        raise CoordinatorError(f"model card {card} must be a readable JSON object ({e})") from e
    if not isinstance(doc, dict):
        raise CoordinatorError(f"model card {card} must be a JSON object")
    return doc


def read_probe(probe: Path | None) -> dict[str, Any] | None:
    """The probe set .npz ('inputs', 'outputs') as the release's probe document (None without one)."""
    if probe is None:
        return None
    try:
        with np.load(probe) as npz:
            return {
                "inputs": encode_array(npz["inputs"].astype(np.float32)),
                "outputs": encode_array(npz["outputs"].astype(np.float32)),
                "atol": "1e-4",
                "source": probe.name,
            }
    except (OSError, KeyError, ValueError) as e:
        raise CoordinatorError(f"probe file {probe} must be an .npz with arrays 'inputs' and 'outputs' ({e})") from e


def release_remotely(
    target: str, name: str | None, version: str | None, probe: Path | None, card: Path | None, as_json: bool
) -> None:
    """Upload a .tflite file to the remote coordinator, which checks it against its policy, signs and publishes."""
    path = Path(target)
    if not path.is_file():
        raise CoordinatorError(
            f"{target} is not a file here; a remote coordinator takes a .tflite file (a trained model version is "
            "released on the coordinator's host, where its registry is)"
        )
    if not name or not version:
        raise CoordinatorError("releasing a file needs --name and --version")
    probe_doc, card_doc = read_probe(probe), read_card(card)
    with connect(Path()) as fleet:
        assert isinstance(fleet, RemoteFleet)
        doc = fleet.publish(path.read_bytes(), name, version, probe_doc, card_doc)
    if as_json:
        print_json(doc)
    elif doc["created"]:
        sha = doc["sha256"][:12]
        out.print(f"Released [bold]{doc['release']}[/] ({doc['length']} bytes, sha256 {sha}…) as {doc['target']}.")
    else:
        out.print(f"{doc['release']} was already released with these bytes; nothing changed.")
