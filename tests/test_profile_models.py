"""jobs/profile_models.py end to end: the table, JSON/CSV, the exit code for unknown names, the plots, and
logging to (and reading accuracies from) a real MLflow sqlite store. Counts and shapes only: no speed asserts.
"""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from pipeline.models.profile import profile_model

JOB = Path(__file__).resolve().parents[1] / "jobs" / "profile_models.py"


@pytest.fixture(scope="module")
def job():
    spec = importlib.util.spec_from_file_location("profile_models_job", JOB)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see tests/test_models.py: 2 spinning threads on 2 shared cores are 50x slower
    yield
    torch.set_num_threads(threads)


def test_profile_model_counts_and_times():
    profile = profile_model("cifar_resnet20", batch_size=2, warmup=0, repeats=1)
    assert (profile.parameters, profile.macs, profile.resolution) == (269_722, 40_551_040, 32)  # 10 classes
    assert profile.predictions_per_second > 0 and profile.training_images_per_second > 0
    assert profile.device.startswith("cpu")


def test_job_writes_table_json_csv_and_speed_plot(job, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    out_json, out_csv, out_plot = tmp_path / "p.json", tmp_path / "p.csv", tmp_path / "p.png"
    argv = ["--models", "cifar_plain20", "mobilenet_v2", "--resolution", "32", "--batch-size", "2"]
    argv += ["--warmup", "0", "--repeats", "1", "--json", str(out_json), "--csv", str(out_csv)]
    argv += ["--plot", str(out_plot)]
    assert job.main(argv) == 0

    captured = capsys.readouterr()
    stdout = captured.out
    assert "plot (speed)" in captured.err
    assert "| cifar_plain20 | cifar_plain | 32 | 0.27 |" in stdout and "| mobilenet_v2 |" in stdout
    rows = json.loads(out_json.read_text())
    assert [r["name"] for r in rows] == ["cifar_plain20", "mobilenet_v2"]
    assert rows[1]["parameters"] == 3_504_872 and rows[1]["predictions_per_second"] > 0
    with out_csv.open() as f:
        assert [r["name"] for r in csv.DictReader(f)] == ["cifar_plain20", "mobilenet_v2"]
    assert out_plot.stat().st_size > 1000


def test_unknown_model_exits_2_with_close_matches(job, capsys):
    with pytest.raises(SystemExit) as exit_info:
        job.main(["--models", "resnet50", "efficientnet_b9"])
    assert exit_info.value.code == 2
    assert "error: unknown model 'efficientnet_b9'; did you mean efficientnet_b7" in capsys.readouterr().err


def test_job_logs_to_mlflow_and_plots_accuracy_from_tagged_runs(job, tmp_path, capsys, monkeypatch):
    from pipeline.tracking.mlflow_tracker import MlflowTracker, best_metric_by_tag

    monkeypatch.chdir(tmp_path)  # the sqlite store's default artifact root is ./mlruns
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    for arch, accuracies in (
        ("cifar_resnet20", [0.5, 0.91]),
        ("cifar_resnet20", [0.88]),
        ("cifar_plain20", [0.85]),
    ):
        with MlflowTracker(
            tracking_uri=uri, experiment="pretrain", run_name=arch, tags={"model.arch": arch}
        ) as tracker:
            for step, value in enumerate(accuracies):
                tracker.log_metrics({"val/top1": value}, step=step)
    assert best_metric_by_tag(tracking_uri=uri, tag="model.arch", metric="val/top1") == {
        "cifar_resnet20": 0.91,
        "cifar_plain20": 0.85,
    }

    plot = tmp_path / "accuracy.png"
    argv = [
        "--models",
        "cifar_resnet20",
        "cifar_plain20",
        "cifar_resnet32",
        "--no-timing",
        "--plot",
        str(plot),
    ]
    assert job.main(argv) == 0
    err = capsys.readouterr().err
    assert "plot (accuracy)" in err and "experiment 'profiling'" in err
    logged = {p.name for p in (tmp_path / "mlruns").rglob("*") if p.is_file()}
    assert {"profile.md", "profile.json", "profile.csv", "accuracy.png"} <= logged
    table = next((tmp_path / "mlruns").rglob("profile.md")).read_text()
    assert "| cifar_resnet32 | cifar_resnet | 32 | 0.46 |" in table
