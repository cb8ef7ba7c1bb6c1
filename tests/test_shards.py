"""Shard writer: round trips on disk and S3, bad inputs, determinism, resume, flat val with a labels CSV, one
unsplit tree split into train and val."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import pytest
from imgtree import add_bad_files, jpeg_bytes, make_tree, read_tar_samples
from PIL import Image

import jobs.make_shards as make_shards_job  # noqa: E402  (jobs/ is importable from the repo root)
from pipeline.data import storage
from pipeline.data.loader import read_samples
from pipeline.data.manifest import load_manifest
from pipeline.data.shards import (
    ShardError,
    ShardOptions,
    SourceItem,
    SourceScan,
    SplitOptions,
    file_list_digest,
    split_items,
    val_count,
    write_shards,
    write_split_shards,
)

COUNTS = {"n01440764": 7, "n01443537": 5, "n01484850": 4}


def _check_round_trip(manifest, labels: dict[str, str]) -> None:
    """Decode every sample and compare with the source labels and counts."""
    assert manifest.classes == sorted(COUNTS)
    assert manifest.class_counts == COUNTS
    assert manifest.num_samples == sum(COUNTS.values())
    seen = {}
    for sample in read_samples(manifest.shard_urls()):
        key = sample["__key__"]
        assert "." not in key.rsplit("/", 1)[-1], f"sample key {key!r} contains a dot"
        assert set(sample) >= {"jpg", "cls", "json"}, sample.keys()
        meta = json.loads(sample["json"])
        label = int(sample["cls"])
        assert manifest.classes[label] == labels[meta["src"]] == meta["class"]
        assert Image.open(io.BytesIO(sample["jpg"])).format == "JPEG"
        seen[meta["src"]] = label
    assert sorted(seen) == sorted(labels), "every source image appears exactly once"


def test_round_trip_local(tmp_path):
    labels = make_tree(tmp_path / "train", COUNTS)
    summary = write_shards(
        tmp_path / "train", str(tmp_path / "out"), ShardOptions(samples_per_shard=5), progress=False
    )
    manifest = load_manifest(str(tmp_path / "out"))
    assert [s.name for s in manifest.shards] == [f"shard-{i:06d}.tar" for i in range(4)]
    assert [s.num_samples for s in manifest.shards] == [5, 5, 5, 1]
    for shard in manifest.shards:
        data = (tmp_path / "out" / shard.name).read_bytes()
        assert shard.bytes == len(data) and shard.sha256 == hashlib.sha256(data).hexdigest()
        with tarfile.open(tmp_path / "out" / shard.name) as tar:
            assert {m.mtime for m in tar.getmembers()} == {0}
            assert {m.name.split(".", 1)[1] for m in tar.getmembers()} == {"jpg", "cls", "json"}
    assert manifest.tool["version"] and manifest.options["samples_per_shard"] == 5
    assert manifest.skipped == []
    assert "split" not in json.loads((tmp_path / "out" / "manifest.json").read_text()), "unsplit: as before"
    assert "16 samples in 4 shards" in summary.line()
    _check_round_trip(manifest, labels)


def test_round_trip_s3(tmp_path, s3_bucket):
    labels = make_tree(tmp_path / "train", COUNTS)
    dest = f"s3://{s3_bucket}/imagenet/train"
    write_shards(tmp_path / "train", dest, ShardOptions(samples_per_shard=6, workers=2), progress=False)
    manifest = load_manifest(dest + "/manifest.json")
    assert manifest.shard_urls()[0] == f"{dest}/shard-000000.tar"
    for shard, url in zip(manifest.shards, manifest.shard_urls(), strict=True):
        info = storage.stat(url)
        assert info.size == shard.bytes and info.metadata["sha256"] == shard.sha256
        assert hashlib.sha256(storage.read_bytes(url)).hexdigest() == shard.sha256
    _check_round_trip(manifest, labels)


def test_bad_files_are_skipped_and_counted(tmp_path):
    make_tree(tmp_path / "train", COUNTS)
    expected = add_bad_files(tmp_path / "train", "n01443537")
    (tmp_path / "train" / "README.txt").write_text("stray file at the top level")
    summary = write_shards(
        tmp_path / "train", str(tmp_path / "out"), ShardOptions(samples_per_shard=4), progress=False
    )
    manifest = summary.manifest
    reasons = {s["path"]: s["reason"] for s in manifest.skipped}
    for path, outcome in expected.items():
        if outcome == "converted":
            assert path not in reasons
        else:
            assert reasons[path].startswith(outcome), (path, reasons.get(path))
    assert reasons["README.txt"] == "not inside a class folder"
    assert len(manifest.skipped) == 6
    # CMYK, grayscale, palette PNG and RGBA PNG named .JPEG become RGB JPEG samples of their class.
    assert sum(manifest.converted.values()) == 4
    assert manifest.class_counts["n01443537"] == COUNTS["n01443537"] + 4
    for sample in read_samples(manifest.shard_urls()):
        image = Image.open(io.BytesIO(sample["jpg"]))
        assert (image.format, image.mode) == ("JPEG", "RGB")
    assert "skipped 6" in summary.line()


def test_strict_fails_on_first_bad_file_with_exit_code_2(tmp_path, capsys):
    make_tree(tmp_path / "train", COUNTS)
    (tmp_path / "train" / "n01440764" / "empty.JPEG").write_bytes(b"")
    rc = make_shards_job.main(
        ["--src", str(tmp_path / "train"), "--dest", str(tmp_path / "out"), "--strict", "--quiet"]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert "empty.JPEG" in err and "empty file" in err
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.parametrize("layout", ["empty", "no_class_folders", "missing"])
def test_empty_or_classless_source_exits_2(tmp_path, capsys, layout):
    src = tmp_path / "src"
    if layout != "missing":
        src.mkdir()
    if layout == "no_class_folders":
        (src / "a.jpg").write_bytes(b"x")
    if layout == "empty":
        (src / "classA").mkdir()
    rc = make_shards_job.main(["--src", str(src), "--dest", str(tmp_path / "out"), "--quiet"])
    assert rc == 2
    err = capsys.readouterr().err
    assert str(src) in err
    assert "Traceback" not in err


def test_same_seed_gives_byte_identical_shards(tmp_path):
    make_tree(tmp_path / "train", COUNTS)
    a = write_shards(
        tmp_path / "train", str(tmp_path / "a"), ShardOptions(samples_per_shard=5, seed=3), progress=False
    ).manifest
    b = write_shards(
        tmp_path / "train",
        str(tmp_path / "b"),
        ShardOptions(samples_per_shard=5, seed=3, workers=2),
        progress=False,
    ).manifest
    c = write_shards(
        tmp_path / "train", str(tmp_path / "c"), ShardOptions(samples_per_shard=5, seed=4), progress=False
    ).manifest
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards]
    assert (tmp_path / "a" / "manifest.json").read_text() == (tmp_path / "b" / "manifest.json").read_text()
    assert [s.sha256 for s in a.shards] != [s.sha256 for s in c.shards], "another seed shuffles differently"


def test_rerun_resumes_and_rewrites_only_damaged_shards(tmp_path):
    make_tree(tmp_path / "train", COUNTS)
    out = tmp_path / "out"
    first = write_shards(tmp_path / "train", str(out), ShardOptions(samples_per_shard=5), progress=False)
    assert (first.written, first.reused) == (4, 0)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")}

    again = write_shards(tmp_path / "train", str(out), ShardOptions(samples_per_shard=5), progress=False)
    assert (again.written, again.reused) == (0, 4)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.tar")} == mtimes

    # A damaged shard and a lost one (as after a crash): only those two are rewritten.
    with open(out / "shard-000001.tar", "ab") as f:
        f.write(b"garbage")
    (out / "shard-000002.tar").unlink()
    (out / "manifest.json").unlink()
    healed = write_shards(tmp_path / "train", str(out), ShardOptions(samples_per_shard=5), progress=False)
    assert (healed.written, healed.reused) == (2, 2)
    assert [s.sha256 for s in healed.manifest.shards] == [s.sha256 for s in first.manifest.shards]


def test_flat_val_with_labels_csv_uses_train_class_indices(tmp_path):
    make_tree(tmp_path / "train", COUNTS)
    write_shards(tmp_path / "train", str(tmp_path / "shards/train"), ShardOptions(), progress=False)
    val = tmp_path / "val"
    val.mkdir()
    rows = ["filename,class"]
    # Val lacks the first class entirely: its indices must still follow train's class list.
    for i, cls in enumerate(["n01443537", "n01484850", "n01484850"]):
        name = f"ILSVRC2012_val_{i:08d}.JPEG"
        (val / name).write_bytes(jpeg_bytes(50 + i))
        rows.append(f"{name},{cls}")
    rows.append("ILSVRC2012_val_99999999.JPEG,n01440764")  # listed but missing
    (val / "unlisted.JPEG").write_bytes(jpeg_bytes(99))
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")
    rc = make_shards_job.main(
        [
            "--src",
            str(val),
            "--dest",
            str(tmp_path / "shards/val"),
            "--labels",
            str(tmp_path / "labels.csv"),
            "--classes-from",
            str(tmp_path / "shards/train"),
            "--quiet",
        ]
    )
    assert rc == 0
    manifest = load_manifest(str(tmp_path / "shards/val"))
    assert manifest.classes == sorted(COUNTS)
    assert manifest.class_counts == {"n01440764": 0, "n01443537": 1, "n01484850": 2}
    assert sorted(int(s["cls"]) for s in read_samples(manifest.shard_urls())) == [1, 2, 2]
    assert {s["reason"] for s in manifest.skipped} == {
        "no label in the labels file",
        "listed in the labels file but missing",
    }


def test_resize_short_side(tmp_path):
    make_tree(tmp_path / "train", {"a": 2}, size=(100, 80))
    manifest = write_shards(
        tmp_path / "train", str(tmp_path / "out"), ShardOptions(resize_short=32), progress=False
    ).manifest
    sizes = {Image.open(io.BytesIO(s["jpg"])).size for s in read_tar_samples(manifest.shard_urls()[0])}
    assert sizes == {(40, 32)}


def test_bad_options_are_rejected(tmp_path):
    with pytest.raises(ShardError, match="samples-per-shard"):
        ShardOptions(samples_per_shard=0)
    rc = make_shards_job.main(
        ["--src", str(tmp_path), "--dest", str(tmp_path / "o"), "--labels", str(tmp_path / "nope.csv")]
    )
    assert rc == 2


def test_unreachable_s3_gives_storage_error_exit_1(tmp_path, monkeypatch, capsys, s3_server):
    from pipeline.data import s3

    make_tree(tmp_path / "train", {"a": 1})
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")  # discard port: nothing listens
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "SUPERSECRETVALUE123")
    s3.reset_clients()
    try:
        rc = make_shards_job.main(["--src", str(tmp_path / "train"), "--dest", "s3://bucket/x", "--quiet"])
    finally:
        s3.reset_clients()
    captured = capsys.readouterr()
    assert rc == 1
    assert "127.0.0.1:9" in captured.err
    assert "SUPERSECRETVALUE123" not in captured.err + captured.out
    assert "Traceback" not in captured.err


# ---------------------------------------------------------------------------------------------------------
# --val-fraction: one unsplit tree into train and val

SPLIT_COUNTS = {"daisy": 10, "rose": 5, "tulip": 1}


def _sources(manifest) -> list[str]:
    return [json.loads(sample["json"])["src"] for sample in read_samples(manifest.shard_urls())]


def test_val_fraction_splits_one_tree_stratified_disjoint_and_recorded(tmp_path, capsys, caplog):
    labels = make_tree(tmp_path / "flowers", SPLIT_COUNTS)
    dest = tmp_path / "shards"
    argv = ["--src", str(tmp_path / "flowers"), "--dest", str(dest), "--val-fraction", "0.2"]
    assert make_shards_job.main([*argv, "--split-seed", "5", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("train: 13 samples") and "\nval: 3 samples" in out
    train, val = load_manifest(str(dest / "train")), load_manifest(str(dest / "val"))

    # Stratified: round(0.2 x n) of every class, at least one of a class of 2+; the single tulip stays in train.
    assert val.class_counts == {"daisy": 2, "rose": 1, "tulip": 0}
    assert train.class_counts == {"daisy": 8, "rose": 4, "tulip": 1}
    assert "single image kept in train only" in caplog.text and "tulip" in caplog.text
    # Disjoint and complete: every source image is in exactly one side.
    train_sources, val_sources = _sources(train), _sources(val)
    assert not set(train_sources) & set(val_sources)
    assert sorted(train_sources + val_sources) == sorted(labels)
    # One class list, so val's indices are train's.
    assert val.classes == train.classes == sorted(SPLIT_COUNTS)
    for sample in read_samples(val.shard_urls()):
        assert train.classes[int(sample["cls"])] == labels[json.loads(sample["json"])["src"]]

    # Recorded in both manifests, identically but for the role; the digests name each side's files.
    assert train.split["role"] == "train" and val.split == {**train.split, "role": "val"}
    assert train.source == val.source == str((tmp_path / "flowers").resolve())
    split = val.split
    assert (split["val_fraction"], split["seed"], split["files"]) == (0.2, 5, {"train": 13, "val": 3})
    assert split["files_per_class"] == {"train": train.class_counts, "val": val.class_counts}
    assert split["train_only_classes"] == ["tulip"]
    assert split["val_files_sha256"] == file_list_digest(val_sources)
    assert split["train_files_sha256"] == file_list_digest(train_sources)

    # A rerun of the same command reuses every shard: the split is the same.
    assert make_shards_job.main([*argv, "--split-seed", "5", "--quiet"]) == 0
    assert "(0 written, 1 reused)" in capsys.readouterr().out


def test_split_is_seeded_per_class_over_the_sorted_files():
    def scan(counts: dict[str, int], reverse: bool = False) -> SourceScan:
        classes = sorted(counts)
        items = [
            SourceItem(f"{c}/{i:03d}.jpg", label) for label, c in enumerate(classes) for i in range(counts[c])
        ]
        return SourceScan(classes=classes, items=items[::-1] if reverse else items, skipped=[])

    def val_files(source: SourceScan, seed: int, cls: str = "") -> list[str]:
        plan = split_items(source, SplitOptions(val_fraction=0.25, seed=seed))
        held_out = sorted(item.path for item in plan.val if item.path.startswith(cls))
        assert not {item.path for item in plan.train} & set(held_out)
        return held_out

    base = scan({"a": 20, "b": 12})
    assert len(val_files(base, 0, "a/")) == 5 and len(val_files(base, 0, "b/")) == 3
    assert val_files(base, 0) == val_files(base, 0) == val_files(scan({"a": 20, "b": 12}, reverse=True), 0)
    assert val_files(base, 0) != val_files(base, 1), "another seed draws another split"
    # Seeded per class: class a's split does not move when class b gains images.
    assert val_files(scan({"a": 20, "b": 30}), 0, "a/") == val_files(base, 0, "a/")


@pytest.mark.parametrize(
    "num_images,fraction,expected",
    [(1, 0.5, 0), (2, 0.01, 1), (2, 0.99, 1), (10, 0.25, 3), (15, 0.1, 2), (1000, 0.1, 100)],
)
def test_val_count_rounds_and_keeps_a_training_image(num_images, fraction, expected):
    assert val_count(num_images, fraction) == expected


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--val-fraction", "0"], "--val-fraction must be in (0, 1)"),
        (["--val-fraction", "1"], "--val-fraction must be in (0, 1)"),
        (["--val-fraction", "-0.1"], "--val-fraction must be in (0, 1)"),
        (["--val-fraction", "0.1", "--classes-from", "classes.txt"], "--classes-from cannot be combined"),
        (["--split-seed", "3"], "--split-seed needs --val-fraction"),
    ],
)
def test_bad_split_flags_exit_2_before_any_work(tmp_path, capsys, flags, message):
    make_tree(tmp_path / "src", {"a": 2})
    rc = make_shards_job.main(
        ["--src", str(tmp_path / "src"), "--dest", str(tmp_path / "out"), *flags, "--quiet"]
    )
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert not (tmp_path / "out").exists()


def test_split_with_nothing_to_hold_out_exits_2(tmp_path, capsys):
    make_tree(tmp_path / "src", {"a": 1, "b": 1})
    argv = [
        "--src",
        str(tmp_path / "src"),
        "--dest",
        str(tmp_path / "out"),
        "--val-fraction",
        "0.5",
        "--quiet",
    ]
    assert make_shards_job.main(argv) == 2
    assert "no class under" in capsys.readouterr().err


def test_split_to_s3(tmp_path, s3_bucket):
    make_tree(tmp_path / "src", {"a": 3, "b": 2})
    dest = f"s3://{s3_bucket}/flowers"
    summaries = write_split_shards(tmp_path / "src", dest, ShardOptions(), SplitOptions(0.5), progress=False)
    assert summaries["val"].manifest.url == f"{dest}/val/manifest.json"
    train, val = load_manifest(f"{dest}/train"), load_manifest(f"{dest}/val")
    assert (train.class_counts, val.class_counts) == ({"a": 1, "b": 1}, {"a": 2, "b": 1})
    assert train.split["val_files_sha256"] == val.split["val_files_sha256"] == file_list_digest(_sources(val))
