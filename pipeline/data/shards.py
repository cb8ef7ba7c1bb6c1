"""Convert one split of an ImageNet-style folder tree into WebDataset tar shards plus a manifest.

What this module owns:

* **Scanning** a split: class folders (``train/n01440764/*.JPEG``), or a flat folder with a labels CSV
  (rows ``filename,class``, as ImageNet's val split is often distributed). Class index = position in the
  sorted class names, or in a class list taken from another manifest so that val indices match train.
* **Splitting** one tree into train and val when the data does not come pre-split (``write_split_shards``):
  the same share of every class, drawn by a seeded generator per class, recorded in both manifests.
* **Cleaning** every input: zero-byte, non-image, truncated/corrupt and unreadable files are skipped and
  counted with their reason; CMYK, grayscale, palette and PNG-content files named ``.JPEG`` are re-encoded
  as RGB JPEG (real ImageNet train has 22 CMYK JPEGs and one PNG in disguise). ``strict`` fails instead.
* **Writing** deterministic shards: the sample order is a seeded shuffle of the sorted inputs, keys have no
  dots (webdataset splits the key at the first dot), the extension is always ``jpg`` and the label is in
  ``cls``. Tars use mtime=0 and fixed owner/mode, so the same input gives byte-identical shards.
* **Resume**: each finished shard leaves a small record in ``_parts/`` with the fingerprint of its planned
  inputs; a rerun skips shards whose record matches and whose object has the recorded sha256.
* **Publishing**: shards are written to a temp file, then renamed (local) or uploaded (S3, multipart with
  abort on error), so no reader ever sees a partial shard. The manifest is written last and atomically.
"""

from __future__ import annotations

import concurrent.futures as cf
import csv
import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import random
import re
import tempfile
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import webdataset as wds
from PIL import Image, UnidentifiedImageError

from pipeline.data import storage
from pipeline.data.manifest import MANIFEST_NAME, Manifest, ShardInfo, load_manifest

log = logging.getLogger(__name__)

TOOL_NAME = "pipeline.data.shards"
TOOL_VERSION = "1"
PARTS_DIR = "_parts"
_KEY_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")


class ShardError(ValueError):
    """The source cannot be sharded (empty, no classes, bad labels file) or strict mode hit a bad file."""


@dataclass(frozen=True)
class ShardOptions:
    """How a split is converted; recorded in the manifest."""

    samples_per_shard: int = 1000
    """Samples per tar (ImageNet at short side 256: ~1000 samples = ~110 MB)."""
    seed: int = 0
    """Seed of the deterministic shuffle before sharding."""
    resize_short: int | None = None
    """Downscale so the short side is at most this many pixels (never upscales); None keeps the size."""
    jpeg_quality: int = 95
    """Quality of re-encoded JPEGs (only converted or resized images are re-encoded)."""
    workers: int = 1
    """Parallel conversion processes."""
    strict: bool = False
    """Fail on the first bad input instead of skipping it."""
    labels_csv: str | None = None
    """Labels file for a flat split: rows of filename,class (a header row is allowed)."""
    classes_from: str | None = None
    """A manifest URL (e.g. the train split's) or a text file of class names, one per line, fixing the indices."""

    def __post_init__(self) -> None:
        if self.samples_per_shard < 1:
            raise ShardError(f"--samples-per-shard must be >= 1, got {self.samples_per_shard}")
        if self.resize_short is not None and self.resize_short < 8:
            raise ShardError(f"--resize-short must be >= 8 pixels, got {self.resize_short}")
        if not 1 <= self.jpeg_quality <= 100:
            raise ShardError(f"--jpeg-quality must be in 1..100, got {self.jpeg_quality}")
        if self.workers < 1:
            raise ShardError(f"--workers must be >= 1, got {self.workers}")


@dataclass(frozen=True)
class SourceItem:
    path: str
    """Path relative to the split root, with '/' separators."""
    label: int


