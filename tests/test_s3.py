"""S3 and storage helpers against a real S3-compatible server (moto on 127.0.0.1) and local paths.

Faults are injected through botocore's event hooks on the real client (a GET body that breaks after k bytes,
an UploadPart whose connection drops), so the server, the Range requests and the multipart calls are real.
"""

from __future__ import annotations

import io
import os
import tarfile
import time
import traceback

import botocore.exceptions
import pytest

from pipeline.data import s3, storage
from pipeline.data.storage import ObjectInfo, StorageError
from pipeline.stack import free_port


@pytest.fixture(autouse=True)
def fresh_clients():
    """Each test gets new clients: hooks registered by one test must not leak into the next."""
    s3.reset_clients()
    yield
    s3.reset_clients()


class _BreakingBody:
    """A GET body that raises ResponseStreamingError (a reset connection) after ``break_after`` bytes."""

    def __init__(self, body, *, break_after: int, on_break=None) -> None:
        self._body = body
        self._remaining = break_after
        self._on_break = on_break

    def readinto(self, buffer) -> int:
        if self._remaining <= 0:
            if self._on_break is not None:
                self._on_break()
            raise botocore.exceptions.ResponseStreamingError(error="injected: connection reset by peer")
        count = self._body.readinto(memoryview(buffer)[: self._remaining])
        self._remaining -= count
        return count

    def close(self) -> None:
        self._body.close()


def _inject_get_faults(break_after: list[int | None], on_break=None) -> list[dict]:
    """The n-th GET's body breaks after ``break_after[n]`` bytes (None: intact); returns each GET's params."""
    requests: list[dict] = []
    events = s3.client().meta.events

    def record(params, **_):
        requests.append(dict(params))

    def maybe_break(parsed, **_):
        index = len(requests) - 1
        limit = break_after[index] if index < len(break_after) else break_after[-1]
        if limit is not None and "Body" in parsed:
            parsed["Body"] = _BreakingBody(parsed["Body"], break_after=limit, on_break=on_break)

    events.register("before-parameter-build.s3.GetObject", record)
    events.register("after-call.s3.GetObject", maybe_break)
    return requests


def _count_calls(operation: str) -> list[int]:
    calls: list[int] = []
    s3.client().meta.events.register(f"after-call.s3.{operation}", lambda **_: calls.append(1))
    return calls


# --- round trips -------------------------------------------------------------------------------------


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "store")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/data"


def test_storage_round_trip(root, tmp_path):
    storage.makedirs(root)
    storage.makedirs(storage.join(root, "sub"))
    storage.write_bytes_atomic(storage.join(root, "a.bin"), b"first")
    storage.write_bytes_atomic(storage.join(root, "a.bin"), b"second")  # replaces
    source = tmp_path / "shard.tar"
    source.write_bytes(b"x" * 1000)
    storage.put_file(str(source), storage.join(root, "sub", "b.tar"), metadata={"sha256": "abc"})

    assert storage.read_bytes(storage.join(root, "a.bin")) == b"second"
    with storage.open_read(storage.join(root, "sub", "b.tar")) as stream:
        assert stream.read() == b"x" * 1000
    info = storage.stat(storage.join(root, "sub", "b.tar"))
    expected_metadata = {"sha256": "abc"} if storage.backend_for(root).keeps_metadata else {}
    assert info == ObjectInfo(size=1000, metadata=expected_metadata)
    assert storage.exists(storage.join(root, "a.bin"))
    assert not storage.exists(storage.join(root, "missing.bin"))
    assert storage.stat(storage.join(root, "missing.bin")) is None
    # No temp files left behind by the atomic writes.
    assert storage.list_names(root) == ["a.bin", "sub"]
    assert storage.list_names(storage.join(root, "sub")) == ["b.tar"]
    assert storage.list_files(root) == [storage.join(root, "a.bin"), storage.join(root, "sub", "b.tar")]
    assert storage.is_directory(root)

    storage.put_file(str(source), storage.join(root, "moved.tar"), move=True)
    assert not source.exists()
    assert storage.read_bytes(storage.join(root, "moved.tar")) == b"x" * 1000


