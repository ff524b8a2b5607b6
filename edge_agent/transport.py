"""The agent's gRPC side: registration, the freshness check, metadata and target streams, event reports.

Blocking calls on one channel per agent; the async agent runs them off its event loop. gRPC failures are
wrapped here, once: NOT_FOUND becomes `FileMissing`, anything else a `TransientError` to retry later.
"""

from __future__ import annotations

import contextlib
import os
import platform
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, Literal

import grpc
import grpc.experimental

from edge_agent import __version__
from edge_agent.contract import LIMITS
from edge_agent.contract._proto.fedfleet.v1 import fleet_pb2 as pb
from edge_agent.contract._proto.fedfleet.v1 import fleet_pb2_grpc as pb_grpc
from edge_agent.contract.reasons import Reason
from edge_agent.errors import AgentError, TransientError

__all__ = ["FileMissing", "GrpcTransport", "Unimplemented", "hardware_facts"]

# Metadata and target streams are read by the calling thread itself, not handed over from a polling thread that
# gRPC starts for every call: about 8% less CPU per update in benchmarks/fanout.py. gRPC Python's own channel
# option, marked experimental; a gRPC without it simply runs the streams the usual way.
_SINGLE_THREADED_STREAMS = getattr(getattr(grpc.experimental, "ChannelOptions", None), "SingleThreadedUnaryStream", "")
_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", LIMITS.grpc_message),
    ("grpc.max_send_message_length", LIMITS.grpc_message),
    *([(_SINGLE_THREADED_STREAMS, 1)] if _SINGLE_THREADED_STREAMS else []),
]


class FileMissing(AgentError):
    reason = Reason.NOT_FOUND


class Unimplemented(AgentError):
    """The coordinator is older than this agent and lacks the call."""

    reason = Reason.UNIMPLEMENTED


def hardware_facts(interpreter: str) -> pb.Hardware:
    memory = 0
    with contextlib.suppress(ValueError, OSError, AttributeError):
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return pb.Hardware(
        machine=platform.machine(),
        system=platform.system(),
        python=platform.python_version(),
        cpu_count=os.cpu_count() or 0,
        memory_bytes=memory,
        interpreter=interpreter,
    )


class GrpcTransport:
    def __init__(
        self, target: str, device_id: str, timeout: float = 30.0, tls: tuple[bytes, bytes, bytes] | None = None
    ) -> None:
        """`tls`: (CA, certificate, key) PEM bytes for mutual TLS; None: plaintext (one machine, tests)."""
        self.device_id = device_id
        self.timeout = timeout
        if tls is None:
            self._channel = grpc.insecure_channel(target, options=_CHANNEL_OPTIONS)
        else:
            ca, cert, key = tls
            credentials = grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)
            self._channel = grpc.secure_channel(target, credentials, options=_CHANNEL_OPTIONS)
        self._stub = pb_grpc.FleetServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def register(
        self, fleet: str, labels: Mapping[str, str], interpreter: str, consent_training: bool | None = None
    ) -> pb.RegisterResponse:
        """Register; `consent_training` is the owner's consent as agent.toml states it (None: not stated)."""
        request = pb.RegisterRequest(
            device_id=self.device_id,
            fleet=fleet,
            labels=dict(labels),
            hardware=hardware_facts(interpreter),
            agent_version=__version__,
        )
        if consent_training is not None:
            request.consent_training = consent_training
        try:
            response: pb.RegisterResponse = self._stub.Register(request, timeout=self.timeout)
        except grpc.RpcError as e:
            raise _wrap(e, "register") from e
        return response

    def check(self, counter: int) -> pb.CheckResponse:
        """The director's current freshness statement for this device, with its latest assignment if the
        coordinator holds one above `counter` (the highest the device has accepted)."""
        try:
            response: pb.CheckResponse = self._stub.Check(
                pb.CheckRequest(device_id=self.device_id, counter=counter), timeout=self.timeout
            )
        except grpc.RpcError as e:
            raise _wrap(e, "freshness check") from e
        return response

    def fetch(self, kind: Literal["metadata", "target"], path: str, offset: int = 0) -> Iterator[pb.Chunk]:
        request = pb.FetchRequest(device_id=self.device_id, path=path, offset=offset)
        call = self._stub.FetchMetadata if kind == "metadata" else self._stub.FetchTarget
        return self._stream(call, request, f"fetch {path}")

    def fetch_metadata_bundle(self, root_version: int, target_path: str = "") -> Iterator[pb.MetadataPart]:
        request = pb.MetadataBundleRequest(device_id=self.device_id, root_version=root_version, target_path=target_path)
        return self._stream(self._stub.FetchMetadataBundle, request, "fetch metadata bundle")

    def _stream(self, call: Any, request: Any, what: str) -> Iterator[Any]:
        """A server stream's messages; a gRPC failure, raised when reached, wrapped once (see _wrap)."""
        try:
            yield from call(request, timeout=self.timeout)
        except grpc.RpcError as e:
            raise _wrap(e, what) from e

    def report_events(self, events: Iterable[pb.UpdateEvent]) -> int:
        try:
            response = self._stub.ReportEvents(pb.ReportEventsRequest(events=list(events)), timeout=self.timeout)
        except grpc.RpcError as e:
            raise _wrap(e, "report events") from e
        return int(response.accepted)

    def upload_telemetry(self, windows: Iterable[bytes]) -> int:
        """Stream stored windows (serialized TelemetryWindow); returns the coordinator's watermark."""
        messages = (pb.TelemetryWindow.FromString(w) for w in windows)
        try:
            ack = self._stub.UploadTelemetry(messages, timeout=self.timeout)
        except grpc.RpcError as e:
            raise _wrap(e, "upload telemetry") from e
        return int(ack.watermark)


def _wrap(e: grpc.RpcError, what: str) -> AgentError:
    code = e.code() if isinstance(e, grpc.Call) else None
    details = e.details() if isinstance(e, grpc.Call) else str(e)
    if code == grpc.StatusCode.NOT_FOUND:
        return FileMissing(f"{what}: not found ({details})")
    if code == grpc.StatusCode.UNIMPLEMENTED:
        return Unimplemented(f"{what}: the coordinator does not offer this call ({details})")
    if code in (
        grpc.StatusCode.INVALID_ARGUMENT,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
    ):
        return AgentError(f"{what}: coordinator refused: {details}", Reason.COORDINATOR_REFUSED)
    return TransientError(f"{what}: {code.name if code else 'error'}: {details}")