@dataclass(frozen=True)
class SourceScan:
    classes: list[str]
    items: list[SourceItem]
    skipped: list[dict[str, str]]


@dataclass(frozen=True)
class ShardResult:
    """What one shard ended up holding; also the resume record in _parts/."""

    info: ShardInfo
    fingerprint: str
    class_counts: dict[int, int]
    skipped: list[dict[str, str]] = field(default_factory=list)
    converted: dict[str, int] = field(default_factory=dict)
    reused: bool = False


class BadImage(Exception):
    """An input that cannot become a training sample; ``args[0]`` is the reason recorded in the manifest."""


# ---------------------------------------------------------------------------------------------------------
# Scanning


def _read_class_list(spec: str) -> list[str]:
    if spec.endswith(".json") or storage.is_directory(spec):
        return list(load_manifest(spec).classes)
    path = Path(spec)
    if not path.is_file():
        raise ShardError(f"--classes-from {spec}: no such manifest or class-list file")
    names = [line.strip() for line in path.read_text().splitlines() if line.strip()]
    if not names:
        raise ShardError(f"--classes-from {spec}: the file lists no classes")
    return names


def _files_under(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() or p.is_symlink())


def scan_source(
    src: str | Path, *, labels_csv: str | None = None, classes_from: str | None = None
) -> SourceScan:
    """List a split's inputs with labels. Raises ShardError for an empty source or one without classes."""
    root = Path(src)
    if not root.is_dir():
        raise ShardError(f"--src {root}: not a directory; pass one split of an ImageNet-style tree")
    fixed_classes = _read_class_list(classes_from) if classes_from else None
    skipped: list[dict[str, str]] = []
    labelled: list[tuple[str, str]] = []  # (relative path, class name)

    if labels_csv:
        labels_path = Path(labels_csv)
        if not labels_path.is_file():
            raise ShardError(f"--labels {labels_csv}: file not found")
        listed: dict[str, str] = {}
        with labels_path.open(newline="") as f:
            for line_no, row in enumerate(csv.reader(f), start=1):
                if not row or row[0].startswith("#"):
                    continue
                if len(row) < 2:
                    raise ShardError(
                        f"--labels {labels_csv}:{line_no}: expected 'filename,class', got {row!r}"
                    )
                name, cls = row[0].strip(), row[1].strip()
                if line_no == 1 and (name.lower(), cls.lower()) in {("filename", "class"), ("file", "label")}:
                    continue  # header row
                listed[name] = cls
        present = {p.relative_to(root).as_posix() for p in _files_under(root)}
        for rel in sorted(present):
            if rel in listed:
                labelled.append((rel, listed[rel]))
            else:
                skipped.append({"path": rel, "reason": "no label in the labels file"})
        for rel in sorted(set(listed) - present):
            skipped.append({"path": rel, "reason": "listed in the labels file but missing"})
    else:
        class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not class_dirs:
            raise ShardError(
                f"--src {root}: no class folders found; expected {root}/<class>/<image> "
                "(or a flat folder with --labels FILE)"
            )
        for stray in sorted(p for p in root.iterdir() if p.is_file()):
            skipped.append({"path": stray.name, "reason": "not inside a class folder"})
        for class_dir in class_dirs:
            for path in _files_under(class_dir):
                labelled.append((path.relative_to(root).as_posix(), class_dir.name))

    classes = fixed_classes or sorted({cls for _, cls in labelled})
    index = {name: i for i, name in enumerate(classes)}
    items = []
    for rel, cls in labelled:
        if cls in index:
            items.append(SourceItem(rel, index[cls]))
        else:
            skipped.append({"path": rel, "reason": f"class {cls!r} is not in the --classes-from list"})
    if not items:
        raise ShardError(f"--src {root}: no input files found (empty source); nothing to shard")
    return SourceScan(classes=classes, items=items, skipped=skipped)


# ---------------------------------------------------------------------------------------------------------
# Splitting one tree into train and val


