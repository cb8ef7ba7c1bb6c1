"""The embedded toy dataset: deterministic ImageNet-style JPEG folder trees, generated with no download.

This module owns the only data the project ships: two related classification tasks drawn by one renderer,

    ROOT/pretrain/{train,val}/<class>/<class>_<index>.jpg     10 object classes, balanced
    ROOT/downstream/{train,val}/<class>/<class>_<index>.jpg   2-5 other shapes, imbalanced train split
    ROOT/toy.json                                             completion marker, written last

Each image is one textured shape (the label) at a random position, scale, rotation and aspect, filled
with a random texture (solid, stripes, checker, dots) in random colours, over a blotchy background with
clutter lines, blobs and faint distractor shapes of every class, sometimes partly occluded, then noised.
Colour, texture and position therefore carry no label information: only the outline does. A small CNN
learns it well above chance in a few CPU epochs but does not solve it in one: measured on 2 CPU threads,
val accuracy 0.13 -> 0.54 over 8 epochs at 32 px x 200 per class (tests/test_toy.py, ~22 s), and
0.14 -> 0.72 over 8 epochs on the default 64 px tree (4-conv CNN with a stride-2 stem, ~45 s); chance 0.10.

``ToyConfig.difficulty: easy`` draws the same classes and layout with the hard parts taken out: one
large, nearly upright object in one colour on a nearly flat background, no clutter, distractors or
occluders, faint noise. Measured on 2 CPU threads: ResNet-20 (AdamW, batch 50, 100 images per class,
crops of 80-100%) at 0.97 training top-1 after 120 steps and 1.00 after 300 (the standard set: 0.32 after
300). It is for experiments whose claim needs a network that converges within a CPU budget.

The downstream shapes are not in the pretrain set but are rendered by the same pipeline, so features
learned on pretrain transfer: that is what the fine-tuning demo shows.

Every image is drawn from its own RNG seeded by (seed, task, split, class, index), so the bytes of a file
do not depend on generation order or on the number of worker processes. The same seed gives
byte-identical files for the same Pillow/libjpeg build (JPEG is written with fixed settings, no metadata).
"""

from __future__ import annotations

import colorsys
import dataclasses
import json
import math
import multiprocessing
import os
import shutil
import zlib
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageDraw

from pipeline.config import ToyConfig

Task = Literal["pretrain", "downstream"]
Split = Literal["train", "val"]

TASKS: tuple[Task, ...] = ("pretrain", "downstream")
SPLITS: tuple[Split, ...] = ("train", "val")

# Alphabetical, so that a class's position here is also its index in torchvision's ImageFolder order
# and in the shard manifests (index = position in the sorted class names).
PRETRAIN_CLASSES: tuple[str, ...] = (
    "arrow",
    "bar",
    "circle",
    "crescent",
    "cross",
    "ring",
    "square",
    "star",
    "teardrop",
    "triangle",
)
"""The pretrain label set: 10 outlines that stay distinct under any rotation and at 32 px (no square/diamond
pair; pentagon and hexagon were dropped because at a radius of 6 px they are circles)."""

DOWNSTREAM_CLASSES: tuple[str, ...] = ("chevron", "heart", "hourglass", "semicircle", "trapezoid")
"""The downstream pool, none of them in PRETRAIN_CLASSES; the first ``downstream_classes`` are used."""

MARKER_NAME = "toy.json"
"""Completion marker in ROOT holding the generation parameters; written last, so it proves a full tree."""

# Bump when the renderer changes, so that trees cached by an older version are regenerated.
_FORMAT_VERSION = 1
# Fixed JPEG settings keep files byte-identical. 4:4:4 chroma because 4:2:0 would smear the 2-5 px
# stripes and dots of a 32 px image; quality 90 keeps a 64 px image at ~3 KB.
_JPEG_QUALITY = 90
_JPEG_SUBSAMPLING = 0
# Shapes are drawn at 2x and box-downsampled: cheap anti-aliasing, so edges are not a pixel-exact cue.
_SUPERSAMPLE = 2


# --------------------------------------------------------------------------------------------------------
# Public API


