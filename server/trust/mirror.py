"""Publish the TUF repository to a static mirror: a directory any HTTP(S) server (nginx, a CDN origin, an object
store synced from it) serves as is.

The layout is TUF's own with consistent snapshots, what python-tuf's ngclient asks a mirror for:

    DEST/metadata/1.root.json, 2.root.json, ...   every root version
    DEST/metadata/N.snapshot.json, N.targets.json, N.r-<hash>.json
    DEST/metadata/timestamp.json                  the only file replaced in place
    DEST/targets/<dir>/<sha256>.<basename>         target bytes under their hash-prefixed names

Invariants a reader of the mirror can rely on at any moment of a sync (an agent, a CDN pulling from it):
- Every file appears whole: it is written to a temporary name in its directory, fsynced, then renamed.
- Whatever timestamp.json a reader gets, every file it names (directly or through its snapshot and targets)
  is already there: targets are written first, then versioned metadata, timestamp.json last. Versioned files
  are never rewritten (consistent snapshots), so a reader still on the previous timestamp is not disturbed.
- A file is deleted only after the new timestamp.json is in place, only if the repository no longer has it,
  and never while the published metadata still names it (a release retired by `fedfleet releases retire`
  leaves the mirror after the metadata that dropped it).
A second sync with nothing new writes nothing. Nothing here is trusted by a client: the mirror only moves bytes
that ngclient and the agent verify.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from edge_agent.contract.files import atomic_write_bytes, fsync_dir, remove_stale_temp_files
from server.errors import CoordinatorError
from server.trust.repository import Repository

__all__ = ["MirrorError", "MirrorSync", "published_files", "sync_mirror"]

logger = logging.getLogger(__name__)

_TIMESTAMP = "timestamp.json"
_LOCK = ".fedfleet-sync.lock"


class MirrorError(CoordinatorError):
    """A mirror destination that cannot be written, or a repository that cannot be read."""


@dataclass
class MirrorSync:
    """What one sync did: paths relative to the mirror's root."""

    destination: str
    timestamp_version: int
    written: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    unchanged: int = 0


def _files(directory: Path) -> Iterator[Path]:
    """Regular files under `directory`, without temporaries (dot files) a writer may be holding."""
    if not directory.is_dir():
        return
    for path in sorted(directory.rglob("*")):
        if path.is_file() and not any(part.startswith(".") for part in path.relative_to(directory).parts):
            yield path