@dataclass(frozen=True)
class SplitOptions:
    """How one folder tree is split into train and val before sharding; recorded in both manifests."""

    val_fraction: float
    """Share of every class's images held out for val, in (0, 1); see :func:`val_count` for the rounding."""
    seed: int = 0
    """Seed of the per-class draw: the same files and seed give the same split."""

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ShardError(f"--val-fraction must be in (0, 1) (e.g. 0.1), got {self.val_fraction}")


@dataclass(frozen=True)
class SplitPlan:
    train: list[SourceItem]
    val: list[SourceItem]
    train_only: list[str]
    """Classes with a single image: it stays in train, and val has none of them."""


def val_count(num_images: int, val_fraction: float) -> int:
    """Images of a class held out for val: round(fraction x n), but at least 1 and at most n - 1 when n >= 2
    (every class keeps a training image and, if it can spare one, is measured in val); 0 when n = 1."""
    if num_images < 2:
        return 0
    return min(num_images - 1, max(1, math.floor(val_fraction * num_images + 0.5)))


def file_list_digest(paths: list[str]) -> str:
    """sha256 of the sorted relative paths, one per line: names exactly which files a split side holds."""
    return hashlib.sha256("".join(f"{p}\n" for p in sorted(paths)).encode()).hexdigest()


def split_items(scan: SourceScan, split: SplitOptions) -> SplitPlan:
    """Stratified split of a scanned tree: val takes ``val_count`` images of every class, drawn from the
    class's sorted file list by a generator seeded with (seed, class name). Seeding per class means a class's
    split does not move when another class gains or loses images."""
    by_class: dict[int, list[SourceItem]] = defaultdict(list)
    for item in sorted(scan.items, key=lambda it: it.path):
        by_class[item.label].append(item)
    train: list[SourceItem] = []
    val: list[SourceItem] = []
    train_only = []
    for label, items in sorted(by_class.items()):
        name = scan.classes[label]
        if len(items) == 1:
            train_only.append(name)
        # A str seed is hashed with sha512 by random.seed: stable across processes and PYTHONHASHSEED.
        rng = random.Random(f"{split.seed}/{name}")
        held_out = set(rng.sample(range(len(items)), val_count(len(items), split.val_fraction)))
        for i, item in enumerate(items):
            (val if i in held_out else train).append(item)
    return SplitPlan(train=train, val=val, train_only=train_only)


def write_split_shards(
    src: str | Path, dest: str, options: ShardOptions, split: SplitOptions, *, progress: bool = True
) -> dict[str, ShardSummary]:
    """Split one image folder tree into ``dest/train`` and ``dest/val`` shard sets (same class list, so the
    same indices) and record the split in both manifests. Returns the summaries by role."""
    if options.classes_from:
        raise ShardError(
            "--classes-from cannot be combined with --val-fraction: the split gives val the class list of "
            "train itself; drop --classes-from"
        )
    src = Path(src)
    scan = scan_source(src, labels_csv=options.labels_csv)
    plan = split_items(scan, split)
    if not plan.val:
        raise ShardError(
            f"--val-fraction: no class under {src} has 2 or more images; nothing to hold out for val"
        )
    if plan.train_only:
        more = len(plan.train_only) - 10
        log.warning(
            "split: %d class(es) with a single image kept in train only, none in val: %s%s",
            len(plan.train_only),
            ", ".join(plan.train_only[:10]),
            f" and {more} more" if more > 0 else "",
        )
    sides = {"train": plan.train, "val": plan.val}
    record = {
        "val_fraction": split.val_fraction,
        "seed": split.seed,
        "files": {role: len(items) for role, items in sides.items()},
        "files_per_class": {
            role: {name: counts.get(i, 0) for i, name in enumerate(scan.classes)}
            for role, counts in ((r, Counter(it.label for it in items)) for r, items in sides.items())
        },
        "train_only_classes": plan.train_only,
        "train_files_sha256": file_list_digest([it.path for it in plan.train]),
        "val_files_sha256": file_list_digest([it.path for it in plan.val]),
    }
    summaries = {}
    for role, items in sides.items():
        # Inputs skipped while scanning (stray files, unlabelled ones) belong to neither side: listed once, in train.
        part = SourceScan(classes=scan.classes, items=items, skipped=scan.skipped if role == "train" else [])
        summaries[role] = _write_scan(
            src, storage.join(dest, role), part, options, progress=progress, split={"role": role, **record}
        )
    return summaries


