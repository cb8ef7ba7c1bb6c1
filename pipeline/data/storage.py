"""URL-agnostic file access for the data layer: one small :class:`Backend` interface, chosen by URL scheme.

Callers use the functions below (``read_bytes``, ``write_bytes_atomic``, ``put_file``, ``stat``, ...) and,
where local and remote storage really differ, ask :func:`backend_for` a named question
(``shared_by_cluster``, ``keeps_metadata``, ``local_path``) instead of testing the scheme themselves.

- Local paths (no ``scheme://``) go to :class:`LocalBackend`, which owns the local-filesystem side: atomic
  writes via temp file + fsync + ``os.replace``.
- ``s3://bucket/key`` goes to :class:`S3Backend`, a thin adapter over :mod:`pipeline.data.s3` imported
  lazily, so that local-only processes never import boto3.
- Another scheme (``gs://``) is one class implementing :class:`Backend`, added with :func:`register_backend`.

Imports flow one way: this module -> :mod:`pipeline.data.s3` (lazily) -> :mod:`pipeline.data.storage_types`,
which holds the shared :class:`StorageError` and :class:`ObjectInfo` (re-exported here for callers).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO, Protocol

from pipeline.data.storage_types import ObjectInfo, StorageError

__all__ = [
    "Backend",
    "LocalBackend",
    "ObjectInfo",
    "S3Backend",
    "StorageError",
    "absolute",
    "backend_for",
    "default_location",
    "exists",
    "is_directory",
    "join",
    "list_files",
    "list_names",
    "local_path",
    "makedirs",
    "open_read",
    "put_file",
    "read_bytes",
    "register_backend",
    "stat",
    "under_any",
    "write_bytes_atomic",
]


class Backend(Protocol):
    """Everything callers need of one kind of storage; one stateless instance serves every URL of a scheme."""

    shared_by_cluster: bool
    """Every node of a cluster sees the same data at a URL (object stores); False for this machine's disk."""
    keeps_metadata: bool
    """``put_file(metadata=...)`` is stored and comes back from ``stat``; False where it is dropped."""

    def join(self, url: str, *names: str) -> str:
        """Path components joined the way this storage expects (``/`` on S3, ``os.path.join`` locally)."""
        ...

    def absolute(self, url: str) -> str:
        """The URL in a form that means the same from any working directory (Ray workers run elsewhere)."""
        ...

    def local_path(self, url: str) -> str | None:
        """The path on this machine's filesystem, or None when the data lives elsewhere."""
        ...

    def read_bytes(self, url: str) -> bytes:
        """The whole content of a file or object."""
        ...

    def write_bytes_atomic(self, url: str, data: bytes) -> None:
        """Write ``data`` so that readers see either the old content or all of the new one, never a part."""
        ...

    def put_file(self, local_path: str, url: str, *, metadata: dict[str, str] | None, move: bool) -> None:
        """Publish a finished local file at ``url`` atomically; ``move=True`` removes ``local_path`` after."""
        ...

    def stat(self, url: str) -> ObjectInfo | None:
        """Size and metadata of a file/object, or None when there is none (a directory counts as none)."""
        ...

    def open_read(self, url: str) -> BinaryIO:
        """A binary stream over the file/object."""
        ...

    def makedirs(self, url: str) -> None:
        """Make ``url`` a place files can be written under (a no-op where prefixes need no creation)."""
        ...

    def is_directory(self, url: str) -> bool:
        """True when ``url`` can be listed as a directory (it may hold nothing)."""
        ...

    def list_names(self, url: str) -> list[str]:
        """Sorted names of the direct children of a directory or prefix (files and subdirectories)."""
        ...

    def list_files(self, url: str) -> list[str]:
        """URLs of every file under a directory or prefix, at any depth, in a deterministic order."""
        ...

    def register_webdataset_opener(self) -> None:
        """Make webdataset open this storage's URLs in this process; idempotent."""
        ...


def _require_file(local_path: str, url: str) -> None:
    if not os.path.isfile(local_path):
        raise StorageError(f"{local_path}: no such file to publish at {url}; check the path")