def test_s3_put_get_head_list_delete_with_pagination(s3_bucket):
    prefix = f"s3://{s3_bucket}/shards/"
    urls = [f"{prefix}shard-{index:06d}.tar" for index in range(7)]
    for index, url in enumerate(urls):
        s3.put_bytes(url, bytes([index]) * (index + 1), metadata={"index": str(index)})
    s3.put_bytes(f"s3://{s3_bucket}/other/x.tar", b"outside the prefix")
    list_calls = _count_calls("ListObjectsV2")

    assert s3.list_urls(prefix, page_size=3) == urls
    assert len(list_calls) == 3  # 3 + 3 + 1 keys: pagination really happened
    assert s3.get_bytes(urls[4]) == bytes([4]) * 5
    assert s3.head(urls[4]) == ObjectInfo(size=5, metadata={"index": "4"})

    s3.delete(urls[4])
    assert s3.head(urls[4]) is None
    assert s3.list_urls(prefix) == urls[:4] + urls[5:]
    s3.delete(urls[4])  # deleting a missing key is not an error, as on S3


# --- resuming reader ---------------------------------------------------------------------------------


def test_reader_resumes_broken_stream_with_range_requests(s3_bucket):
    url = f"s3://{s3_bucket}/big.bin"
    data = os.urandom(300_000)
    s3.put_bytes(url, data)
    requests = _inject_get_faults([100_000, 50_000, None])

    with s3.open_read(url, backoff_s=0.01, buffer_size=16 * 1024) as stream:
        assert stream.read() == data

    assert [request.get("Range") for request in requests] == [None, "bytes=100000-", "bytes=150000-"]
    etag = requests[1]["IfMatch"]
    assert etag and requests[2]["IfMatch"] == etag  # resumed GETs are pinned to the first version


def test_reader_gives_up_after_retry_budget(s3_bucket):
    url = f"s3://{s3_bucket}/flaky.bin"
    s3.put_bytes(url, os.urandom(50_000))
    requests = _inject_get_faults([1_000, 0])  # the first body breaks at 1000 bytes, every re-open at once

    with pytest.raises(StorageError) as raised:
        s3.open_read(url, max_attempts=3, backoff_s=0.01).read()

    assert url in str(raised.value)
    assert "byte offset 1000" in str(raised.value)
    assert len(requests) == 3  # the first GET and two resumes, then the budget is spent


def test_reader_detects_object_replaced_while_reading(s3_bucket):
    url = f"s3://{s3_bucket}/replaced.bin"
    s3.put_bytes(url, b"a" * 50_000)
    _inject_get_faults([10_000, None], on_break=lambda: s3.put_bytes(url, b"b" * 50_000))

    with pytest.raises(StorageError, match="PreconditionFailed") as raised:
        s3.get_bytes(url)
    assert url in str(raised.value)


# --- multipart upload --------------------------------------------------------------------------------


def test_multipart_upload_round_trip(s3_bucket, tmp_path):
    url = f"s3://{s3_bucket}/large.tar"
    path = tmp_path / "large.tar"
    data = os.urandom(11 * 1024 * 1024)
    path.write_bytes(data)
    creates = _count_calls("CreateMultipartUpload")
    parts = _count_calls("UploadPart")

    s3.upload_file(str(path), url, metadata={"sha256": "deadbeef"}, part_size_bytes=5 * 1024 * 1024)

    assert (len(creates), len(parts)) == (1, 3)  # 5 + 5 + 1 MiB
    assert s3.head(url) == ObjectInfo(size=len(data), metadata={"sha256": "deadbeef"})
    assert s3.get_bytes(url) == data


def test_failed_multipart_upload_leaves_nothing(s3_bucket, tmp_path):
    url = f"s3://{s3_bucket}/broken.tar"
    path = tmp_path / "broken.tar"
    path.write_bytes(os.urandom(11 * 1024 * 1024))
    creates = _count_calls("CreateMultipartUpload")
    aborts = _count_calls("AbortMultipartUpload")

    def drop_part_two(request, **_):
        # Every attempt at part 2 loses its connection, so botocore's retries run out too.
        if "partNumber=2" in request.url:
            raise botocore.exceptions.ConnectionClosedError(endpoint_url="injected")

    s3.client().meta.events.register("before-send.s3.UploadPart", drop_part_two)

    with pytest.raises(StorageError) as raised:
        s3.upload_file(str(path), url, part_size_bytes=5 * 1024 * 1024)

    assert url in str(raised.value)
    assert len(creates) == 1 and len(aborts) == 1  # a multipart upload was started, then aborted
    assert s3.head(url) is None
    assert "Uploads" not in s3.client().list_multipart_uploads(Bucket=s3_bucket)


