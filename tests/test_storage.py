"""The storage backend interface without a server: dispatch by URL scheme, the error for an unknown one, the
local backend's operations, the S3 backend's answers that need no request, and the one-way imports between
storage and s3 (checked on the source with ast, no import executed). The S3 operations against a real
server are in test_s3.py."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

from pipeline.data import storage
from pipeline.data.storage import LOCAL, LocalBackend, ObjectInfo, S3Backend, StorageError

DATA = Path(__file__).resolve().parents[1] / "pipeline" / "data"


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("/abs/path/shard.tar", LocalBackend),
        ("relative/dir", LocalBackend),
        ("~/data", LocalBackend),
        ("data/a://b", LocalBackend),  # "://" later in a path is not a scheme
        ("s3://bucket/key.tar", S3Backend),
        ("s3://bucket", S3Backend),
    ],
)
def test_backend_is_chosen_by_scheme(url, kind):
    assert isinstance(storage.backend_for(url), kind)


def test_backends_answer_the_callers_questions():
    local, remote = storage.backend_for("/tmp/x"), storage.backend_for("s3://bucket/x")
    assert local is LOCAL and storage.backend_for("s3://other/y") is remote  # one instance per scheme
    assert (local.shared_by_cluster, remote.shared_by_cluster) == (False, True)
    assert (local.keeps_metadata, remote.keeps_metadata) == (False, True)
    # None of these makes a request (no server runs in this module).
    assert remote.join("s3://bucket/prefix/", "/a", "b.tar") == "s3://bucket/prefix/a/b.tar"
    assert remote.absolute("s3://bucket/x") == "s3://bucket/x"
    assert remote.local_path("s3://bucket/x") is None
    assert remote.is_directory("s3://bucket/any/prefix")
    remote.makedirs("s3://bucket/any/prefix")


@pytest.mark.parametrize("url", ["gs://bucket/shards", "S3://bucket/key", "https://user:secret@host/x.tar"])
def test_unknown_scheme_names_the_url_and_the_known_schemes(url):
    with pytest.raises(StorageError) as raised:
        storage.read_bytes(url)
    message = str(raised.value)
    scheme = url.split("://")[0]
    assert f"no storage backend for {scheme}:// URLs" in message and "s3://" in message
    assert "secret" not in message  # user info never reaches a log
    assert url.replace("user:secret@", "") in message


def test_a_registered_scheme_is_served(monkeypatch, tmp_path):
    class MemoryBackend(LocalBackend):
        """A local directory posing as a remote store: only the dispatch is under test."""

        shared_by_cluster = True

        def read_bytes(self, url: str) -> bytes:
            return super().read_bytes(str(tmp_path / url.removeprefix("mem://")))

    (tmp_path / "x.bin").write_bytes(b"hello")
    monkeypatch.setitem(storage._BACKENDS, "mem", MemoryBackend())
    assert storage.read_bytes("mem://x.bin") == b"hello"
    assert storage.backend_for("mem://x.bin").shared_by_cluster
    storage.register_backend("mem", MemoryBackend)  # the public way; monkeypatch restores the registry
    assert isinstance(storage.backend_for("mem://y"), MemoryBackend)


def test_local_backend_operations(tmp_path, monkeypatch):
    root = str(tmp_path / "store")
    storage.makedirs(storage.join(root, "b", "deeper"))
    storage.makedirs(storage.join(root, "a"))
    for name in ("z.bin", "b/deeper/x.bin", "b/y.bin", "a/w.bin"):
        storage.write_bytes_atomic(storage.join(root, name), name.encode())
    assert storage.read_bytes(storage.join(root, "b", "y.bin")) == b"b/y.bin"
    assert storage.list_names(root) == ["a", "b", "z.bin"]
    # A directory's own files first, then its subdirectories in name order (predict's input order).
    assert storage.list_files(root) == [
        os.path.join(root, name) for name in ("z.bin", "a/w.bin", "b/y.bin", "b/deeper/x.bin")
    ]
    assert storage.is_directory(root) and not storage.is_directory(storage.join(root, "z.bin"))
    assert not storage.is_directory(storage.join(root, "missing"))
    with pytest.raises(StorageError, match="no such directory"):
        storage.list_files(storage.join(root, "missing"))

    staged = tmp_path / "staged.tar"
    staged.write_bytes(b"x" * 10)
    storage.put_file(str(staged), storage.join(root, "s.tar"), metadata={"sha256": "abc"}, move=True)
    assert not staged.exists()
    # The local backend has nowhere to keep metadata (keeps_metadata is False): stat returns none.
    assert storage.stat(storage.join(root, "s.tar")) == ObjectInfo(size=10)
    assert storage.stat(root) is None  # a directory is not an object

    monkeypatch.chdir(tmp_path)
    assert storage.absolute("store/z.bin") == os.path.join(os.path.realpath(tmp_path), "store", "z.bin")
    assert storage.local_path("store") == "store"
    LOCAL.register_webdataset_opener()  # webdataset opens local paths itself: nothing to do


def _imports(path: Path, *, top_level_only: bool) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in tree.body if top_level_only else ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _imports_module(names: set[str], module: str) -> bool:
    return any(name == module or name.startswith(f"{module}.") for name in names)


def test_storage_and_s3_import_one_way():
    """storage -> s3 (deferred, inside S3Backend) -> storage_types; s3 never imports storage, and importing
    storage imports neither s3 nor boto3 (local-only processes never pay for boto3)."""
    s3_imports = _imports(DATA / "s3.py", top_level_only=False)
    assert not _imports_module(s3_imports, "pipeline.data.storage")
    assert "pipeline.data.storage_types" in s3_imports
    storage_top_level = _imports(DATA / "storage.py", top_level_only=True)
    for deferred in ("pipeline.data.s3", "boto3", "botocore"):
        assert not _imports_module(storage_top_level, deferred)
    assert "pipeline.data.s3" in _imports(DATA / "storage.py", top_level_only=False)  # the one direction
    types_imports = _imports(DATA / "storage_types.py", top_level_only=False)
    assert not _imports_module(types_imports, "pipeline.data.storage")
    assert not _imports_module(types_imports, "pipeline.data.s3")