@dataclass(frozen=True)
class ToyDataset:
    """A generated tree: where it is and what it holds, so callers never list directories to find out."""

    root: Path
    """Directory holding pretrain/, downstream/ and toy.json."""
    config: ToyConfig
    """The parameters the tree was generated with."""

    def split_dir(self, task: Task, split: Split) -> Path:
        """ROOT/<task>/<split>: an ImageFolder-style directory with one sub-directory per class."""
        _check_task(task)
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return self.root / task / split

    def classes(self, task: Task) -> tuple[str, ...]:
        """The class folder names of a task, sorted (= ImageFolder and manifest index order)."""
        return _classes(self.config, task)

    def counts(self, task: Task, split: Split) -> dict[str, int]:
        """Images per class in one split, in class order."""
        return _counts(self.config, task, split)

    def train_counts(self, task: Task) -> dict[str, int]:
        """Training images per class: balanced for pretrain, geometric (imbalanced) for downstream."""
        return _counts(self.config, task, "train")


def downstream_counts(cfg: ToyConfig) -> list[int]:
    """Downstream training images per class, largest first.

    Geometric from ``downstream_train_max`` down to ``downstream_train_max / downstream_imbalance``, so
    the ratio between neighbours is constant (a long tail, as in real data), e.g. 200, 93, 43, 20 by
    default. Every class keeps at least one image.
    """
    k = cfg.downstream_classes
    return [
        max(1, round(cfg.downstream_train_max * cfg.downstream_imbalance ** (-i / (k - 1)))) for i in range(k)
    ]


