"""Test helpers: small image trees with every kind of bad file, and shards of chosen (uneven) sizes."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from pipeline.data.manifest import Manifest, ShardInfo


def jpeg_bytes(seed: int, size: tuple[int, int] = (40, 30), mode: str = "RGB", fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "CMYK": 4, "L": 1}[mode if mode != "P" else "L"]
    pixels = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    image = Image.fromarray(
        pixels.squeeze(-1) if channels == 1 else pixels, mode="L" if mode == "P" else mode
    )
    if mode == "P":
        image = image.convert("P")
    out = io.BytesIO()
    image.save(out, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return out.getvalue()


def make_tree(root: Path, counts: dict[str, int], *, ext: str = ".JPEG", size=(40, 30)) -> dict[str, str]:
    """root/<class>/<class>_<i><ext>; returns {relative path: class}."""
    labels = {}
    for c, (name, n) in enumerate(sorted(counts.items())):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            rel = f"{name}/{name}_{i}{ext}"
            (root / rel).write_bytes(jpeg_bytes(1000 * c + i, size))
            labels[rel] = name
    return labels


def add_bad_files(root: Path, class_name: str) -> dict[str, str]:
    """One of each bad or odd input; returns {relative path: expected outcome}."""
    d = root / class_name
    good = jpeg_bytes(7)
    (d / "empty.JPEG").write_bytes(b"")
    (d / "truncated.JPEG").write_bytes(good[: len(good) // 2])
    (d / "notes.txt").write_text("not an image")
    (d / "fake.JPEG").write_bytes(b"<html>error page</html>")
    (d / "dangling.JPEG").symlink_to(root / "does-not-exist.JPEG")
    (d / "cmyk.JPEG").write_bytes(jpeg_bytes(8, mode="CMYK"))
    (d / "gray.JPEG").write_bytes(jpeg_bytes(9, mode="L"))
    (d / "palette.JPEG").write_bytes(jpeg_bytes(10, mode="P", fmt="PNG"))
    (d / "alpha.JPEG").write_bytes(jpeg_bytes(11, mode="RGBA", fmt="PNG"))
    return {
        f"{class_name}/empty.JPEG": "empty file",
        f"{class_name}/truncated.JPEG": "truncated or corrupt image",
        f"{class_name}/notes.txt": "not an image",
        f"{class_name}/fake.JPEG": "not an image",
        f"{class_name}/dangling.JPEG": "unreadable file",
        f"{class_name}/cmyk.JPEG": "converted",
        f"{class_name}/gray.JPEG": "converted",
        f"{class_name}/palette.JPEG": "converted",
        f"{class_name}/alpha.JPEG": "converted",
    }


def write_sized_shards(
    dest: Path, sizes: list[int], *, num_classes: int, labels: str = "cycle", image_size: int = 16
) -> Manifest:
    """Shards with exactly ``sizes`` samples each. labels='cycle' gives label i % num_classes; 'unique'
    gives every sample its own label (num_classes must then be sum(sizes)) so coverage can be checked."""
    dest.mkdir(parents=True, exist_ok=True)
    shards, position = [], 0
    counts = [0] * num_classes
    for s, size in enumerate(sizes):
        name = f"shard-{s:06d}.tar"
        with wds.TarWriter(str(dest / name), mtime=0, encoder=False) as tar:
            for _ in range(size):
                label = position % num_classes
                counts[label] += 1
                tar.write(
                    {
                        "__key__": f"{position:07d}",
                        "jpg": jpeg_bytes(position, (image_size, image_size)),
                        "cls": str(label).encode(),
                    }
                )
                position += 1
        data = (dest / name).read_bytes()
        import hashlib

        shards.append(ShardInfo(name, size, len(data), hashlib.sha256(data).hexdigest()))
    classes = [f"c{i:04d}" for i in range(num_classes)]
    manifest = Manifest(
        classes=classes,
        class_counts=dict(zip(classes, counts, strict=True)),
        num_samples=position,
        shards=shards,
        url=str(dest / "manifest.json"),
    )
    (dest / "manifest.json").write_text(manifest.to_json())
    return manifest


def write_imbalanced_shards(dest: Path, class_counts: list[int], *, per_shard: int = 50) -> Manifest:
    """Shards whose samples have the given class counts (interleaved), for oversampling tests."""
    labels = [c for c, n in enumerate(class_counts) for _ in range(n)]
    rng = np.random.default_rng(0)
    rng.shuffle(labels)
    dest.mkdir(parents=True, exist_ok=True)
    import hashlib

    shards = []
    for s, start in enumerate(range(0, len(labels), per_shard)):
        name = f"shard-{s:06d}.tar"
        with wds.TarWriter(str(dest / name), mtime=0, encoder=False) as tar:
            for i, label in enumerate(labels[start : start + per_shard], start=start):
                tar.write({"__key__": f"{i:07d}", "jpg": jpeg_bytes(i, (8, 8)), "cls": str(label).encode()})
        data = (dest / name).read_bytes()
        shards.append(
            ShardInfo(
                name, len(labels[start : start + per_shard]), len(data), hashlib.sha256(data).hexdigest()
            )
        )
    classes = [f"c{i}" for i in range(len(class_counts))]
    manifest = Manifest(
        classes=classes,
        class_counts=dict(zip(classes, class_counts, strict=True)),
        num_samples=len(labels),
        shards=shards,
        url=str(dest / "manifest.json"),
    )
    (dest / "manifest.json").write_text(manifest.to_json())
    return manifest


def read_tar_samples(path: str) -> list[dict]:
    ds = wds.WebDataset(path, shardshuffle=False, nodesplitter=wds.split_by_node, empty_check=False)
    return [dict(s) for s in ds]


__all__ = [
    "jpeg_bytes",
    "make_tree",
    "add_bad_files",
    "write_sized_shards",
    "write_imbalanced_shards",
    "read_tar_samples",
    "json",
]


def corrupt_in_place(shard: Path, *, image: int | None = None, header: int | None = None) -> None:
    """Damage a shard without changing its size (a bad disk block, a botched in-place rewrite): the start of
    its ``image``-th JPEG zeroed (that sample no longer decodes), or the ustar magic of its ``header``-th tar
    header (the tar structure breaks there, losing the rest of the shard)."""
    data = bytearray(shard.read_bytes())
    marker, which = (b"\xff\xd8\xff", image) if image is not None else (b"ustar", header)
    offset = -1
    for _ in range(which + 1):
        offset = data.index(marker, offset + 1)
    data[offset : offset + len(marker)] = bytes(len(marker))
    shard.write_bytes(bytes(data))