class LocalBackend:
    """This machine's filesystem: plain paths, atomic writes via temp file + fsync + ``os.replace``."""

    shared_by_cluster = False
    keeps_metadata = False  # A file has nowhere to keep user metadata: put_file drops it.

    def join(self, url: str, *names: str) -> str:
        return os.path.join(url, *names)

    def absolute(self, url: str) -> str:
        return str(Path(url).expanduser().resolve())

    def local_path(self, url: str) -> str | None:
        return url

    def read_bytes(self, url: str) -> bytes:
        with _open_local(url) as file:
            return file.read()

    def write_bytes_atomic(self, url: str, data: bytes) -> None:
        with _temp_file_beside(url) as (temp_file, temp_path):
            temp_file.write(data)
        _publish(temp_path, url)

    def put_file(self, local_path: str, url: str, *, metadata: dict[str, str] | None, move: bool) -> None:
        _require_file(local_path, url)
        if move:
            try:
                # Same filesystem: a rename is atomic and copies nothing.
                os.replace(local_path, url)
                _fsync_dir(os.path.dirname(url) or ".")
                return
            except OSError as error:
                if error.errno != errno.EXDEV:  # EXDEV: another filesystem, so copy below.
                    raise
        with _temp_file_beside(url) as (temp_file, temp_path), open(local_path, "rb") as source:
            shutil.copyfileobj(source, temp_file, length=8 * 1024 * 1024)
        _publish(temp_path, url)
        if move:
            os.remove(local_path)

    def stat(self, url: str) -> ObjectInfo | None:
        if not os.path.isfile(url):
            return None
        return ObjectInfo(size=os.path.getsize(url))

    def open_read(self, url: str) -> BinaryIO:
        return _open_local(url)

    def makedirs(self, url: str) -> None:
        os.makedirs(url, exist_ok=True)

    def is_directory(self, url: str) -> bool:
        return os.path.isdir(url)

    def list_names(self, url: str) -> list[str]:
        if not os.path.isdir(url):
            raise StorageError(
                f"{url}: no such directory; check the path (shards are written by the shard job)"
            )
        return sorted(os.listdir(url))

    def list_files(self, url: str) -> list[str]:
        if not os.path.isdir(url):
            raise StorageError(f"{url}: no such directory; check the path")
        found = []
        # A directory's own files first, then its subdirectories, each level sorted.
        for directory, subdirs, files in os.walk(url):
            subdirs.sort()
            found += [os.path.join(directory, name) for name in sorted(files)]
        return found

    def register_webdataset_opener(self) -> None:
        pass  # webdataset opens local paths itself.


class S3Backend:
    """``s3://bucket/key`` through :mod:`pipeline.data.s3` (boto3), imported on first use."""

    shared_by_cluster = True
    keeps_metadata = True  # put_file stores it as S3 user metadata; stat returns it from a HEAD.

    def join(self, url: str, *names: str) -> str:
        return "/".join([url.rstrip("/"), *(name.strip("/") for name in names)])

    def absolute(self, url: str) -> str:
        return url

    def local_path(self, url: str) -> str | None:
        return None

    def read_bytes(self, url: str) -> bytes:
        from pipeline.data import s3

        return s3.get_bytes(url)

    def write_bytes_atomic(self, url: str, data: bytes) -> None:
        from pipeline.data import s3

        # A single PUT is atomic on S3: the object appears complete or not at all.
        s3.put_bytes(url, data)

    def put_file(self, local_path: str, url: str, *, metadata: dict[str, str] | None, move: bool) -> None:
        _require_file(local_path, url)
        from pipeline.data import s3

        s3.upload_file(local_path, url, metadata=metadata)
        if move:
            os.remove(local_path)

    def stat(self, url: str) -> ObjectInfo | None:
        from pipeline.data import s3

        return s3.head(url)

    def open_read(self, url: str) -> BinaryIO:
        from pipeline.data import s3

        # The stream resumes by itself (a Range GET) when a connection breaks mid-read.
        return s3.open_read(url)

    def makedirs(self, url: str) -> None:
        pass  # S3 has no directories: a key's prefixes need no creation.

    def is_directory(self, url: str) -> bool:
        return True  # Any prefix can be listed; one that holds nothing lists nothing.

    def list_names(self, url: str) -> list[str]:
        from pipeline.data import s3

        prefix = url.rstrip("/") + "/"
        return sorted({child[len(prefix) :].split("/", 1)[0] for child in s3.list_urls(prefix)})

    def list_files(self, url: str) -> list[str]:
        from pipeline.data import s3

        # Keys ending in "/" are the empty "folder" objects some S3 consoles create, not files.
        return sorted(u for u in s3.list_urls(url.rstrip("/") + "/") if not u.endswith("/"))

    def register_webdataset_opener(self) -> None:
        from pipeline.data import s3

        s3.register_webdataset_opener()


LOCAL = LocalBackend()
"""The backend of plain paths (no ``scheme://``)."""
_BACKENDS: dict[str, Backend] = {}
# RFC 3986 scheme syntax; a path such as "data/a://b" does not start with one, so it stays local.
_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


def register_backend(scheme: str, backend_class: type[Backend]) -> None:
    """Serve ``scheme://`` URLs (case-sensitive, e.g. ``"gs"``) with an instance of ``backend_class``."""
    _BACKENDS[scheme] = backend_class()


register_backend("s3", S3Backend)


def backend_for(url: str) -> Backend:
    """The backend that serves ``url``: by its scheme, :data:`LOCAL` for a plain path.

    An unregistered scheme raises :class:`StorageError` naming the URL and the schemes there are.
    """
    match = _SCHEME.match(url)
    if match is None:
        return LOCAL
    backend = _BACKENDS.get(match.group(1))
    if backend is None:
        known = ", ".join(f"{scheme}://" for scheme in sorted(_BACKENDS))
        raise StorageError(
            f"{_without_userinfo(url)}: no storage backend for {match.group(1)}:// URLs; "
            f"use a local path or one of: {known}"
        )
    return backend


