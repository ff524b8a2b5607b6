"""TUF metadata (python-tuf's ngclient) and a resumable, length-capped target download, from static mirrors
first and the coordinator's gRPC last.

ngclient does every TUF check (signatures and thresholds, root rotation, expiry, version rollback, snapshot
and targets consistency, metadata length caps); this module only moves its bytes and names its refusals with
fedfleet's reason codes. Targets are downloaded here rather than by ngclient so that a cut download resumes
from where it stopped; the bytes are checked against the verified TargetFile before use.

Sources are tried in order: each mirror of agent.toml's `mirrors` (HTTPS, python-tuf's urllib3 fetcher, the
mirror's certificate checked against the fleet CA or the system's store), then the coordinator. A mirror is
untrusted: what it serves passes the same checks, and a mirror that serves nothing, stale or tampered metadata
or bad target bytes is reported (`on_refused`, with the usual reason code) and the next source is asked. Only
the last source's refusal refuses the update; a mirror's cut download is resumed there with a Range request.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import urllib3
from tuf.api import exceptions as tuf_errors
from tuf.api.metadata import TargetFile
from tuf.ngclient import Updater, UpdaterConfig
from tuf.ngclient.fetcher import FetcherInterface
from tuf.ngclient.urllib3_fetcher import Urllib3Fetcher

from edge_agent.contract import LIMITS
from edge_agent.contract._proto.fedfleet.v1 import fleet_pb2 as pb
from edge_agent.contract.reasons import Reason
from edge_agent.errors import AgentError, TransientError, UpdateRefused
from edge_agent.transport import FileMissing, GrpcTransport

__all__ = [
    "GrpcFetcher",
    "MirrorFetcher",
    "Sources",
    "download_target",
    "refresh_and_get_target",
    "refresh_and_get_targets",
    "repository_file_name",
]

_METADATA_URL = "fedfleet-grpc://metadata/"
_CHUNK = 64 * 1024  # bytes read from a mirror at a time
_RESUMES = 3  # a mirror's download cut this many times in a row (each time with progress) goes to the next source
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")

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


class MirrorFetcher(Urllib3Fetcher):
    """python-tuf's urllib3 fetcher for a static mirror, on a connection pool that verifies the mirror's
    certificate against `ca` (the fleet CA; None: the system's trust store), with no retries or redirects of its
    own (the next source is the retry), and able to ask for the rest of a file from an offset (HTTP Range)."""

    def __init__(self, ca: Path | None, socket_timeout: int = 30) -> None:
        # Small chunks: what arrived before a cut is written (urllib3 holds a chunk until it is whole) and resumed.
        super().__init__(socket_timeout=socket_timeout, chunk_size=_CHUNK, app_user_agent="fedfleet-agent")
        self._pool = urllib3.PoolManager(
            cert_reqs="CERT_REQUIRED",
            ca_certs=str(ca) if ca is not None else None,
            retries=False,
            headers={"User-Agent": "fedfleet-agent"},
        )

    def _fetch(self, url: str) -> Iterator[bytes]:
        return self.fetch_from(url, 0)[1]

    def fetch_from(self, url: str, offset: int) -> tuple[int, Iterator[bytes]]:
        """GET `url` from byte `offset`: (where the bytes served start, the bytes). A server that ignores the
        Range header answers the whole file (start 0); one that answers another range is an error."""
        try:
            response = self._pool.request(
                "GET",
                url,
                headers={"Range": f"bytes={offset}-"} if offset else None,
                preload_content=False,
                redirect=False,
                timeout=urllib3.Timeout(self.socket_timeout),
            )
        except urllib3.exceptions.TimeoutError as e:
            raise tuf_errors.SlowRetrievalError(f"{url}: no answer within {self.socket_timeout} s") from e
        except urllib3.exceptions.HTTPError as e:
            raise tuf_errors.DownloadError(f"{url}: {e}") from e
        start = 0
        if response.status == 206 and offset:
            served = _CONTENT_RANGE.match(response.headers.get("Content-Range", ""))
            start = int(served.group(1)) if served else -1
            if start != offset:
                response.close()
                raise tuf_errors.DownloadError(f"{url}: asked for bytes from {offset}, the mirror answered {start}")
        elif response.status >= 300:
            response.close()
            raise tuf_errors.DownloadHTTPError(f"{url}: HTTP status {response.status}", response.status)
        return start, self._chunks(response)


class _Source(Protocol):
    """Where metadata and target bytes come from: a static mirror or the coordinator."""

    name: str

    def metadata(self, target_path: str) -> tuple[FetcherInterface, str]:
        """A fetcher for ngclient and the metadata base URL it serves."""

    def target_from(self, file_name: str, offset: int) -> tuple[int, Iterator[bytes]]:
        """A target file's bytes from `offset` (or from where the source restarts it): (start, chunks)."""


class _GrpcSource:
    def __init__(self, transport: GrpcTransport) -> None:
        self.transport = transport
        self.name = "coordinator"

    def metadata(self, target_path: str) -> tuple[FetcherInterface, str]:
        return GrpcFetcher(self.transport, target_path), _METADATA_URL

    def target_from(self, file_name: str, offset: int) -> tuple[int, Iterator[bytes]]:
        try:
            chunks = self.transport.fetch("target", file_name, offset)
        except FileMissing as e:
            raise TransientError(f"target file missing on the coordinator: {e}") from e
        return offset, self._checked(chunks, offset)

    @staticmethod
    def _checked(chunks: Iterator[pb.Chunk], offset: int) -> Iterator[bytes]:
        try:
            for chunk in chunks:
                if chunk.offset != offset or len(chunk.data) > LIMITS.grpc_chunk:
                    raise TransientError(f"coordinator sent offset {chunk.offset}, expected {offset}")
                offset += len(chunk.data)
                yield chunk.data
        except FileMissing as e:
            raise TransientError(f"target file missing on the coordinator: {e}") from e


class _MirrorSource:
    def __init__(self, url: str, ca: Path | None) -> None:
        self.url = url if url.endswith("/") else url + "/"
        self.name = f"mirror {self.url}"
        self.fetcher = MirrorFetcher(ca)

    def metadata(self, target_path: str) -> tuple[FetcherInterface, str]:
        return self.fetcher, self.url + "metadata/"

    def target_from(self, file_name: str, offset: int) -> tuple[int, Iterator[bytes]]:
        try:
            return self.fetcher.fetch_from(self.url + "targets/" + file_name, offset)
        except tuf_errors.DownloadError as e:
            raise TransientError(f"{self.name}: {e}") from e


@dataclass
class Sources:
    """The mirrors to try before the coordinator (`mirrors`: base URLs from agent.toml; `ca`: what verifies
    their certificates, None for the system's trust store), and whom to tell about a source that failed. One
    update uses one Sources: a mirror that failed once (its metadata refused, say) is not asked again in it."""

    mirrors: Sequence[str] = ()
    ca: Path | None = None
    on_refused: Callable[[str, AgentError], None] | None = None
    failed: set[str] = field(default_factory=set)

    def ordered(self, transport: GrpcTransport) -> list[_Source]:
        mirrors = [_MirrorSource(url, self.ca) for url in self.mirrors]
        return [*(m for m in mirrors if m.name not in self.failed), _GrpcSource(transport)]

    def refused(self, source: _Source, error: AgentError) -> None:
        logger.warning("%s failed (%s): %s; trying the next source", source.name, error.reason, error)
        self.failed.add(source.name)
        if self.on_refused is not None:
            self.on_refused(source.name, error)


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


def refresh_and_get_target(
    tuf_dir: Path, transport: GrpcTransport, target_path: str, sources: Sources | None = None
) -> TargetFile:
    """Refresh top-level metadata and return the verified TargetFile for `target_path`."""
    return refresh_and_get_targets(tuf_dir, transport, target_path, sources=sources)[0]


def refresh_and_get_targets(
    tuf_dir: Path, transport: GrpcTransport, target_path: str, *also: str, sources: Sources | None = None
) -> tuple[TargetFile, list[TargetFile | None]]:
    """Refresh top-level metadata and return the verified TargetFile for `target_path`, and from the same
    metadata those of `also` (None for one it does not list: fedfleet's own files are in the top-level role).
    Each mirror is tried first; one whose metadata is refused, unreachable or does not list the target yet (a
    mirror behind) is reported and the next is asked, the coordinator last."""
    sources = sources or Sources()
    ordered = sources.ordered(transport)
    for source in ordered[:-1]:
        try:
            return _refresh(tuf_dir, source, target_path, also)
        except AgentError as e:
            sources.refused(source, e)
    return _refresh(tuf_dir, ordered[-1], target_path, also)


def _refresh(
    tuf_dir: Path, source: _Source, target_path: str, also: Sequence[str]
) -> tuple[TargetFile, list[TargetFile | None]]:
    fetcher, metadata_url = source.metadata(target_path)
    updater = _Updater(
        metadata_dir=str(tuf_dir),
        metadata_base_url=metadata_url,
        fetcher=fetcher,
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
    sources: Sources | None = None,
) -> Path:
    """Download into downloads/<sha256>.part, resuming, never past info.length; return the verified, fsynced
    file (on the same filesystem as the slots, so it can be renamed into one). Mirrors first: one that fails or
    serves bad bytes is reported and the next source resumes or restarts the file; the coordinator's refusal
    (the last source) refuses the update."""
    sha = info.hashes.get("sha256")
    if sha is None:
        raise UpdateRefused("target metadata has no sha256 hash", Reason.TARGET_UNKNOWN)
    sources = sources or Sources()
    ordered = sources.ordered(transport)
    for i, source in enumerate(ordered):
        last = i == len(ordered) - 1
        try:
            return _download_from(source, info, sha, downloads / f"{sha}.part", on_progress, retry_fresh=last)
        except AgentError as e:
            if last:
                raise
            sources.refused(source, e)
    raise AssertionError("unreachable: the coordinator is always the last source")


def _download_from(
    source: _Source,
    info: TargetFile,
    sha: str,
    part: Path,
    on_progress: Callable[[int, int], None] | None,
    retry_fresh: bool,
) -> Path:
    """One source's attempt. A connection cut with progress is resumed from the same source with a range
    request (up to _RESUMES times in a row). Bytes that fail the hash are deleted; when the attempt had resumed
    someone else's bytes (`retry_fresh`: for the last source) the file is fetched once more from the start."""
    resumed_from = part.stat().st_size if part.exists() else 0
    cuts = 0
    while True:
        try:
            offset = _append(source, info, part, on_progress)
        except TransientError:
            done = part.stat().st_size if part.exists() else 0
            cuts = 0 if done > resumed_from else cuts + 1
            if cuts >= _RESUMES or done == 0 or isinstance(source, _GrpcSource):
                raise
            logger.info("%s: download cut at %d of %d bytes; resuming", source.name, done, info.length)
            resumed_from = done
            continue
        if offset != info.length:
            part.unlink()
            raise UpdateRefused(
                f"target is {offset} bytes, signed length is {info.length}", Reason.TARGET_LENGTH_MISMATCH
            )
        with part.open("rb") as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
        if digest == sha:
            return part
        part.unlink()
        if retry_fresh and resumed_from > 0:
            logger.warning("%s: resumed bytes do not match the signed sha256; fetching the whole file", source.name)
            resumed_from = 0
            continue
        raise UpdateRefused("target bytes do not match the signed sha256", Reason.TARGET_HASH_MISMATCH)


def _append(source: _Source, info: TargetFile, part: Path, on_progress: Callable[[int, int], None] | None) -> int:
    """Append what the source serves from the end of `part`, never past the signed length; fsync; return the
    file's length. A source that restarts the file (HTTP 200 to a range request) starts it over."""
    offset = part.stat().st_size if part.exists() else 0
    if offset > info.length:
        part.unlink()
        offset = 0
    with part.open("r+b" if offset else "wb") as f:
        try:
            if offset < info.length:
                start, chunks = source.target_from(repository_file_name(info), offset)
                f.seek(start)
                f.truncate()
                offset = start
                for data in chunks:
                    if offset + len(data) > info.length:
                        f.close()
                        part.unlink()
                        raise UpdateRefused(
                            f"target exceeds its signed length of {info.length} bytes", Reason.TARGET_TOO_LARGE
                        )
                    f.write(data)
                    offset += len(data)
                    if on_progress is not None:
                        on_progress(offset, info.length)
        except AgentError:
            raise
        except Exception as e:  # the connection cut or broke mid-file: what arrived stays for a resume
            raise TransientError(f"{source.name}: download cut at {offset} bytes: {e}") from e
        finally:
            if not f.closed:
                f.flush()
                os.fsync(f.fileno())
    return offset
