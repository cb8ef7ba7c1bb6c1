"""The registered model as users take it: an MLflow model served offline, batch prediction and evaluation
with the predict job, TorchScript and ONNX exports. All on the session's trained toy_resnet20
(``conftest.toy_model``), registered as toy-resnet20@champion by the pre-training job's publish step."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import wait_for
from PIL import Image


@pytest.fixture(scope="module")
def val_images(toy_manifests) -> list[tuple[bytes, str]]:
    """(JPEG bytes, class name) of the first validation samples, as the shards hold them."""
    from pipeline.data.loader import read_samples
    from pipeline.data.manifest import load_manifest

    manifest = load_manifest(toy_manifests["pretrain"]["val"])
    samples = []
    for sample in read_samples(manifest.shard_urls()):
        samples.append((sample["jpg"], manifest.classes[int(sample["cls"])]))
        if len(samples) == 40:
            break
    return samples


def _encode(jpeg: bytes, kind: str) -> bytes:
    image = Image.open(io.BytesIO(jpeg))
    out = io.BytesIO()
    if kind == "jpeg":
        return jpeg
    if kind == "png":
        image.save(out, "PNG")
    elif kind == "gray":
        image.convert("L").save(out, "JPEG", quality=95)
    elif kind == "cmyk":
        image.convert("CMYK").save(out, "JPEG", quality=95)
    elif kind == "palette":
        image.convert("P").save(out, "PNG")
    elif kind == "webp":
        image.save(out, "WEBP", quality=95)
    return out.getvalue()


KINDS = ("jpeg", "png", "gray", "cmyk")


@pytest.fixture
def registry(toy_model, monkeypatch):
    """MLflow's own clients (pyfunc, pytorch flavor, `mlflow models serve`) find the registry here."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", toy_model.tracking_uri)
    return toy_model.tracking_uri


def _documented_preprocessing(data: bytes, model_config: dict) -> torch.Tensor:
    """The steps model_config.json and docs/predict.md spell out, written out by hand."""
    from torchvision.io import ImageReadMode, decode_image
    from torchvision.transforms import v2

    spec = model_config["preprocessing"]
    image = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    image = v2.Resize(spec["resize_short_side"], antialias=True)(image)
    image = v2.CenterCrop(spec["center_crop"])(image)
    mean = torch.tensor(spec["mean"]).view(3, 1, 1)
    std = torch.tensor(spec["std"]).view(3, 1, 1)
    return ((image.float() / 255) - mean) / std


def test_registered_model_predicts_the_same_in_process_served_and_by_hand(
    toy_model, registry, val_images, tmp_path
):
    """pyfunc predict, `mlflow models serve --env-manager local` (a POST of JPEG, PNG, grayscale and CMYK
    images, base64 in JSON) and mlflow.pytorch.load_model plus the documented preprocessing: the same labels,
    and scores within 1e-5."""
    import mlflow.pyfunc
    import mlflow.pytorch

    from pipeline.ports import free_port

    blobs = [_encode(val_images[i][0], kind) for i, kind in enumerate(KINDS)]
    pyfunc = mlflow.pyfunc.load_model(toy_model.uri)
    local = pyfunc.predict(pd.DataFrame({"image": blobs}), params={"top_k": 3})
    assert local["error"].isna().all(), local["error"].tolist()
    assert all(len(labels) == 3 for labels in local["top_k_labels"])
    probabilities = local[[c for c in local.columns if c.startswith("prob_")]].to_numpy()
    assert probabilities.shape == (4, 10) and np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)

    # The PyTorch flavor: the nn.Module in eval mode, fed the documented preprocessing.
    model = mlflow.pytorch.load_model(toy_model.uri)
    assert isinstance(model, torch.nn.Module) and not model.training
    config = json.loads((toy_model.export_dir / "model_config.json").read_text())
    batch = torch.stack([_documented_preprocessing(blob, config) for blob in blobs])
    with torch.no_grad():
        by_hand = model(batch).softmax(dim=1)
    scores, indices = by_hand.max(dim=1)
    assert [config["classes"][i] for i in indices] == local["label"].tolist()
    assert np.allclose(scores.numpy(), local["score"].to_numpy(), atol=1e-5)

    # Served offline from the registry, in this environment.
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "models", "serve", "-m", toy_model.uri, "--env-manager", "local"]
        + ["-h", "127.0.0.1", "-p", str(port), "-w", "1"],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "serve.log", "wb"),  # noqa: SIM115 (closed with the process)
        # As from an activated virtual environment: MLflow starts `uvicorn` from the PATH.
        env={
            **os.environ,
            "MLFLOW_TRACKING_URI": registry,
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        },
    )
    try:

        def ready() -> bool:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2):  # noqa: S310
                    return True
            except OSError:
                return False

        wait_for(ready, 90, "mlflow models serve to answer /ping")
        body = {
            "dataframe_split": {
                "columns": ["image"],
                "data": [[base64.b64encode(blob).decode()] for blob in blobs],
            }
        }
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:  # noqa: S310 (loopback)
            served = pd.DataFrame(json.loads(response.read())["predictions"])
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert served["label"].tolist() == local["label"].tolist()
    assert np.allclose(served["score"].to_numpy(dtype=float), local["score"].to_numpy(), atol=1e-5)