def published_files(timestamp: bytes, metadata_dir: Path) -> set[str]:
    """The files (relative to the repository root) a client following this timestamp.json fetches: the snapshot it
    names, the targets and release roles that snapshot names, and the target files those list. Unreadable
    or missing metadata names nothing further (the caller treats what it cannot read as referenced)."""
    names = {f"metadata/{_TIMESTAMP}"}
    try:
        snapshot_name = f"{int(json.loads(timestamp)['signed']['meta']['snapshot.json']['version'])}.snapshot.json"
        names.add(f"metadata/{snapshot_name}")
        meta = json.loads((metadata_dir / snapshot_name).read_bytes())["signed"]["meta"]
        for role_file, info in meta.items():
            role_name = f"{int(info['version'])}.{role_file}"
            names.add(f"metadata/{role_name}")
            signed = json.loads((metadata_dir / role_name).read_bytes())["signed"]
            for path, target in signed.get("targets", {}).items():
                directory, sep, base = str(path).rpartition("/")
                names.add(f"targets/{directory}{sep}{target['hashes']['sha256']}.{base}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise MirrorError(f"the repository's metadata could not be followed: {e}") from e
    return names


@contextmanager
def _locked(dest: Path) -> Iterator[None]:
    """One sync at a time per destination (`serve` and a person running `fedfleet mirror sync`)."""
    with open(dest / _LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _same(path: Path, data_path: Path, immutable: bool) -> bool:
    """Whether `path` in the mirror already holds `data_path`'s bytes. Versioned metadata and targets never change
    under their names (targets are named by their sha256), so for those the size says it; the rest is compared."""
    try:
        if immutable:
            return path.stat().st_size == data_path.stat().st_size
        return path.read_bytes() == data_path.read_bytes()
    except FileNotFoundError:
        return False


def _copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(target, source.read_bytes())


def sync_mirror(repository: Repository, dest: Path) -> MirrorSync:
    """Bring the mirror at `dest` up to the repository's current timestamp (see the module's invariants)."""
    if dest.resolve() == repository.dir.resolve() or repository.dir.resolve() in dest.resolve().parents:
        raise MirrorError(f"{dest} lies inside the repository; give a directory of its own")
    try:
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "metadata").mkdir(exist_ok=True)
        (dest / "targets").mkdir(exist_ok=True)
    except OSError as e:
        raise MirrorError(f"cannot create the mirror directory {dest}: {e.strerror}") from e
    if not os.access(dest, os.W_OK):
        raise MirrorError(f"the mirror directory {dest} is not writable")
    with _locked(dest):
        for directory in (dest / "metadata", dest / "targets", *(dest / "targets").iterdir()):
            if directory.is_dir():
                remove_stale_temp_files(directory)  # from a sync that was killed
        # The timestamp is read once, first: what this sync publishes is exactly the state it names. Files the
        # repository writes meanwhile are copied if seen, and are harmless (nothing published names them yet).
        try:
            timestamp = (repository.metadata_dir / _TIMESTAMP).read_bytes()
            version = int(json.loads(timestamp)["signed"]["version"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise MirrorError(f"the repository's timestamp.json is unreadable ({e}); run `fedfleet init`") from e
        referenced = published_files(timestamp, repository.metadata_dir)
        result = MirrorSync(str(dest), version)
        sources = [
            (source, source.relative_to(repository.dir).as_posix())
            for kind in ("targets", "metadata")  # targets first, then versioned metadata, timestamp.json last
            for source in _files(repository.dir / kind)
            if source.name != _TIMESTAMP or source.parent != repository.metadata_dir
        ]
        source_names = {name for _, name in sources}
        missing = sorted(n for n in referenced - source_names if n != f"metadata/{_TIMESTAMP}")
        if missing:  # a file the timestamp names vanished meanwhile (retired): leave the mirror as it is
            raise MirrorError(f"the repository changed during the sync ({missing[0]} is gone); run the sync again")
        for source, name in sources:
            target = dest / name
            if _same(target, source, immutable=True):
                result.unchanged += 1
                continue
            try:
                _copy(source, target)
            except FileNotFoundError:
                if name in referenced:
                    raise MirrorError(
                        f"the repository changed during the sync ({name} is gone); run the sync again"
                    ) from None
                continue  # retired meanwhile, and nothing this sync publishes names it
            except OSError as e:
                raise MirrorError(f"cannot write {target}: {e.strerror}; the mirror keeps its previous state") from e
            result.written.append(name)
        if (dest / "metadata" / _TIMESTAMP).is_file() and (dest / "metadata" / _TIMESTAMP).read_bytes() == timestamp:
            result.unchanged += 1
        else:
            atomic_write_bytes(dest / "metadata" / _TIMESTAMP, timestamp)
            result.written.append(f"metadata/{_TIMESTAMP}")
        # Last: what the repository no longer has and the metadata just published does not name.
        for kind in ("targets", "metadata"):
            for path in _files(dest / kind):
                name = path.relative_to(dest).as_posix()
                if name in source_names or name in referenced:
                    continue
                path.unlink()
                result.deleted.append(name)
                if path.parent != dest / kind and not any(path.parent.iterdir()):
                    path.parent.rmdir()
        if result.deleted:
            fsync_dir(dest / "targets")
    if result.written or result.deleted:
        logger.info(
            "mirror %s at timestamp %d: %d file(s) written, %d deleted",
            dest,
            version,
            len(result.written),
            len(result.deleted),
        )
    return result