def _without_userinfo(url: str) -> str:
    """The URL without a ``user:password@`` part, which must not reach a log."""
    parts = urllib.parse.urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


STORAGE_ROOT_ENV = "PIPELINE_STORAGE_ROOT"
LOCAL_DEFAULT = ".cache/ray_results"


def default_location(kind: str) -> str:
    """Where jobs keep ``kind`` (``checkpoints``, ``tune``) when the config leaves it null: under
    ``$PIPELINE_STORAGE_ROOT`` (e.g. ``s3://my-bucket/pipeline``: one setting for every job on a cluster),
    else ``.cache/ray_results`` on this machine."""
    root = os.environ.get(STORAGE_ROOT_ENV, "").strip()
    return join(root, kind) if root else LOCAL_DEFAULT


def under_any(path: str, roots: list[str]) -> bool:
    """True when the local ``path`` lies in one of the local directories ``roots`` (after resolving both)."""
    resolved = os.path.realpath(os.path.expanduser(path))
    for root in roots:
        base = os.path.realpath(os.path.expanduser(root))
        if resolved == base or resolved.startswith(base.rstrip(os.sep) + os.sep):
            return True
    return False


# -- The backend operations by URL (see Backend for each one's contract) ---------------------------------


def join(url: str, *names: str) -> str:
    """Join path components the way the URL's storage expects (``/`` on S3, ``os.path.join`` locally)."""
    return backend_for(url).join(url, *names)


def absolute(url: str) -> str:
    """A URL as is; a local path made absolute, because Ray workers do not run in the driver's cwd."""
    return backend_for(url).absolute(url)


def local_path(url: str) -> str | None:
    """The path on this machine's filesystem, or None when ``url`` is remote (e.g. ``s3://``)."""
    return backend_for(url).local_path(url)


def read_bytes(url: str) -> bytes:
    """The whole content of a file or object."""
    return backend_for(url).read_bytes(url)


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write ``data`` so that readers see either the old content or all of the new one, never a part."""
    backend_for(url).write_bytes_atomic(url, data)


def put_file(
    local_path: str, url: str, *, metadata: dict[str, str] | None = None, move: bool = False
) -> None:
    """Publish a finished local file at ``url`` atomically; ``move=True`` removes ``local_path`` afterwards.

    ``metadata`` is stored where the backend ``keeps_metadata`` (S3 user metadata); local files drop it.
    """
    backend_for(url).put_file(local_path, url, metadata=metadata, move=move)


def stat(url: str) -> ObjectInfo | None:
    """Size and metadata of a file/object, or None when there is none (a local directory counts as none)."""
    return backend_for(url).stat(url)


def exists(url: str) -> bool:
    """True when a file/object exists at ``url`` (directories and S3 prefixes are not objects)."""
    return stat(url) is not None


def open_read(url: str) -> BinaryIO:
    """A binary stream over the file/object; S3 streams resume by themselves when a connection breaks."""
    return backend_for(url).open_read(url)


def makedirs(url: str) -> None:
    """Create a local directory and its parents; a no-op on S3, where prefixes need no creation."""
    backend_for(url).makedirs(url)


def is_directory(url: str) -> bool:
    """True for an existing local directory and for any S3 prefix (S3 has no directories to check)."""
    return backend_for(url).is_directory(url)


def list_names(url: str) -> list[str]:
    """Sorted names of the direct children of a local directory or S3 prefix (files and subdirectories)."""
    return backend_for(url).list_names(url)


def list_files(url: str) -> list[str]:
    """Every file under a local directory (StorageError when there is none) or S3 prefix, at any depth."""
    return backend_for(url).list_files(url)


# -- Local-filesystem helpers -------------------------------------------------------------------------------


def _open_local(path: str) -> BinaryIO:
    try:
        return open(path, "rb")
    except FileNotFoundError:
        raise StorageError(f"{path}: no such file; check the path and that the data was written") from None


@contextlib.contextmanager
def _temp_file_beside(destination: str) -> Iterator[tuple[BinaryIO, str]]:
    """A temp file in the destination's directory (so ``os.replace`` stays on one filesystem), fsynced on exit.

    On an exception the temp file is removed, so a failed write leaves nothing behind.
    """
    directory = os.path.dirname(destination) or "."
    if not os.path.isdir(directory):
        raise StorageError(f"{directory}: no such directory; create it first (storage.makedirs)")
    descriptor, temp_path = tempfile.mkstemp(
        dir=directory, prefix=f".{os.path.basename(destination)}.", suffix=".tmp"
    )
    try:
        with os.fdopen(descriptor, "wb") as temp_file:
            yield temp_file, temp_path
            temp_file.flush()
            # Without fsync a crash after os.replace can leave a zero-length file under the final name.
            os.fsync(temp_file.fileno())
    except BaseException:
        os.remove(temp_path)
        raise


def _publish(temp_path: str, url: str) -> None:
    os.replace(temp_path, url)
    # The rename itself is durable only once the directory entry is flushed.
    _fsync_dir(os.path.dirname(url) or ".")


def _fsync_dir(directory: str) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
