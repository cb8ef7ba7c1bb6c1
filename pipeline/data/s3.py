"""S3 access for the data layer: the only module that imports boto3.

It owns
- one lazily created boto3 client per process (boto3 clients are not fork-safe), with bounded retries and
  short timeouts so that a wrong or unreachable endpoint fails in seconds;
- a streaming reader that resumes a broken GET with a ``Range`` request (botocore retries the request, not
  the reading of its body), registered as webdataset's ``s3://`` opener;
- uploads (multipart for large files, aborted on failure, so no partial object is ever visible), small
  PUT/GET/HEAD/LIST/DELETE helpers.

The endpoint and credentials come from the standard AWS environment and config files
(``AWS_ENDPOINT_URL_S3``, ``AWS_ENDPOINT_URL``, ``AWS_PROFILE``, ...). Every failure is raised as
:class:`~pipeline.data.storage_types.StorageError` with a message built here from the error code, never from
a botocore exception repr, so no credential or request header can leak into logs. This module never imports
:mod:`pipeline.data.storage` (which imports it lazily, to serve ``s3://`` URLs).
"""

from __future__ import annotations

import importlib
import io
import logging
import os
import random
import sys
import threading
import time
import urllib.parse
from typing import Any

import boto3
import boto3.exceptions
import boto3.s3.transfer
import botocore.config
import botocore.exceptions
import urllib3.exceptions

from pipeline.data.storage_types import ObjectInfo, StorageError

logger = logging.getLogger(__name__)

MiB = 1024 * 1024

# A refused connection fails at once; a black-holed endpoint costs connect_timeout per attempt, so the
# worst case for an unreachable endpoint is 4 x 3 s = 12 s instead of botocore's default 5 x 60 s.
_CLIENT_CONFIG = botocore.config.Config(
    retries={"mode": "standard", "max_attempts": 4},
    connect_timeout=3,
    # A stalled body read is detected after 20 s and then resumed with a Range GET (see _S3RawReader).
    read_timeout=20,
)

# 64 MiB parts: a 1 GiB shard is 16 parts, and 10,000 parts (S3's limit) allow 640 GiB objects.
DEFAULT_PART_SIZE_BYTES = 64 * MiB
MIN_PART_SIZE_BYTES = 5 * MiB  # S3 rejects smaller parts (except the last one).

# The reader's buffer: webdataset asks for 8 KiB, far too small for a per-read Python overhead over HTTP.
READ_BUFFER_BYTES = 1 * MiB
DEFAULT_RESUME_ATTEMPTS = 5
DEFAULT_RESUME_BACKOFF_S = 0.5

# Errors that break a GET's body mid-stream; the request itself succeeded, so botocore never retries them.
_STREAM_ERRORS: tuple[type[BaseException], ...] = (
    botocore.exceptions.ReadTimeoutError,
    botocore.exceptions.ResponseStreamingError,
    botocore.exceptions.IncompleteReadError,
    botocore.exceptions.ConnectionClosedError,
    urllib3.exceptions.ProtocolError,
    urllib3.exceptions.ReadTimeoutError,
    ConnectionError,
    TimeoutError,
)

# While resuming, a re-open may also find the endpoint briefly unreachable (beyond botocore's own retries).
_RESUMABLE_ERRORS = (*_STREAM_ERRORS, botocore.exceptions.ConnectionError)

_clients: dict[tuple[int, str | None, str | None, str | None], Any] = {}
_clients_lock = threading.Lock()


def reset_clients() -> None:
    """Forget the cached clients, e.g. after changing the AWS environment inside one process (tests)."""
    with _clients_lock:
        _clients.clear()


def client() -> Any:
    """This process's S3 client, created on first use.

    Keyed by pid because a client inherited through fork shares its connection pool with the parent, and by
    the endpoint/profile variables so that a changed environment is honoured.
    """
    key = (
        os.getpid(),
        os.environ.get("AWS_ENDPOINT_URL_S3"),
        os.environ.get("AWS_ENDPOINT_URL"),
        os.environ.get("AWS_PROFILE"),
    )
    with _clients_lock:
        if key not in _clients:
            # boto3's default session is shared module state and not thread-safe: use a private one.
            _clients[key] = boto3.session.Session().client("s3", config=_CLIENT_CONFIG)
        return _clients[key]