# ---------------------------------------------------------------------------------------------------------
# Cleaning one image


def prepare_image(data: bytes, *, resize_short: int | None, jpeg_quality: int) -> tuple[bytes, str | None]:
    """Return RGB JPEG bytes for an input, and the conversion reason if it was re-encoded.

    Raises BadImage with the manifest's reason for inputs that cannot be used. Original JPEG bytes are kept
    when nothing needs to change: re-encoding would cost quality and ~5 ms per ImageNet image.
    """
    if not data:
        raise BadImage("empty file (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
        fmt, mode = image.format, image.mode
        image.load()  # full decode: Image.open alone does not notice a truncated file
    except UnidentifiedImageError:
        raise BadImage("not an image (unrecognized format)") from None
    except Image.DecompressionBombError as err:
        raise BadImage(f"image too large ({err})") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise BadImage(f"truncated or corrupt image ({err})") from None

    reason = None
    if fmt != "JPEG":
        reason = f"{fmt} content to JPEG"
    elif mode != "RGB":
        reason = f"{mode} to RGB"
    if mode != "RGB":
        if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in image.info):
            # Flatten transparency on white, as a browser shows it; a plain convert would give black.
            rgba = image.convert("RGBA")
            image = Image.new("RGB", rgba.size, (255, 255, 255))
            image.paste(rgba, mask=rgba.getchannel("A"))
        else:
            image = image.convert("RGB")
    if resize_short is not None and min(image.size) > resize_short:
        scale = resize_short / min(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        image = image.resize(size, Image.Resampling.BICUBIC, reducing_gap=3.0)
        reason = reason or "resized"
    if reason is None:
        return data, None
    out = io.BytesIO()
    image.save(out, format="JPEG", quality=jpeg_quality)
    return out.getvalue(), (None if reason == "resized" else reason)


def sample_key(position: int, rel_path: str) -> str:
    """A dot-free, unique key that still shows where the sample came from: 0000042_n01440764_10026."""
    stem = rel_path.rsplit("/", 1)[-1].split(".", 1)[0]
    return f"{position:07d}_{_KEY_UNSAFE.sub('_', stem)}"


# ---------------------------------------------------------------------------------------------------------
# Writing shards


@dataclass(frozen=True)
class _ShardTask:
    index: int
    src: str
    dest: str
    items: list[tuple[int, SourceItem]]  # (global position, item)
    classes: list[str]
    options: ShardOptions
    fingerprint: str


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tar"


def _fingerprint(src: Path, items: list[tuple[int, SourceItem]], options: ShardOptions) -> str:
    """Identity of a planned shard: its inputs (path, size, mtime, label, position) and the encoding options."""
    h = hashlib.sha256()
    h.update(json.dumps([options.resize_short, options.jpeg_quality, TOOL_VERSION]).encode())
    for position, item in items:
        try:
            st = (src / item.path).stat()
            size, mtime = st.st_size, st.st_mtime_ns
        except OSError:
            size, mtime = -1, -1
        h.update(f"{position}\0{item.path}\0{item.label}\0{size}\0{mtime}\n".encode())
    return h.hexdigest()


def _sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _write_shard(task: _ShardTask) -> ShardResult:
    """Convert one shard's inputs into a tar; runs in a worker process."""
    src = Path(task.src)
    dest_url = storage.join(task.dest, shard_name(task.index))
    # Local: stage next to the target so the final rename is atomic. Remote: stage in the temp dir, upload.
    stage_dir = storage.local_path(task.dest)
    fd, tmp_path = tempfile.mkstemp(prefix=f".{shard_name(task.index)}.", suffix=".tmp", dir=stage_dir)
    skipped: list[dict[str, str]] = []
    converted: Counter[str] = Counter()
    counts: Counter[int] = Counter()
    try:
        with os.fdopen(fd, "wb") as f, wds.TarWriter(f, mtime=0, encoder=False) as tar:
            for position, item in task.items:
                try:
                    try:
                        data = (src / item.path).read_bytes()
                    except OSError as err:
                        raise BadImage(f"unreadable file ({err.strerror or err})") from None
                    jpg, reason = prepare_image(
                        data, resize_short=task.options.resize_short, jpeg_quality=task.options.jpeg_quality
                    )
                except BadImage as bad:
                    if task.options.strict:
                        raise ShardError(f"{src / item.path}: {bad.args[0]} (--strict is set)") from None
                    skipped.append({"path": item.path, "reason": bad.args[0]})
                    continue
                if reason:
                    converted[reason] += 1
                meta = {"src": item.path, "class": task.classes[item.label]}
                tar.write(
                    {
                        "__key__": sample_key(position, item.path),
                        "jpg": jpg,
                        "cls": str(item.label).encode(),
                        "json": json.dumps(meta, sort_keys=True).encode(),
                    }
                )
                counts[item.label] += 1
        sha = _sha256_file(tmp_path)
        size = os.path.getsize(tmp_path)
        storage.put_file(tmp_path, dest_url, metadata={"sha256": sha}, move=True)
    finally:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
    result = ShardResult(
        info=ShardInfo(shard_name(task.index), sum(counts.values()), size, sha),
        fingerprint=task.fingerprint,
        class_counts=dict(sorted(counts.items())),
        skipped=skipped,
        converted=dict(converted),
    )
    storage.write_bytes_atomic(_part_url(task.dest, task.index), json.dumps(asdict(result)).encode())
    return result


def _part_url(dest: str, index: int) -> str:
    return storage.join(dest, PARTS_DIR, shard_name(index) + ".json")


def _reusable(task: _ShardTask) -> ShardResult | None:
    """The previous run's result for this shard, if its inputs and the published bytes are unchanged."""
    part_url = _part_url(task.dest, task.index)
    if not storage.exists(part_url):
        return None
    try:
        record = json.loads(storage.read_bytes(part_url))
        result = ShardResult(
            info=ShardInfo(**record["info"]),
            fingerprint=record["fingerprint"],
            class_counts={int(k): v for k, v in record["class_counts"].items()},
            skipped=record["skipped"],
            converted=record["converted"],
            reused=True,
        )
    except (ValueError, KeyError, TypeError):
        return None
    if result.fingerprint != task.fingerprint:
        return None
    shard_url = storage.join(task.dest, result.info.name)
    info = storage.stat(shard_url)
    if info is None or info.size != result.info.bytes:
        return None
    # S3 keeps the checksum as object metadata (no re-download); locally, re-hashing is a sequential read.
    keeps_sha = storage.backend_for(shard_url).keeps_metadata
    sha = info.metadata.get("sha256") if keeps_sha else _sha256_file(shard_url)
    return result if sha == result.info.sha256 else None


@dataclass(frozen=True)
class ShardSummary:
    manifest: Manifest
    written: int
    reused: int

    def line(self) -> str:
        m = self.manifest
        reasons = Counter(s["reason"].split(" (")[0] for s in m.skipped)
        skipped = ", ".join(f"{n} {r}" for r, n in reasons.most_common()) or "none"
        converted = ", ".join(f"{n} {r}" for r, n in m.converted.items()) or "none"
        return (
            f"{m.num_samples} samples in {len(m.shards)} shards ({self.written} written, {self.reused} reused) "
            f"of {m.num_classes} classes -> {m.url}; skipped {len(m.skipped)}: {skipped}; converted: {converted}"
        )


def write_shards(src: str | Path, dest: str, options: ShardOptions, *, progress: bool = True) -> ShardSummary:
    """Shard one split of an image folder tree into ``dest`` (a local dir or s3://bucket/prefix)."""
    src = Path(src)
    scan = scan_source(src, labels_csv=options.labels_csv, classes_from=options.classes_from)
    return _write_scan(src, dest, scan, options, progress=progress)


def _write_scan(
    src: Path,
    dest: str,
    scan: SourceScan,
    options: ShardOptions,
    *,
    progress: bool,
    split: dict[str, Any] | None = None,
) -> ShardSummary:
    """Shard the scanned inputs of ``src`` into ``dest``; ``split`` is recorded in the manifest."""
    items = sorted(scan.items, key=lambda it: it.path)
    random.Random(options.seed).shuffle(items)
    positioned = list(enumerate(items))
    n = options.samples_per_shard
    storage.makedirs(dest)
    storage.makedirs(storage.join(dest, PARTS_DIR))
    tasks = [
        _ShardTask(
            index=i,
            src=str(src),
            dest=dest,
            items=chunk,
            classes=scan.classes,
            options=options,
            fingerprint=_fingerprint(src, chunk, options),
        )
        for i, chunk in enumerate(positioned[start : start + n] for start in range(0, len(positioned), n))
    ]
    results: dict[int, ShardResult] = {}
    todo = []
    for task in tasks:
        previous = _reusable(task)
        if previous is not None:
            results[task.index] = previous
        else:
            todo.append(task)

    from tqdm import tqdm

    desc = f"sharding {src.name}" + (f" ({split['role']})" if split else "")
    bar = tqdm(total=len(items), unit="img", desc=desc, disable=not progress or None)
    bar.update(sum(len(t.items) for t in tasks if t.index in results))
    if options.workers == 1 or len(todo) <= 1:
        for task in todo:
            results[task.index] = _write_shard(task)
            bar.update(len(task.items))
    else:
        # forkserver: workers never inherit the parent's threads (e.g. a boto3 transfer pool) mid-lock.
        context = multiprocessing.get_context("forkserver")
        with cf.ProcessPoolExecutor(max_workers=options.workers, mp_context=context) as pool:
            futures = {pool.submit(_write_shard, task): task for task in todo}
            try:
                for future in cf.as_completed(futures):
                    results[futures[future].index] = future.result()
                    bar.update(len(futures[future].items))
            except BaseException:
                for f in futures:
                    f.cancel()
                raise
    bar.close()

    ordered = [results[t.index] for t in tasks]
    label_counts: Counter[int] = Counter()
    converted: Counter[str] = Counter()
    for r in ordered:
        label_counts.update(r.class_counts)
        converted.update(r.converted)
    manifest = Manifest(
        classes=scan.classes,
        class_counts={name: label_counts.get(i, 0) for i, name in enumerate(scan.classes)},
        num_samples=sum(r.info.num_samples for r in ordered),
        shards=[r.info for r in ordered],
        skipped=scan.skipped + [s for r in ordered for s in r.skipped],
        source=str(src.resolve()),
        options={k: v for k, v in asdict(options).items() if k not in ("workers",)},
        tool={"name": TOOL_NAME, "version": TOOL_VERSION},
        converted=dict(sorted(converted.items())),
        split=dict(split or {}),
        url=storage.join(dest, MANIFEST_NAME),
    )
    if manifest.num_samples == 0:
        raise ShardError(
            f"--src {src}: every input was skipped ({len(manifest.skipped)} bad files); no shards written"
        )
    # Written last and atomically: a manifest's presence means every shard it lists is complete.
    storage.write_bytes_atomic(manifest.url, manifest.to_json().encode())
    return ShardSummary(manifest=manifest, written=len(todo), reused=len(tasks) - len(todo))
