"""TUF metadata over gRPC (python-tuf's ngclient) and a resumable, length-capped target download.

ngclient does every TUF check (signatures and thresholds, root rotation, expiry, version rollback, snapshot
and targets consistency, metadata length caps); this module only moves its bytes over gRPC and names its
refusals with fedfleet's reason codes. Targets are downloaded here rather than by ngclient so that a cut
download resumes from where it stopped; the bytes are checked against the verified TargetFile before use.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import TargetFile
from tuf.ngclient import Updater, UpdaterConfig
from tuf.ngclient.fetcher import FetcherInterface

from edge_agent.contract import LIMITS
from edge_agent.contract.reasons import Reason
from edge_agent.errors import AgentError, TransientError, UpdateRefused
from edge_agent.transport import FileMissing, GrpcTransport

__all__ = [
    "GrpcFetcher",
    "download_target",
    "refresh_and_get_target",
    "refresh_and_get_targets",
    "repository_file_name",
]

_METADATA_URL = "fedfleet-grpc://metadata/"

logger = logging.getLogger(__name__)


_ROOT_NAME = re.compile(r"^(\d{1,10})\.root\.json$")
_BUNDLE_FILES = 32 + 4  # roots, timestamp, snapshot, targets, a release's role


class GrpcFetcher(FetcherInterface):
    """Serves ngclient's metadata URLs over gRPC.

    A refresh starts by asking for the next root version; at that point the fetcher takes the whole refresh
    (next roots, timestamp, snapshot, targets, and the role of the release being updated to) in one
    FetchMetadataBundle stream and serves ngclient's next requests from it, each file once. Anything the bundle
    lacks, or all of it when the bundle is refused or malformed, is fetched by name from FetchMetadata. ngclient
    verifies every file either way.
    """

    def __init__(self, transport: GrpcTransport, target_path: str = "") -> None:
        self._transport = transport
        self._target_path = target_path
        self._bundle: dict[str, bytes] | None = None
        self._newest_root = 0

    def _fetch(self, url: str) -> Iterator[bytes]:
        if not url.startswith(_METADATA_URL):
            raise tuf_errors.DownloadError(f"unexpected URL {url}")
        name = url[len(_METADATA_URL) :]
        root = _ROOT_NAME.match(name)
        if self._bundle is None and root is not None:
            self._bundle = self._take_bundle(int(root.group(1)) - 1)
        if self._bundle and name in self._bundle:
            return iter([self._bundle.pop(name)])
        if root is not None and 0 < self._newest_root < int(root.group(1)):
            raise tuf_errors.DownloadHTTPError(f"{name}: no such root version (newest is {self._newest_root})", 404)
        try:
            # Materialise the first chunk now so that NOT_FOUND surfaces here, where ngclient expects it.
            chunks = self._transport.fetch("metadata", name)
            first = next(chunks, None)
        except FileMissing as e:
            raise tuf_errors.DownloadHTTPError(str(e), 404) from e
        return self._iterate(first, chunks)

    def _take_bundle(self, root_version: int) -> dict[str, bytes]:
        """The refresh's files by name; empty when the coordinator lacks the call or sends something off (a
        file over the metadata cap, too many files, a gap): then every file is fetched by name instead."""
        files: dict[str, bytearray] = {}
        sizes: dict[str, int] = {}
        newest = 0
        try:
            for part in self._transport.fetch_metadata_bundle(root_version, self._target_path):
                data = files.setdefault(part.name, bytearray())
                sizes.setdefault(part.name, part.total_size)
                if (
                    len(files) > _BUNDLE_FILES
                    or part.total_size != sizes[part.name]
                    or part.total_size > LIMITS.metadata_file
                    or part.offset != len(data)
                    or len(data) + len(part.data) > part.total_size
                ):
                    logger.warning("metadata bundle refused at %s; fetching files by name", part.name[:80])
                    return {}
                data += part.data
                newest = part.root_version
        except AgentError as e:  # an older coordinator (Unimplemented), a refusal, the network: by name then
            logger.info("no metadata bundle (%s); fetching files by name", e)
            return {}
        self._newest_root = newest
        return {name: bytes(data) for name, data in files.items() if len(data) == sizes[name]}

    def download_bytes(self, url: str, max_length: int) -> bytes:
        """As FetcherInterface.download_bytes, but gathered in memory instead of through a temporary file per
        metadata file: each is capped by max_length (at most LIMITS.metadata_file), and a refresh reads four."""
        received = bytearray()
        for chunk in self.fetch(url):
            if len(received) + len(chunk) > max_length:
                raise tuf_errors.DownloadLengthMismatchError(
                    f"Downloaded more than the maximum allowed length of {max_length} bytes"
                )
            received += chunk
        return bytes(received)

    @staticmethod
    def _iterate(first: object, rest: Iterator[object]) -> Iterator[bytes]:
        if first is not None:
            yield first.data  # type: ignore[attr-defined]
        for chunk in rest:
            yield chunk.data  # type: ignore[attr-defined]


class _Updater(Updater):
    """ngclient's Updater, minus rewriting the trusted root when it has not changed.

    Every Updater writes the root it starts from into root_history/ again and re-creates the root.json symlink,
    twice (when created, and after looking for a newer root), even when no root changed: a new file, two
    unlinks and two symlinks per refresh, wear on a device's flash for nothing (benchmarks/fanout.py, whose
    agents are all on their first update, did not measurably change). These two overrides skip only a write
    that would leave the same bytes or the same link behind; a new root (a rotation) is written and linked
    exactly as ngclient does. What is read or trusted is not touched: ngclient verifies the cached root as
    before.
    """

    def _persist_file(self, filename: str, data: bytes) -> None:
        if os.path.basename(os.path.dirname(filename)) == "root_history" and _holds(filename, data):
            return
        super()._persist_file(filename, data)

    def _update_root_symlink(self) -> None:
        link = os.path.join(self._dir, "root.json")
        current = os.path.join("root_history", f"{self._trusted_set.root.version}.root.json")
        with contextlib.suppress(OSError):  # no link yet, or a plain file (the seeded root): ngclient makes it
            if os.readlink(link) == current:
                return
        super()._update_root_symlink()


def _holds(path: str, data: bytes) -> bool:
    """Whether the file at `path` holds exactly `data`."""
    try:
        with open(path, "rb", buffering=0) as f:
            return f.read(len(data) + 1) == data
    except OSError:
        return False


def _reason_for(e: Exception) -> Reason:
    if isinstance(e, tuf_errors.ExpiredMetadataError):
        return Reason.METADATA_EXPIRED
    if isinstance(e, tuf_errors.UnsignedMetadataError):
        return Reason.ROOT_ROTATION_INVALID if str(e).startswith("root ") else Reason.METADATA_BAD_SIGNATURE
    if isinstance(e, (tuf_errors.BadVersionNumberError, tuf_errors.LengthOrHashMismatchError)):
        return Reason.METADATA_MISMATCH
    if isinstance(e, tuf_errors.DownloadLengthMismatchError):
        return Reason.METADATA_TOO_LARGE
    return Reason.METADATA_INVALID


def refresh_and_get_target(tuf_dir: Path, transport: GrpcTransport, target_path: str) -> TargetFile:
    """Refresh top-level metadata and return the verified TargetFile for `target_path`."""
    return refresh_and_get_targets(tuf_dir, transport, target_path)[0]


def refresh_and_get_targets(
    tuf_dir: Path, transport: GrpcTransport, target_path: str, *also: str
) -> tuple[TargetFile, list[TargetFile | None]]:
    """Refresh top-level metadata and return the verified TargetFile for `target_path`, and from the same
    metadata those of `also` (None for one it does not list: fedfleet's own files are in the top-level role)."""
    updater = _Updater(
        metadata_dir=str(tuf_dir),
        metadata_base_url=_METADATA_URL,
        fetcher=GrpcFetcher(transport, target_path),
        config=UpdaterConfig(max_root_rotations=32, targets_max_length=LIMITS.metadata_file),
        bootstrap=None,  # the cached root: seeded from the enrollment bundle, advanced by rotations
    )
    try:
        updater.refresh()
        info = updater.get_targetinfo(target_path)
        others = [updater.get_targetinfo(path) for path in also]
    except tuf_errors.DownloadLengthMismatchError as e:
        raise UpdateRefused(f"metadata larger than allowed: {e}", Reason.METADATA_TOO_LARGE) from e
    except tuf_errors.DownloadError as e:
        cause = e.__cause__
        if isinstance(cause, AgentError) and not isinstance(cause, TransientError):
            raise UpdateRefused(f"metadata refused: {cause}", cause.reason) from e
        raise TransientError(f"metadata download failed: {e}") from e
    except tuf_errors.RepositoryError as e:
        raise UpdateRefused(f"TUF metadata refused: {e}", _reason_for(e)) from e
    if info is None:
        raise UpdateRefused(f"target {target_path} is not in the signed targets metadata", Reason.TARGET_UNKNOWN)
    return info, others


def repository_file_name(info: TargetFile) -> str:
    """The file name under consistent snapshots: "<dir>/<sha256>.<basename>"."""
    directory, sep, base = info.path.rpartition("/")
    return f"{directory}{sep}{info.hashes['sha256']}.{base}"


def download_target(
    info: TargetFile,
    transport: GrpcTransport,
    downloads: Path,
    on_progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Download into downloads/<sha256>.part, resuming, never past info.length; return the verified, fsynced
    file (on the same filesystem as the slots, so it can be renamed into one)."""
    sha = info.hashes.get("sha256")
    if sha is None:
        raise UpdateRefused("target metadata has no sha256 hash", Reason.TARGET_UNKNOWN)
    part = downloads / f"{sha}.part"
    offset = part.stat().st_size if part.exists() else 0
    if offset > info.length:
        part.unlink()
        offset = 0
    digest = hashlib.sha256()
    try:
        with part.open("a+b") as f:
            if offset:  # resuming: what is already there counts toward the hash
                f.seek(0)
                digest = hashlib.file_digest(f, "sha256")
            if offset < info.length:
                for chunk in transport.fetch("target", repository_file_name(info), offset):
                    if chunk.offset != offset or len(chunk.data) > LIMITS.grpc_chunk:
                        raise TransientError(f"coordinator sent offset {chunk.offset}, expected {offset}")
                    if offset + len(chunk.data) > info.length:
                        part.unlink()
                        raise UpdateRefused(
                            f"target exceeds its signed length of {info.length} bytes", Reason.TARGET_TOO_LARGE
                        )
                    f.write(chunk.data)
                    digest.update(chunk.data)  # hashed as it arrives, not read back afterwards
                    offset += len(chunk.data)
                    if on_progress is not None:
                        on_progress(offset, info.length)
            f.flush()
            os.fsync(f.fileno())
    except FileMissing as e:
        raise TransientError(f"target file missing on the coordinator: {e}") from e
    if offset != info.length:
        part.unlink()
        raise UpdateRefused(f"target is {offset} bytes, signed length is {info.length}", Reason.TARGET_LENGTH_MISMATCH)
    if digest.hexdigest() != sha:
        part.unlink()
        raise UpdateRefused("target bytes do not match the signed sha256", Reason.TARGET_HASH_MISMATCH)
    return part
