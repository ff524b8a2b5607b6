"""The coordinator's gRPC FleetService: registration, TUF metadata and targets as resumable streams, events, and
the freshness check (the director's current statement for the device, and its latest assignment if it lacks it).

Every request is size-capped by the server options and checked field by field; a bad one is answered with
INVALID_ARGUMENT (or NOT_FOUND for a missing file) and changes nothing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.json_format import MessageToDict

from edge_agent.contract import LIMITS, device_id_is_valid
from edge_agent.contract._proto.fedfleet.v1 import fleet_pb2 as pb
from edge_agent.contract._proto.fedfleet.v1 import fleet_pb2_grpc as pb_grpc
from server.ingest.events import EventRejected, event_rows
from server.ingest.telemetry import ingest_windows, watermark
from server.store import Store
from server.store.consent import ConsentRecords
from server.store.freshness import FreshnessRecords
from server.trust.pki import serial_of
from server.trust.repository import Repository

__all__ = ["FleetService", "mutual_tls_credentials", "start_grpc_server"]

logger = logging.getLogger(__name__)

Context = grpc.aio.ServicerContext[Any, Any]

SERVER_OPTIONS = [
    ("grpc.max_receive_message_length", LIMITS.grpc_request),
    ("grpc.max_send_message_length", LIMITS.grpc_message),
]


class FleetService(pb_grpc.FleetServiceServicer):
    def __init__(self, store: Store, repository: Repository, topic_prefix: str, mutual_tls: bool = False) -> None:
        self.store = store
        self.repository = repository
        self.topic_prefix = topic_prefix
        self.mutual_tls = mutual_tls
        self.upload_seconds = LIMITS.grpc_upload_seconds

    async def _authenticate(self, context: Context) -> str | None:
        """With mutual TLS, the caller: the common name of its (unrevoked) certificate. Checked once per call;
        None without mutual TLS (one machine, tests)."""
        if not self.mutual_tls:
            return None
        auth = context.auth_context()
        names = list(auth.get("x509_common_name") or [])
        pem = next(iter(auth.get("x509_pem_cert") or [b""]))
        if len(names) != 1 or not pem:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "a client certificate from the fleet CA is required")
        if self.store.certificate_revoked(serial_of(pem)):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "this certificate is revoked or unknown")
        return str(names[0].decode(errors="replace"))

    @staticmethod
    async def _speaks_for_itself(context: Context, identity: str | None, claimed: str) -> None:
        """A device may speak only for itself: a request naming another device is refused and changes nothing."""
        if identity is not None and claimed != identity:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED,
                f"certificate names {identity!r}; it cannot speak for {claimed[:80]!r}",
            )

    async def _authorize(self, context: Context, claimed: str) -> None:
        await self._speaks_for_itself(context, await self._authenticate(context), claimed)

    async def Register(self, request: pb.RegisterRequest, context: Context) -> pb.RegisterResponse:
        await self._authorize(context, request.device_id)
        if not device_id_is_valid(request.device_id):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "device_id must be 1-128 letters, digits, '-', '_', '.'"
            )
        if not device_id_is_valid(request.fleet):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "fleet must be 1-128 letters, digits, '-', '_', '.'")
        labels = dict(request.labels)
        if len(labels) > LIMITS.labels or any(len(k) > 64 or len(v) > 256 for k, v in labels.items()):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"at most {LIMITS.labels} labels, keys ≤64 and values ≤256 chars"
            )
        hardware = MessageToDict(request.hardware, preserving_proto_field_name=True)
        self.store.register_device(request.device_id, request.fleet, labels, hardware, request.agent_version[:64])
        if request.HasField("consent_training"):  # the owner's agent.toml; recorded when it changes
            ConsentRecords(self.store).record(request.device_id, "training", request.consent_training, "agent")
        response = pb.RegisterResponse(device_id=request.device_id, topic_prefix=self.topic_prefix)
        statement, _, assignment = FreshnessRecords(self.store).answer(request.device_id)
        if assignment is not None:
            response.assignment.ParseFromString(assignment)
        if statement is not None:
            response.freshness.ParseFromString(statement)
        return response

    async def Check(self, request: pb.CheckRequest, context: Context) -> pb.CheckResponse:
        """The device's current freshness statement, and its latest assignment if the device's counter is below
        it. Changes nothing; a device that never registered is NOT_FOUND."""
        await self._authorize(context, request.device_id)
        if not device_id_is_valid(request.device_id):
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "device_id must be 1-128 letters, digits, '-', '_', '.'"
            )
        if not self.store.is_device(request.device_id):
            await context.abort(grpc.StatusCode.NOT_FOUND, f"device {request.device_id!r} has not registered")
        response = pb.CheckResponse()
        statement, counter, assignment = FreshnessRecords(self.store).answer(request.device_id)
        if statement is not None:
            response.freshness.ParseFromString(statement)
        if assignment is not None and counter > request.counter:
            response.assignment.ParseFromString(assignment)
        return response

    async def FetchMetadata(self, request: pb.FetchRequest, context: Context) -> AsyncIterator[pb.Chunk]:
        await self._authorize(context, request.device_id)
        async for chunk in self._stream(self.repository.metadata_path(request.path), request, context):
            yield chunk

    async def FetchTarget(self, request: pb.FetchRequest, context: Context) -> AsyncIterator[pb.Chunk]:
        await self._authorize(context, request.device_id)
        async for chunk in self._stream(self.repository.target_path(request.path), request, context):
            yield chunk

    async def FetchMetadataBundle(
        self, request: pb.MetadataBundleRequest, context: Context
    ) -> AsyncIterator[pb.MetadataPart]:
        await self._authorize(context, request.device_id)
        # The target path is only hashed into a role name and looked up in the snapshot: any string is harmless.
        files, newest = self.repository.refresh_files(min(request.root_version, 2**31), target_path=request.target_path)
        for name, data in files:
            for offset in range(0, max(len(data), 1), LIMITS.grpc_chunk):
                yield pb.MetadataPart(
                    name=name,
                    data=data[offset : offset + LIMITS.grpc_chunk],
                    offset=offset,
                    total_size=len(data),
                    root_version=newest,
                )

    async def _stream(self, path: Path | None, request: pb.FetchRequest, context: Context) -> AsyncIterator[pb.Chunk]:
        if path is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no file {request.path[:200]!r}")
            return
        with path.open("rb") as f:
            total = f.seek(0, 2)
            if request.offset > total:
                await context.abort(grpc.StatusCode.OUT_OF_RANGE, f"offset {request.offset} is past the end ({total})")
            offset = f.seek(request.offset)
            while offset < total:
                data = f.read(LIMITS.grpc_chunk)
                if not data:
                    break
                yield pb.Chunk(data=data, offset=offset, total_size=total)
                offset += len(data)

    async def ReportEvents(self, request: pb.ReportEventsRequest, context: Context) -> pb.ReportEventsResponse:
        identity = await self._authenticate(context)
        for e in request.events:
            await self._speaks_for_itself(context, identity, e.device_id)
        if len(request.events) > LIMITS.events_per_report:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"at most {LIMITS.events_per_report} events per report"
            )
        try:
            rows = event_rows(request.events, topic_device=None, store=self.store)
        except EventRejected as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return pb.ReportEventsResponse(accepted=self.store.record_events(rows, via="grpc"))

    async def UploadTelemetry(
        self, request_iterator: AsyncIterator[pb.TelemetryWindow], context: Context
    ) -> pb.TelemetryAck:
        """A device's backlog in one stream, stored in one transaction; answers the stored watermark."""
        windows: list[pb.TelemetryWindow] = []
        identity = await self._authenticate(context)
        try:
            async with asyncio.timeout(self.upload_seconds):  # a stalled (slow-loris) upload is cut off
                async for window in request_iterator:
                    await self._speaks_for_itself(context, identity, window.device_id)
                    if len(windows) >= LIMITS.telemetry_windows_per_upload:
                        await context.abort(
                            grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"at most {LIMITS.telemetry_windows_per_upload} windows per upload",
                        )
                    if windows and window.device_id != windows[0].device_id:
                        await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "one upload carries one device's windows")
                    windows.append(window)
        except TimeoutError:
            await context.abort(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"an upload must finish within {self.upload_seconds:g} s"
            )
        if not windows:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "an upload needs at least one window")
        results = ingest_windows(self.store, [(w, None) for w in windows], via="grpc")
        refused = [(w, r) for w, r in zip(windows, results, strict=True) if isinstance(r, EventRejected)]
        if refused:
            w, r = refused[0]
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"window {w.sequence}: {r} ({len(refused)} refused)")
        return pb.TelemetryAck(watermark=watermark(self.store, windows[0].device_id))


async def start_grpc_server(
    service: FleetService, listen: str, credentials: grpc.ServerCredentials | None = None
) -> tuple[grpc.aio.Server, int]:
    """Start on `listen` ("host:port", port 0 for a free one); returns the server and its bound port.
    `credentials`: TLS (see `mutual_tls_credentials`); None: plaintext."""
    server = grpc.aio.server(options=SERVER_OPTIONS)
    pb_grpc.add_FleetServiceServicer_to_server(service, server)
    port = server.add_secure_port(listen, credentials) if credentials else server.add_insecure_port(listen)
    if port == 0:
        raise OSError(f"could not bind gRPC on {listen}")
    await server.start()
    logger.info("gRPC FleetService listening on %s", listen.rsplit(":", 1)[0] + f":{port}")
    return server, port


def mutual_tls_credentials(ca_pem: bytes, cert_pem: bytes, key_pem: bytes) -> grpc.ServerCredentials:
    """Server credentials that require a client certificate signed by the fleet CA."""
    return grpc.ssl_server_credentials([(key_pem, cert_pem)], root_certificates=ca_pem, require_client_auth=True)