def generate(cfg: ToyConfig, *, workers: int = 1) -> ToyDataset:
    """Write the pretrain and downstream trees under ``cfg.root`` unless an identical one is already there.

    Idempotent: a tree whose marker matches ``cfg`` (all fields but root) and whose class folders hold the
    expected number of files is kept untouched. Otherwise the marker and both task directories are removed
    first (so no stale image of an older config survives) and the tree is generated afresh; the marker is
    written last, so an interrupted run is redone next time. ``workers`` > 1 renders class folders in
    parallel processes; the files are identical to a single-process run. Workers are spawned, so the
    caller must be an importable module or script (not code piped to ``python -``).
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    root = Path(cfg.root)
    dataset = ToyDataset(root=root, config=cfg)
    marker = root / MARKER_NAME
    params = _marker_params(cfg)
    if _is_complete(dataset, marker, params):
        return dataset

    marker.unlink(missing_ok=True)
    for task in TASKS:
        shutil.rmtree(root / task, ignore_errors=True)

    jobs = [
        _Job(
            task,
            split,
            name,
            count,
            str(dataset.split_dir(task, split) / name),
            cfg.seed,
            cfg.image_size,
            cfg.difficulty,
        )
        for task in TASKS
        for split in SPLITS
        for name, count in _counts(cfg, task, split).items()
    ]
    if workers == 1:
        for job in jobs:
            _render_job(job)
    else:
        # spawn, not fork: callers (Ray workers, the MLflow client) may hold threads, and a forked child
        # of a threaded parent can deadlock. Start-up costs ~1 s, worth it only for large trees.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            list(pool.map(_render_job, jobs))

    tmp = marker.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, marker)  # atomic: a reader sees either no marker or a whole one
    return dataset


# --------------------------------------------------------------------------------------------------------
# Layout and marker


def _check_task(task: str) -> None:
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def _classes(cfg: ToyConfig, task: str) -> tuple[str, ...]:
    _check_task(task)
    if task == "pretrain":
        return PRETRAIN_CLASSES
    return DOWNSTREAM_CLASSES[: cfg.downstream_classes]


def _counts(cfg: ToyConfig, task: str, split: str) -> dict[str, int]:
    names = _classes(cfg, task)
    if task == "pretrain":
        n = cfg.pretrain_train_per_class if split == "train" else cfg.pretrain_val_per_class
        return dict.fromkeys(names, n)
    if split == "train":
        return dict(zip(names, downstream_counts(cfg), strict=True))
    return dict.fromkeys(names, cfg.downstream_val_per_class)


def _marker_params(cfg: ToyConfig) -> dict[str, Any]:
    # root is left out: the same tree moved or reached through another path is still the same tree.
    config = {k: v for k, v in dataclasses.asdict(cfg).items() if k != "root"}
    return {
        "format_version": _FORMAT_VERSION,
        "config": config,
        "classes": {task: list(_classes(cfg, task)) for task in TASKS},
    }


def _is_complete(dataset: ToyDataset, marker: Path, params: dict[str, Any]) -> bool:
    try:
        if json.loads(marker.read_text()) != params:
            return False
    except (OSError, ValueError):
        return False
    # Counting ~4,300 directory entries takes milliseconds and catches a tree pruned by hand.
    for task in TASKS:
        for split in SPLITS:
            for name, count in dataset.counts(task, split).items():
                folder = dataset.split_dir(task, split) / name
                try:
                    found = sum(1 for entry in os.scandir(folder) if entry.name.endswith(".jpg"))
                except OSError:
                    return False
                if found != count:
                    return False
    return True


# --------------------------------------------------------------------------------------------------------
# Shapes: outlines in unit coordinates (radius ~1), as polygons that add (True) or cut a hole (False)

Outline = list[tuple[np.ndarray, bool]]


def _regular(n: int, radius: float = 1.0, phase: float = 0.0) -> np.ndarray:
    t = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([radius * np.cos(t), radius * np.sin(t)], axis=1)


def _star(points: int, inner: float) -> np.ndarray:
    t = np.pi * np.arange(2 * points) / points
    r = np.where(np.arange(2 * points) % 2 == 0, 1.0, inner)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _poly(*xy: tuple[float, float]) -> np.ndarray:
    return np.asarray(xy, dtype=np.float64)


def _heart() -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))  # image y points down
    pts = np.stack([x, y + 2.5], axis=1) / 16.5
    return pts


def _teardrop() -> np.ndarray:
    # A disc of radius 0.7 centred at x=-0.25 whose right side is drawn out to a point at x=1.
    t = np.linspace(0.35 * np.pi, 1.65 * np.pi, 36)
    arc = np.stack([-0.25 + 0.7 * np.cos(t), 0.7 * np.sin(t)], axis=1)
    return np.concatenate([arc, [[1.0, 0.0]]])


def _semicircle() -> np.ndarray:
    t = np.linspace(0, np.pi, 25)
    # Shift by the centroid (4/(3*pi) ~ 0.42) so the shape's mass sits at the drawn centre.
    return np.stack([np.cos(t), 0.42 - np.sin(t)], axis=1)


@cache
def _outlines() -> dict[str, Outline]:
    circle = _regular(48)
    return {
        "arrow": [
            (
                _poly(
                    (-1, -0.22), (0.15, -0.22), (0.15, -0.62), (1, 0), (0.15, 0.62), (0.15, 0.22), (-1, 0.22)
                ),
                True,
            )
        ],
        "circle": [(circle, True)],
        "crescent": [(circle, True), (_regular(48, 0.85) + [0.5, 0.0], False)],
        "cross": [
            (
                _poly(
                    (-0.3, -1),
                    (0.3, -1),
                    (0.3, -0.3),
                    (1, -0.3),
                    (1, 0.3),
                    (0.3, 0.3),
                    (0.3, 1),
                    (-0.3, 1),
                    (-0.3, 0.3),
                    (-1, 0.3),
                    (-1, -0.3),
                    (-0.3, -0.3),
                ),
                True,
            )
        ],
        "bar": [(_poly((-1.1, -0.32), (1.1, -0.32), (1.1, 0.32), (-1.1, 0.32)), True)],
        "ring": [(circle, True), (_regular(48, 0.55), False)],
        "square": [(_regular(4, 1.1, phase=np.pi / 4), True)],
        "star": [(_star(5, 0.45), True)],
        "teardrop": [(_teardrop(), True)],
        "triangle": [(_regular(3, 1.1, phase=-np.pi / 2), True)],
        "chevron": [(_poly((-1, 0.1), (0, -0.8), (1, 0.1), (1, 0.7), (0, -0.2), (-1, 0.7)), True)],
        "heart": [(_heart(), True)],
        "hourglass": [(_poly((-0.75, -1), (0.75, -1), (0.12, 0), (0.75, 1), (-0.75, 1), (-0.12, 0)), True)],
        "semicircle": [(_semicircle(), True)],
        "trapezoid": [(_poly((-1, 0.6), (1, 0.6), (0.45, -0.6), (-0.45, -0.6)), True)],
    }


def _place(outline: Outline, *, cx: float, cy: float, radius: float, angle: float, aspect: float) -> Outline:
    """Scale (with aspect jitter), rotate and translate an outline to canvas pixels."""
    c, s = math.cos(angle), math.sin(angle)
    rot = np.array([[c, -s], [s, c]])
    scale = np.array([radius * aspect, radius / aspect])
    return [((pts * scale) @ rot.T + [cx, cy], add) for pts, add in outline]


def _draw_outline(draw: ImageDraw.ImageDraw, outline: Outline, fill: Any, hole: Any) -> None:
    for pts, add in outline:
        draw.polygon([tuple(p) for p in pts.tolist()], fill=fill if add else hole)


# --------------------------------------------------------------------------------------------------------
# Rendering


@dataclass(frozen=True)
class _Job:
    """One class folder to render: picklable, so it can go to a worker process."""

    task: str
    split: str
    name: str
    count: int
    folder: str
    seed: int
    size: int
    difficulty: str = "standard"


def _render_job(job: _Job) -> None:
    folder = Path(job.folder)
    folder.mkdir(parents=True, exist_ok=True)
    # crc32 of the names, not their index: a seed stream that does not move when a class is added.
    key = [
        job.seed % 2**63,
        zlib.crc32(job.task.encode()),
        zlib.crc32(job.split.encode()),
        zlib.crc32(job.name.encode()),
    ]
    for index in range(job.count):
        rng = np.random.default_rng([*key, index])
        image = (
            _render(job.name, job.size, rng)
            if job.difficulty == "standard"
            else _render_easy(job.name, job.size, rng)
        )
        # No exif/icc/comment: Pillow writes none unless asked, so the bytes depend on pixels only.
        image.save(
            folder / f"{job.name}_{index:05d}.jpg",
            format="JPEG",
            quality=_JPEG_QUALITY,
            subsampling=_JPEG_SUBSAMPLING,
        )


def _colour(rng: np.random.Generator, sat: tuple[float, float], val: tuple[float, float]) -> np.ndarray:
    """A random RGB colour in [0, 255], drawn in HSV so hue is uniform: colour never names the class."""
    h, s, v = rng.random(3).tolist()  # one call, not three: colours are ~10% of the render time
    rgb = colorsys.hsv_to_rgb(h, sat[0] + s * (sat[1] - sat[0]), val[0] + v * (val[1] - val[0]))
    return np.asarray(rgb) * 255.0


def _rgba(colour: np.ndarray, alpha: float) -> tuple[int, int, int, int]:
    r, g, b = (min(255, max(0, int(c))) for c in colour.tolist())
    return (r, g, b, int(alpha))


@cache
def _grid(side: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:side, 0:side].astype(np.float32)
    return xs, ys


def _texture(
    rng: np.random.Generator, side: int, box: tuple[int, int, int, int], c1: np.ndarray, c2: np.ndarray
) -> Image.Image:
    """The object's fill inside ``box``: solid, stripes, checker or dots at a random angle and period.

    Only the object's bounding box is computed (about a third of the canvas on average): this function
    was over a third of the render time when it covered the whole canvas.
    """
    x0, y0, x1, y1 = box
    xs, ys = _grid(side)
    xs, ys = xs[y0:y1, x0:x1], ys[y0:y1, x0:x1]
    angle = rng.uniform(0, np.pi)
    cos, sin = np.float32(math.cos(angle)), np.float32(math.sin(angle))
    # Period 7-15% of the image: 4.5-10 px at 64 px, 2-5 px at 32 px: finer than the shape, coarser than aliasing.
    period = np.float32(side * rng.uniform(0.07, 0.15))
    u = (xs * cos + ys * sin) / period
    # Parities via int32 & 1 and fractions via x - floor(x): numpy's float % is ~10x slower.
    kind = rng.integers(4)
    if kind == 0:  # solid
        mix = np.zeros_like(u)
    elif kind == 1:  # stripes
        mix = (np.floor(u).astype(np.int32) & 1).astype(np.float32)
    elif kind == 2:  # checker
        v = (ys * cos - xs * sin) / period
        mix = ((np.floor(u).astype(np.int32) + np.floor(v).astype(np.int32)) & 1).astype(np.float32)
    else:  # dots of radius 0.3 period
        v = (ys * cos - xs * sin) / period
        du, dv = u - np.floor(u) - 0.5, v - np.floor(v) - 0.5
        mix = (du * du + dv * dv > 0.09).astype(np.float32)
    # A linear light gradient (+-15%) so that a solid fill is not one flat colour.
    light_angle = rng.uniform(0, 2 * np.pi)
    gx, gy = np.float32(0.3 * math.cos(light_angle) / side), np.float32(0.3 * math.sin(light_angle) / side)
    # The box is at most ~0.75 of the side across, so light stays within 1 +- 0.15 around its centre.
    light = 1 + (xs - np.float32((x0 + x1) / 2)) * gx + (ys - np.float32((y0 + y1) / 2)) * gy
    # Channel by channel: broadcasting over a trailing axis of 3 is ~2x slower.
    channels = [
        np.clip((np.float32(a) + np.float32(b - a) * mix) * light, 0, 255).astype(np.uint8)
        for a, b in zip(c1.tolist(), c2.tolist(), strict=True)
    ]
    return Image.fromarray(np.stack(channels, axis=-1), "RGB")


def _background(rng: np.random.Generator, side: int, *, jitter: float = 30) -> tuple[Image.Image, np.ndarray]:
    """Blotchy colour: a 4x4 grid of jittered colours upsampled bilinearly; returns it and its mean colour."""
    base = _colour(rng, sat=(0.0, 0.6), val=(0.25, 0.9))
    grid = np.clip(base + rng.normal(0, jitter, size=(4, 4, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(grid, "RGB").resize((side, side), Image.Resampling.BILINEAR)
    return image, grid.reshape(-1, 3).mean(axis=0)


def _clutter(rng: np.random.Generator, side: int) -> Image.Image:
    """A transparent layer of lines, blobs and faint small shapes of any class (both tasks)."""
    layer = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    draw = ImageDraw.Draw(layer)
    for _ in range(rng.integers(2, 7)):  # 2-6 lines, 1-3% of the image wide
        x0, y0, x1, y1 = rng.uniform(0, side, size=4)
        width = max(1, int(side * rng.uniform(0.01, 0.03)))
        draw.line(
            [(x0, y0), (x1, y1)], fill=_rgba(_colour(rng, (0, 1), (0, 1)), rng.uniform(80, 220)), width=width
        )
    for _ in range(rng.integers(1, 5)):  # 1-4 soft blobs, 5-20% of the image across
        cx, cy = rng.uniform(0, side, size=2)
        rx, ry = side * rng.uniform(0.05, 0.2, size=2)
        draw.ellipse(
            [cx - rx, cy - ry, cx + rx, cy + ry],
            fill=_rgba(_colour(rng, (0, 1), (0, 1)), rng.uniform(40, 110)),
        )
    names = sorted(_outlines())
    for _ in range(rng.integers(1, 4)):  # 1-3 distractors at 7-13% radius (the object: 25-40%), faint
        outline = _place(
            _outlines()[names[rng.integers(len(names))]],
            cx=rng.uniform(0, side),
            cy=rng.uniform(0, side),
            radius=side * rng.uniform(0.07, 0.13),
            angle=rng.uniform(0, 2 * np.pi),
            aspect=rng.uniform(0.85, 1.15),
        )
        _draw_outline(
            draw, outline, fill=_rgba(_colour(rng, (0, 1), (0.2, 1)), rng.uniform(50, 100)), hole=(0, 0, 0, 0)
        )
    return layer


def _contrasting(rng: np.random.Generator, against: np.ndarray) -> np.ndarray:
    """A random colour at least 100/255 (RGB distance) from ``against``, so the object stays visible."""
    colour = _colour(rng, sat=(0.2, 1.0), val=(0.15, 1.0))
    for _ in range(8):
        if np.linalg.norm(colour - against) >= 100:
            break
        colour = _colour(rng, sat=(0.2, 1.0), val=(0.15, 1.0))
    return colour


def _object_mask(
    name: str,
    side: int,
    rng: np.random.Generator,
    *,
    radius: tuple[float, float],
    margin: float,
    angle: tuple[float, float],
    aspect: tuple[float, float],
) -> tuple[Image.Image, float, float, float]:
    """The labelled object's mask on the supersampled canvas: radius a random fraction of the side, centre
    kept ``margin`` x radius from the edges, then turned and stretched; returns (mask, cx, cy, radius)."""
    size = side * rng.uniform(*radius)
    cx, cy = rng.uniform(size * margin, side - size * margin, size=2)
    outline = _place(
        _outlines()[name],
        cx=cx,
        cy=cy,
        radius=size,
        angle=rng.uniform(*angle),
        aspect=rng.uniform(*aspect),
    )
    mask = Image.new("L", (side, side), 0)
    _draw_outline(ImageDraw.Draw(mask), outline, fill=255, hole=0)
    return mask, cx, cy, size


def _paste(canvas: Image.Image, mask: Image.Image, texture) -> None:
    box = mask.getbbox() or (0, 0, 1, 1)  # None only if the object is wholly outside, which margin forbids
    canvas.paste(texture(box), box[:2], mask.crop(box))


def _with_noise(
    canvas: Image.Image, size: int, rng: np.random.Generator, sigma: tuple[float, float]
) -> Image.Image:
    """Downsample the supersampled canvas and add sensor-like Gaussian noise of a random sigma (grey levels),
    so no two images of a flat colour are identical."""
    small = canvas.reduce(_SUPERSAMPLE)
    pixels = np.asarray(small, dtype=np.float32) + rng.uniform(*sigma) * rng.standard_normal(
        (size, size, 3), dtype=np.float32
    )
    return Image.fromarray(np.clip(pixels + 0.5, 0, 255).astype(np.uint8), "RGB")


def _render(name: str, size: int, rng: np.random.Generator) -> Image.Image:
    side = size * _SUPERSAMPLE
    canvas, bg_mean = _background(rng, side)
    canvas = Image.alpha_composite(canvas.convert("RGBA"), _clutter(rng, side)).convert("RGB")

    # The labelled object: radius 25-40% of the image, centre kept so that at most ~15% of it leaves the frame.
    mask, cx, cy, radius = _object_mask(
        name, side, rng, radius=(0.25, 0.40), margin=0.85, angle=(0, 2 * np.pi), aspect=(0.85, 1.15)
    )
    c1 = _contrasting(rng, bg_mean)
    c2 = c1 * rng.uniform(0.35, 0.75) if rng.uniform() < 0.5 else _contrasting(rng, bg_mean)
    _paste(canvas, mask, lambda box: _texture(rng, side, box, c1, c2))

    # In 35% of images an opaque occluder (30-55% of the object's radius) covers part of its edge.
    if rng.uniform() < 0.35:
        theta = rng.uniform(0, 2 * np.pi)
        dist = radius * rng.uniform(0.6, 1.0)
        ox, oy = cx + dist * math.cos(theta), cy + dist * math.sin(theta)
        r = radius * rng.uniform(0.3, 0.55)
        box = [ox - r, oy - r, ox + r, oy + r]
        colour = _rgba(_colour(rng, (0, 1), (0, 1)), 255)[:3]
        draw = ImageDraw.Draw(canvas)
        if rng.uniform() < 0.5:
            draw.ellipse(box, fill=colour)
        else:
            draw.rectangle(box, fill=colour)
    return _with_noise(canvas, size, rng, sigma=(2, 8))


def _render_easy(name: str, size: int, rng: np.random.Generator) -> Image.Image:
    """The easy setting: one large, upright object (radius 35-45%, turned by at most 17 degrees) in one
    colour on a nearly flat background, with no clutter, no distractors, no occluder and faint noise. Colour
    and position still carry no label, but the outline is plain to see: a ResNet-20 fits it in a few
    hundred steps."""
    side = size * _SUPERSAMPLE
    canvas, bg_mean = _background(rng, side, jitter=8)
    # Upright within +-17 degrees: no rotation invariance to learn.
    mask, *_ = _object_mask(
        name, side, rng, radius=(0.35, 0.45), margin=0.9, angle=(-0.3, 0.3), aspect=(0.9, 1.1)
    )
    fill = _contrasting(rng, bg_mean)
    _paste(canvas, mask, lambda box: _texture(rng, side, box, fill, fill))  # one colour: no pattern
    return _with_noise(canvas, size, rng, sigma=(1, 3))