def test_the_previous_export_format_still_loads_and_predicts(toy_model, val_images, tmp_path):
    """An export from before MLflow models (model.pt + model_config.json, no preprocessing recorded) loads
    in eval mode, predicts as the registered model does, and is a fine-tuning source as before."""
    from pipeline.predictor import Predictor
    from pipeline.publish import load_exported, write_export

    payload = torch.load(toy_model.export_dir / "model.pt", weights_only=True)
    old = {
        "state_dict": payload["state_dict"],
        "model_config": {k: v for k, v in payload["model_config"].items() if k != "preprocessing"},
    }
    write_export(old, tmp_path / "old")
    model, config = load_exported(tmp_path / "old")
    assert not model.training and "preprocessing" not in config
    blobs = [jpeg for jpeg, _ in val_images[:8]]
    new_rows = Predictor.from_payload(payload).predict_bytes(blobs)
    old_rows = Predictor(model, config).predict_bytes(blobs)
    assert [r["label"] for r in old_rows] == [r["label"] for r in new_rows]
    assert np.allclose([r["score"] for r in old_rows], [r["score"] for r in new_rows], atol=1e-6)


def _hostile_folder(root: Path, val_images) -> dict[str, str | None]:
    """Files and whether each should be predicted (None) or skipped (a word its reason contains)."""
    jpeg = val_images[0][0]
    files: dict[str, tuple[bytes, str | None]] = {
        "good.jpg": (jpeg, None),
        "png named.JPEG": (_encode(jpeg, "png"), None),
        "cmyk.jpg": (_encode(jpeg, "cmyk"), None),
        "gray.jpg": (_encode(jpeg, "gray"), None),
        "palette.png": (_encode(jpeg, "palette"), None),
        "photo.webp": (_encode(jpeg, "webp"), None),
        "odd name ü #1 (copy).jpg": (val_images[1][0], None),
        "nested/deeper/x.jpg": (val_images[2][0], None),
        "zero-byte.jpg": (b"", "empty"),
        "truncated.jpg": (jpeg[: len(jpeg) // 3], "readable"),
        "notes.jpg": (b"this is a text file, not a picture\n", "readable"),
    }
    for name, (data, _) in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return {str(root / name): reason for name, (_, reason) in files.items()}


@pytest.mark.ray
def test_predict_job_over_a_hostile_folder_predicts_the_good_files_and_lists_the_rest(
    toy_model, local_ray, val_images, tmp_path, capsys
):
    """Ray Data across the local instance: read and decode tasks, one model replica. Every good file gets a
    row with a label, every bad one is a listed skip with its reason; exit 0."""
    import jobs.predict

    expected = _hostile_folder(tmp_path / "in", val_images)
    code = jobs.predict.main(
        [
            "--model",
            toy_model.uri,
            "--input",
            str(tmp_path / "in"),
            "--output",
            str(tmp_path / "out"),
            "top_k=3",
            f"tracking.uri={toy_model.tracking_uri}",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    frame = pd.concat([pd.read_parquet(p) for p in sorted((tmp_path / "out").glob("part-*.parquet"))])
    assert sorted(frame["path"]) == sorted(expected)
    good = frame[frame["error"].isna()]
    assert sorted(good["path"]) == sorted(p for p, reason in expected.items() if reason is None)
    assert good["label"].notna().all() and (good["score"] > 0).all()
    assert all(len(labels) == 3 for labels in good["top_k_labels"])
    skipped = pd.read_csv(tmp_path / "out" / "skipped.csv")
    assert sorted(skipped["path"]) == sorted(p for p, reason in expected.items() if reason)
    for path, reason in zip(skipped["path"], skipped["reason"], strict=True):
        assert expected[path] in reason, (path, reason)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["images"] == 11 and summary["skipped"] == 3 and summary["images_per_s"] > 0
    assert "=== predict: 11 images, 8 predicted, 3 skipped ===" in out
    shown = [line for line in out.splitlines() if line.startswith("  image ")]
    assert len(shown) == 8 and all(re.fullmatch(r"  image .+: \w+ \d\.\d{3}", line) for line in shown), shown
    assert "not labelled" not in out and "evaluation:" not in out


def test_evaluation_of_the_registered_model_equals_its_training_runs_val_top1(
    toy_model, toy_manifests, tmp_path, capsys
):
    """The predict job over the validation shards (labels from the manifest, in this process, CSV): top-1
    exactly the training run's for the same weights, plus top-5, balanced accuracy, macro-F1, per-class
    recall and precision and the confusion matrix, in an MLflow run linked to the model version."""
    from mlflow import MlflowClient

    import jobs.predict

    code = jobs.predict.main(
        [
            "--model",
            toy_model.uri,
            "--input",
            toy_manifests["pretrain"]["val"],
            "--output",
            str(tmp_path / "out"),
            "--format",
            "csv",
            "replicas=0",
            f"tracking.uri={toy_model.tracking_uri}",
        ]
    )
    out = capsys.readouterr().out
    assert code == 0, out
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    metrics = summary["metrics"]
    assert summary["images"] == 400 and summary["skipped"] == 0
    assert metrics["eval/top1"] == toy_model.best_val_top1, (metrics["eval/top1"], toy_model.history)
    assert metrics["eval/top1"] <= metrics["eval/top5"] <= 1
    assert 0 < metrics["eval/balanced_acc"] <= 1 and 0 < metrics["eval/macro_f1"] <= 1
    frame = pd.concat([pd.read_csv(p) for p in sorted((tmp_path / "out").glob("part-*.csv"))])
    assert len(frame) == 400 and (frame["label"] == frame["true_label"]).mean() == metrics["eval/top1"]
    assert f"evaluation: top-1 {metrics['eval/top1']:.4f}" in out

    client = MlflowClient(toy_model.tracking_uri)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["pipeline.job"] == "predict"
    assert (
        run.data.tags["source.model_name"] == "toy-resnet20"
        and run.data.tags["source.run_id"] == toy_model.run_id
    )
    for key in ("eval/top1", "eval/top5", "eval/balanced_acc", "eval/macro_f1", "predict/images_per_s"):
        assert key in run.data.metrics, key
    assert sum(key.startswith("eval/recall/") for key in run.data.metrics) == 10
    assert sum(key.startswith("eval/precision/") for key in run.data.metrics) == 10
    assert "plots/confusion_matrix.png" in {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    version = client.get_model_version_by_alias("toy-resnet20", "champion")
    assert version.tags[f"evaluation.{run.info.run_id}.top1"] == f"{metrics['eval/top1']:.6f}"


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_exports_match_pytorch_on_real_images(fmt, toy_model, toy_manifests, tmp_path, capsys):
    """TorchScript and ONNX of the registered model: logits within 1e-4 of PyTorch's on 64 validation
    images (printed), the batch dimension dynamic, model_config.json beside the file."""
    import jobs.export
    from pipeline.convert import FILES
    from pipeline.predict import load_images
    from pipeline.predictor import Preprocessing
    from pipeline.publish import load_exported

    argv = ["--model", toy_model.uri, "--format", fmt, "--output", str(tmp_path / fmt)]
    argv += ["--images", toy_manifests["pretrain"]["val"], "--tracking-uri", toy_model.tracking_uri]
    code = jobs.export.main(argv)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "parity on 64 images" in out and "max abs logit difference" in out
    assert (tmp_path / fmt / "model_config.json").is_file()

    # Checked again here, on a batch size the export never saw.
    model, config = load_exported(toy_model.export_dir)
    images, _ = load_images(toy_manifests["pretrain"]["val"], Preprocessing.of(config), limit=7)
    from pipeline.data.transforms import normalize

    inputs = normalize(images)
    with torch.no_grad():
        expected = model(inputs)
    path = tmp_path / fmt / FILES[fmt]
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        got = torch.from_numpy(session.run(None, {"images": inputs.numpy()})[0])
    else:
        import warnings

        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore", FutureWarning)
            got = torch.jit.load(str(path))(inputs)
    difference = float((got - expected).abs().max())
    print(f"{fmt}: max abs logit difference {difference:.3g} on 7 images")
    assert difference < 1e-4


@pytest.mark.parametrize(
    "change,message",
    [
        (
            {"--model": "models:/no-such-model@champion"},
            "predict: config error: model: models:/no-such-model",
        ),
        ({"--input": "/nonexistent/images"}, "input: /nonexistent/images is not a directory"),
        ({"top_k": "0"}, "top_k: must be >= 1"),
        ({"labels": "folders"}, "labels: folders, but one.jpg is not in a folder named after"),
        ({"replics": "2"}, "replics"),
        # The shared local Ray has 3 CPUs: 3 one-CPU replicas would leave reading and decoding none (a hang).
        ({"replicas": "3"}, "replicas: 3 replicas x cpus_per_replica=1 leave 0 of this Ray cluster's 3 CPUs"),
    ],
)
def test_bad_predict_input_exits_2_naming_the_field(change, message, toy_model, tmp_path, capsys, request):
    import jobs.predict

    if change.get("replicas"):
        request.getfixturevalue("local_ray")

    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "one.jpg").write_bytes(b"")
    flags = {"--model": toy_model.uri, "--input": str(tmp_path / "in"), "--output": str(tmp_path / "out")}
    options = {"replicas": "0", "tracking.uri": toy_model.tracking_uri}
    for key, value in change.items():
        (flags if key.startswith("--") else options)[key] = value
    argv = [token for pair in flags.items() for token in pair] + [f"{k}={v}" for k, v in options.items()]
    assert jobs.predict.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists(), "nothing written on bad input"
