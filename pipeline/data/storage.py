"""URL-agnostic file access for the data layer: local paths and ``s3://bucket/key`` URLs behind one API.

The shard writer, the manifest code and the loader call these helpers and never branch on local vs S3.
This module owns the local-filesystem side (atomic writes via temp file + fsync + ``os.replace``) and the
two types shared with :mod:`pipeline.data.s3`: :class:`StorageError` and :class:`ObjectInfo`. The S3 side
is delegated to :mod:`pipeline.data.s3`, imported lazily so that local-only processes never import boto3.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import BinaryIO

from pipeline.errors import PipelineError

S3_SCHEME = "s3://"


class StorageError(PipelineError):
    """A storage operation failed; the message names the URL or path and what to check.

    Messages never carry credentials or raw request headers, so they are safe to log.
    """


@dataclass(frozen=True)
class ObjectInfo:
    """What a stat/HEAD returns for one file or object."""

    size: int
    """Size in bytes."""
    metadata: dict[str, str] = field(default_factory=dict)
    """User metadata (S3 lower-cases the keys); always empty for local files."""


def is_s3(url: str) -> bool:
    """True for ``s3://`` URLs, False for local paths."""
    return url.startswith(S3_SCHEME)


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


def join(url: str, *names: str) -> str:
    """Join path components the way the URL's storage expects (``/`` on S3, ``os.path.join`` locally)."""
    if is_s3(url):
        return "/".join([url.rstrip("/"), *(name.strip("/") for name in names)])
    return os.path.join(url, *names)


def read_bytes(url: str) -> bytes:
    """The whole content of a file or object."""
    if is_s3(url):
        from pipeline.data import s3

        return s3.get_bytes(url)
    with _open_local(url) as file:
        return file.read()


def write_bytes_atomic(url: str, data: bytes) -> None:
    """Write ``data`` so that readers see either the old content or all of the new one, never a part."""
    if is_s3(url):
        from pipeline.data import s3

        # A single PUT is atomic on S3: the object appears complete or not at all.
        s3.put_bytes(url, data)
        return
    with _temp_file_beside(url) as (temp_file, temp_path):
        temp_file.write(data)
    _publish(temp_path, url)


def put_file(
    local_path: str, url: str, *, metadata: dict[str, str] | None = None, move: bool = False
) -> None:
    """Publish a finished local file at ``url`` atomically; ``move=True`` removes ``local_path`` afterwards.

    ``metadata`` is stored as S3 user metadata; local files have nowhere to keep it, so it is dropped there.
    """
    if not os.path.isfile(local_path):
        raise StorageError(f"{local_path}: no such file to publish at {url}; check the path")
    if is_s3(url):
        from pipeline.data import s3

        s3.upload_file(local_path, url, metadata=metadata)
        if move:
            os.remove(local_path)
        return
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


def stat(url: str) -> ObjectInfo | None:
    """Size and metadata of a file/object, or None when there is none (a local directory counts as none)."""
    if is_s3(url):
        from pipeline.data import s3

        return s3.head(url)
    if not os.path.isfile(url):
        return None
    return ObjectInfo(size=os.path.getsize(url))


def exists(url: str) -> bool:
    """True when a file/object exists at ``url`` (directories and S3 prefixes are not objects)."""
    return stat(url) is not None


def open_read(url: str) -> BinaryIO:
    """A binary stream over the file/object; S3 streams resume by themselves when a connection breaks."""
    if is_s3(url):
        from pipeline.data import s3

        return s3.open_read(url)
    return _open_local(url)


def makedirs(url: str) -> None:
    """Create a local directory and its parents; a no-op on S3, where prefixes need no creation."""
    if not is_s3(url):
        os.makedirs(url, exist_ok=True)


def list_names(url: str) -> list[str]:
    """Sorted names of the direct children of a local directory or S3 prefix (files and subdirectories)."""
    if is_s3(url):
        from pipeline.data import s3

        prefix = url.rstrip("/") + "/"
        return sorted({child[len(prefix) :].split("/", 1)[0] for child in s3.list_urls(prefix)})
    if not os.path.isdir(url):
        raise StorageError(f"{url}: no such directory; check the path (shards are written by the shard job)")
    return sorted(os.listdir(url))


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