# --- webdataset --------------------------------------------------------------------------------------


def _samples() -> list[dict]:
    return [
        {"__key__": f"sample{index:04d}", "jpg": os.urandom(500 + index), "cls": b"%d" % index}
        for index in range(3)
    ]


def _tar_bytes(samples: list[dict]) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for sample in samples:
            for extension in ("jpg", "cls"):
                member = tarfile.TarInfo(f"{sample['__key__']}.{extension}")
                member.size = len(sample[extension])
                tar.addfile(member, io.BytesIO(sample[extension]))
    return buffer.getvalue()


def _strip(sample: dict) -> dict:
    return {key: sample[key] for key in ("__key__", "jpg", "cls")}


def test_webdataset_reads_s3_shard(s3_bucket):
    import webdataset as wds

    url = f"s3://{s3_bucket}/shard-000000.tar"
    samples = _samples()
    s3.put_bytes(url, _tar_bytes(samples))
    s3.register_webdataset_opener()
    s3.register_webdataset_opener()  # idempotent

    dataset = wds.WebDataset(url, shardshuffle=False, nodesplitter=wds.split_by_node)
    assert [_strip(sample) for sample in dataset] == samples


def test_webdataset_reads_s3_shard_in_spawned_worker(s3_bucket):
    import torch.utils.data
    import webdataset as wds

    url = f"s3://{s3_bucket}/shard-000000.tar"
    samples = _samples()
    s3.put_bytes(url, _tar_bytes(samples))

    dataset = wds.WebDataset(url, shardshuffle=False, nodesplitter=wds.split_by_node)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=None,
        num_workers=1,
        multiprocessing_context="spawn",
        worker_init_fn=s3.register_webdataset_opener,
    )
    assert [_strip(sample) for sample in loader] == samples


# --- failures ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("operation", ["get", "put", "head", "list", "upload"])
def test_unreachable_endpoint_fails_fast_without_leaking_credentials(operation, monkeypatch, tmp_path):
    port = free_port()
    access_key, secret_key = "AKIADISTINCTIVE7777", "s3cr3t-DISTINCTIVE-value-9999"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret_key)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    local = tmp_path / "f.bin"
    local.write_bytes(b"data")
    url = "s3://bucket/some/key.tar"
    calls = {
        "get": lambda: s3.get_bytes(url),
        "put": lambda: s3.put_bytes(url, b"data"),
        "head": lambda: s3.head(url),
        "list": lambda: s3.list_urls(url),
        "upload": lambda: s3.upload_file(str(local), url),
    }

    started = time.monotonic()
    with pytest.raises(StorageError) as raised:
        calls[operation]()
    elapsed_s = time.monotonic() - started

    assert elapsed_s < 10
    message = str(raised.value)
    assert f"127.0.0.1:{port}" in message and "AWS_ENDPOINT_URL_S3" in message and url in message
    full_report = "".join(traceback.format_exception(raised.value))  # chained causes included
    assert access_key not in full_report and secret_key not in full_report


def test_missing_key_names_the_url(s3_bucket):
    url = f"s3://{s3_bucket}/no/such.tar"
    with pytest.raises(StorageError, match="NoSuchKey") as raised:
        s3.get_bytes(url)
    assert url in str(raised.value) and "check the URL" in str(raised.value)
    with pytest.raises(StorageError, match="NoSuchKey"):
        storage.open_read(url)
    assert s3.head(url) is None


def test_missing_local_path_raises_storage_error(tmp_path):
    missing = str(tmp_path / "nowhere" / "x.bin")
    for call in (storage.read_bytes, storage.open_read, storage.list_names):
        with pytest.raises(StorageError) as raised:
            call(missing)
        assert missing in str(raised.value)
    with pytest.raises(StorageError, match="no such directory"):
        storage.write_bytes_atomic(missing, b"data")
    with pytest.raises(StorageError, match="no such file"):
        storage.put_file(missing, str(tmp_path / "dest.bin"))