def split_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` -> ``("bucket", "some/key")``."""
    if not url.startswith("s3://"):
        raise ValueError(f"not an s3:// URL: {url!r}")
    bucket, _, key = url[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"s3 URL without a bucket: {url!r}")
    return bucket, key


def _endpoint(s3_client: Any) -> str:
    """host:port of the client's endpoint (never the full URL, which could embed user info)."""
    parts = urllib.parse.urlsplit(s3_client.meta.endpoint_url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return f"{parts.hostname}:{port}"


def _error(operation: str, url: str, error: BaseException, *, detail: str = "") -> StorageError:
    """A StorageError whose message is built from codes and known fields only (no request headers)."""
    where = f"S3 {operation} {url}{detail}"
    if isinstance(error, botocore.exceptions.ClientError):
        info = error.response.get("Error", {})
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = info.get("Code") or str(status)
        message = info.get("Message") or "no message"
        if code in {"NoSuchKey", "NoSuchBucket", "404", "NotFound"}:
            hint = "check the URL"
        elif code == "PreconditionFailed":
            hint = "the object was replaced while being read; read it again"
        else:
            hint = "check AWS_ENDPOINT_URL_S3 and credentials"
        return StorageError(f"{where} failed: {code} ({message}); {hint}")
    if isinstance(
        error, botocore.exceptions.EndpointConnectionError | botocore.exceptions.ConnectTimeoutError
    ):
        endpoint = _endpoint(client())
        return StorageError(
            f"{where} failed: cannot connect to the S3 endpoint {endpoint}; "
            "check AWS_ENDPOINT_URL_S3 (or AWS_ENDPOINT_URL) and that the server is up"
        )
    if isinstance(
        error, botocore.exceptions.NoCredentialsError | botocore.exceptions.PartialCredentialsError
    ):
        return StorageError(
            f"{where} failed: no usable AWS credentials; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
        )
    # Other botocore errors format only their own fields (endpoint URL, byte counts), never headers.
    return StorageError(
        f"{where} failed: {type(error).__name__} ({error}); check AWS_ENDPOINT_URL_S3 and credentials"
    )


_BOTO_ERRORS = (
    botocore.exceptions.BotoCoreError,
    botocore.exceptions.ClientError,
    boto3.exceptions.Boto3Error,
)


class _S3RawReader(io.RawIOBase):
    """Sequential reader over one object that survives broken connections.

    When the body stream breaks, it re-opens the object with ``Range: bytes=<pos>-`` and
    ``If-Match: <etag>`` (so a replaced object raises instead of splicing two versions), backing off
    exponentially; ``max_attempts`` bounds the consecutive failures without progress.
    """

    def __init__(self, url: str, *, max_attempts: int, backoff_s: float) -> None:
        super().__init__()
        self.url = url
        self._bucket, self._key = split_url(url)
        self._max_attempts = max_attempts
        self._backoff_s = backoff_s
        self._position = 0
        self._etag: str | None = None
        self._body: Any = None
        try:
            self._open()  # Eagerly, so a missing object fails at open time with a clear message.
        except _BOTO_ERRORS as error:
            raise _error("GET", url, error) from error
        self._size: int = self._content_length

    def _open(self) -> None:
        request: dict[str, str] = {"Bucket": self._bucket, "Key": self._key}
        if self._position:
            request["Range"] = f"bytes={self._position}-"
        if self._etag is not None:
            request["IfMatch"] = self._etag
        response = client().get_object(**request)
        self._etag = response["ETag"]
        self._content_length = response["ContentLength"]
        self._body = response["Body"]
        if self._position and response.get("ContentRange", "").rpartition("/")[2] != str(self._size):
            raise StorageError(
                f"S3 GET {self.url}: object size changed while reading at byte offset {self._position} "
                f"({response.get('ContentRange')!r}, expected total {self._size}); read it again"
            )

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        if self._position >= self._size:
            return 0  # Also avoids a Range GET past the end, which S3 answers with 416.
        failures = 0
        while True:
            try:
                if self._body is None:
                    self._open()
                count = self._body.readinto(buffer)
                if count == 0 and len(buffer) > 0:
                    raise botocore.exceptions.IncompleteReadError(
                        actual_bytes=self._position, expected_bytes=self._size
                    )
                self._position += count
                return count
            except _RESUMABLE_ERRORS as error:
                failures += 1
                self._drop_body()
                if failures >= self._max_attempts:
                    raise StorageError(
                        f"S3 GET {self.url} failed at byte offset {self._position} of {self._size} after "
                        f"{failures} attempts: {type(error).__name__}; check the network and AWS_ENDPOINT_URL_S3"
                    ) from error
                # Jitter keeps many workers whose connections broke together from reconnecting in lockstep.
                delay_s = min(self._backoff_s * 2 ** (failures - 1), 10.0) * random.uniform(0.5, 1.0)
                logger.warning(
                    "S3 GET %s broke at byte offset %d of %d (%s); resuming in %.1f s (attempt %d/%d)",
                    self.url, self._position, self._size, type(error).__name__, delay_s,
                    failures + 1, self._max_attempts,
                )  # fmt: skip
                time.sleep(delay_s)
            except _BOTO_ERRORS as error:  # e.g. PreconditionFailed: the object was replaced meanwhile.
                raise _error("GET", self.url, error, detail=f" at byte offset {self._position}") from error

    def _drop_body(self) -> None:
        if self._body is not None:
            try:
                self._body.close()
            except Exception:  # A broken connection may fail to close; it is discarded either way.
                pass
            self._body = None

    def close(self) -> None:
        self._drop_body()
        super().close()


def open_read(
    url: str,
    *,
    max_attempts: int = DEFAULT_RESUME_ATTEMPTS,
    backoff_s: float = DEFAULT_RESUME_BACKOFF_S,
    buffer_size: int = READ_BUFFER_BYTES,
) -> io.BufferedReader:
    """A buffered, sequential binary stream over ``s3://bucket/key`` that resumes broken reads."""
    return io.BufferedReader(_S3RawReader(url, max_attempts=max_attempts, backoff_s=backoff_s), buffer_size)


def _gopen_s3(url: str, mode: str = "rb", bufsize: int = 8192, **_: Any) -> io.BufferedReader:
    """webdataset's handler signature: ``handler(url, mode, bufsize, **kw)`` (see webdataset/gopen.py)."""
    if mode != "rb":
        raise ValueError(
            f"{url}: s3:// is read-only through webdataset; write shards locally and publish them "
            "with pipeline.data.storage.put_file"
        )
    return open_read(url, buffer_size=max(bufsize, READ_BUFFER_BYTES))


def register_webdataset_opener(_worker_id: int | None = None) -> None:
    """Make ``webdataset`` open ``s3://`` URLs with :func:`open_read`; idempotent.

    The registration is module state, lost in spawn/forkserver DataLoader workers: pass this function as
    ``worker_init_fn`` (it accepts and ignores the worker id) to redo it there.
    """
    # Not `import webdataset.gopen`: the package re-exports a function named `gopen` that shadows the module.
    importlib.import_module("webdataset.gopen").gopen_schemes["s3"] = _gopen_s3


def get_bytes(url: str) -> bytes:
    """The whole object, read through the resuming reader."""
    with open_read(url) as stream:
        return stream.read()


def put_bytes(url: str, data: bytes, *, metadata: dict[str, str] | None = None) -> None:
    """Store ``data`` with one PUT, which S3 applies atomically."""
    bucket, key = split_url(url)
    try:
        client().put_object(Bucket=bucket, Key=key, Body=data, Metadata=metadata or {})
    except _BOTO_ERRORS as error:
        raise _error("PUT", url, error) from error


def upload_file(
    local_path: str,
    url: str,
    *,
    metadata: dict[str, str] | None = None,
    part_size_bytes: int = DEFAULT_PART_SIZE_BYTES,
) -> None:
    """Upload a local file; files above ``part_size_bytes`` go up in parts of that size, in parallel.

    s3transfer aborts the multipart upload when any part fails (``CreateMultipartUploadTask`` registers
    ``abort_multipart_upload`` as a failure cleanup), so a failed upload leaves no object and no upload
    in progress. If that abort itself fails (network gone), s3transfer only logs it at DEBUG: keep a bucket
    lifecycle rule ``AbortIncompleteMultipartUpload`` as the backstop.
    """
    if part_size_bytes < MIN_PART_SIZE_BYTES:
        raise ValueError(
            f"part_size_bytes={part_size_bytes} is below S3's minimum part size {MIN_PART_SIZE_BYTES}"
        )
    if not os.path.isfile(local_path):
        raise StorageError(f"S3 upload to {url} failed: no such local file {local_path}; check the path")
    bucket, key = split_url(url)
    transfer_config = boto3.s3.transfer.TransferConfig(
        multipart_threshold=part_size_bytes,
        multipart_chunksize=part_size_bytes,
        max_concurrency=4,  # Enough to fill a link from a 2-8 core data node without starving the decoders.
    )
    try:
        client().upload_file(
            local_path, bucket, key, ExtraArgs={"Metadata": metadata or {}}, Config=transfer_config
        )
    except _BOTO_ERRORS as error:
        raise _error("upload", url, error) from error


def head(url: str) -> ObjectInfo | None:
    """Size and user metadata of an object, or None when it does not exist."""
    bucket, key = split_url(url)
    try:
        response = client().head_object(Bucket=bucket, Key=key)
    except botocore.exceptions.ClientError as error:
        if error.response.get("Error", {}).get("Code") in {"404", "NoSuchKey", "NotFound"}:
            return None
        raise _error("HEAD", url, error) from error
    except _BOTO_ERRORS as error:
        raise _error("HEAD", url, error) from error
    return ObjectInfo(size=response["ContentLength"], metadata=dict(response.get("Metadata", {})))


def list_urls(prefix_url: str, *, page_size: int = 1000) -> list[str]:
    """URLs of every object whose key starts with the prefix, in key order (all pages)."""
    bucket, prefix = split_url(prefix_url)
    paginator = client().get_paginator("list_objects_v2")
    urls: list[str] = []
    try:
        for page in paginator.paginate(
            Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": page_size}
        ):
            urls.extend(f"s3://{bucket}/{item['Key']}" for item in page.get("Contents", []))
    except _BOTO_ERRORS as error:
        raise _error("LIST", prefix_url, error) from error
    return urls


def delete(url: str) -> None:
    """Delete an object; deleting a missing key succeeds, as on S3."""
    bucket, key = split_url(url)
    try:
        client().delete_object(Bucket=bucket, Key=key)
    except _BOTO_ERRORS as error:
        raise _error("DELETE", url, error) from error


# Importing webdataset costs ~3 s (it imports torch), too much for jobs that only upload: register here only
# when it is already loaded; the loader calls register_webdataset_opener() itself, in every worker too.
if "webdataset" in sys.modules:
    register_webdataset_opener()
