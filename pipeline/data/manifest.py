"""The manifest of a sharded split: what the shards hold, written last by the shard writer.

A manifest (``manifest.json`` beside the shards) is the contract between the writer and every reader: the
class list (index = position in the sorted class names), per-class counts (for loss weights and
oversampling), each shard's sample count, size and sha256 (for exact per-rank batch counts and for resume),
and every skipped input with its reason. Readers never list the bucket: the manifest is the source of truth.
A split made by ``make_shards --val-fraction`` is recorded in both of its manifests (``split``).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.data import storage
from pipeline.errors import PipelineError

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


class ManifestError(PipelineError, ValueError):
    """A manifest is missing or malformed; the message names the URL and how to fix it."""


@dataclass(frozen=True)
class ShardInfo:
    name: str
    """File name of the shard relative to the manifest's directory, e.g. shard-000000.tar."""
    num_samples: int
    bytes: int
    sha256: str


@dataclass(frozen=True)
class Manifest:
    classes: list[str]
    """Class names in index order (index = position in the sorted names, as torchvision's ImageFolder)."""
    class_counts: dict[str, int]
    """Samples per class, in index order."""
    num_samples: int
    shards: list[ShardInfo]
    skipped: list[dict[str, str]] = field(default_factory=list)
    """One {path, reason} per input that was not written."""
    source: str = ""
    options: dict[str, Any] = field(default_factory=dict)
    tool: dict[str, str] = field(default_factory=dict)
    converted: dict[str, int] = field(default_factory=dict)
    """How many inputs were re-encoded, by reason (e.g. 'CMYK to RGB')."""
    split: dict[str, Any] = field(default_factory=dict)
    """Set when one folder tree was split into train and val (``--val-fraction``): the same record in both
    manifests plus this one's ``role``; empty (and not written) for a split sharded as is."""
    format_version: int = FORMAT_VERSION
    url: str = field(default="", compare=False)
    """Where this manifest was read from (not serialized); shard URLs are resolved against it."""

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def counts(self) -> list[int]:
        """Per-class sample counts as a list aligned with ``classes``, for loss weights."""
        return [self.class_counts[name] for name in self.classes]

    def shard_urls(self) -> list[str]:
        base = self.url.rsplit("/", 1)[0] if "/" in self.url else "."
        return [storage.join(base, s.name) for s in self.shards]

    def to_json(self) -> str:
        data = asdict(self)
        data.pop("url")
        if not data["split"]:
            del data["split"]  # a split sharded as is keeps exactly the manifest it had before splits existed
        return json.dumps(data, indent=1, sort_keys=False) + "\n"

    @classmethod
    def from_json(cls, text: str, *, url: str) -> Manifest:
        try:
            data = json.loads(text)
            if data.get("format_version") != FORMAT_VERSION:
                raise ManifestError(
                    f"{url}: manifest format_version {data.get('format_version')!r} is not {FORMAT_VERSION}; "
                    "rewrite the shards with this version of jobs/make_shards.py"
                )
            shards = [ShardInfo(**s) for s in data.pop("shards")]
            manifest = cls(shards=shards, url=url, **data)
        except (KeyError, TypeError, json.JSONDecodeError) as err:
            raise ManifestError(
                f"{url}: not a valid shard manifest ({err}); was it written by make_shards?"
            ) from None
        if sum(s.num_samples for s in manifest.shards) != manifest.num_samples:
            raise ManifestError(
                f"{url}: shard sample counts do not add up to num_samples; the manifest is corrupt"
            )
        return manifest


def manifest_url(url: str) -> str:
    """Accept either the manifest's URL or its directory."""
    return url if url.endswith(".json") else storage.join(url, MANIFEST_NAME)


def load_manifest(url: str) -> Manifest:
    """Read a manifest from a local path or s3:// URL (or the directory holding it)."""
    url = manifest_url(url)
    try:
        text = storage.read_bytes(url).decode()
    except storage.StorageError as err:
        raise ManifestError(
            f"manifest {url} could not be read ({err}); create it with "
            "`python jobs/make_shards.py --src DIR --dest URL`"
        ) from None
    return Manifest.from_json(text, url=url)


def verify_shards(manifest: Manifest, *, checksum: bool = False) -> None:
    """Check every shard against what the manifest recorded, before any training resource is taken: its
    size (one stat per shard, in parallel: about a second for ImageNet's ~1,300 S3 objects), and with
    ``checksum`` its sha256 too (reads every byte). A partial upload or a shard rewritten after the manifest
    would otherwise fail mid-epoch, on every rank. Raises :class:`ManifestError` naming the first bad
    shard and how to repair it."""
    import hashlib
    from concurrent.futures import ThreadPoolExecutor

    def problem(shard: ShardInfo, url: str) -> str | None:
        info = storage.stat(url)
        if info is None:
            return f"{url} is missing"
        if info.size != shard.bytes:
            return f"{url} is {info.size:,} bytes but the manifest says {shard.bytes:,} (a partial upload?)"
        if checksum:
            digest = hashlib.sha256()
            with storage.open_read(url) as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
            if digest.hexdigest() != shard.sha256:
                return f"{url} does not match its sha256 in the manifest (corrupted in place?)"
        return None

    with ThreadPoolExecutor(max_workers=16) as pool:
        for message in pool.map(problem, manifest.shards, manifest.shard_urls()):
            if message is not None:
                raise ManifestError(
                    f"{message}; rewrite the split with `python jobs/make_shards.py` (same --dest) or "
                    "restore the file"
                )
