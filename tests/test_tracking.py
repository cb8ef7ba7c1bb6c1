"""Tracking against a real MLflow sqlite store: params, per-epoch metrics, resuming a run after a restart,
the do-nothing tracker, failing fast on an unreachable server, tags, and the registry alias that only moves
on improvement."""

from __future__ import annotations

import inspect
import time

import pytest

from pipeline import provenance
from pipeline.stack import free_port
from pipeline.tracking import NullTracker, Tracker

mlflow_tracker = pytest.importorskip("pipeline.tracking.mlflow_tracker")
MlflowClient = pytest.importorskip("mlflow").MlflowClient


@pytest.fixture(autouse=True)
def _no_telemetry(monkeypatch):
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite store for the module (creating one costs seconds of migrations); tests use own names."""
    root = tmp_path_factory.mktemp("mlflow")
    return {"uri": f"sqlite:///{root}/m.db", "artifacts": (root / "artifacts").as_uri()}


def _tracker(store, *, experiment: str, run_id: str | None = None):
    return mlflow_tracker.MlflowTracker(
        tracking_uri=store["uri"],
        experiment=experiment,
        run_name="run",
        run_id=run_id,
        artifact_location=store["artifacts"],
    )


def test_mlflow_tracker_matches_the_tracker_protocol():
    def shape(function):  # names, kinds and defaults; annotations may be wider (Mapping for dict)
        parameters = inspect.signature(function).parameters.values()
        return [(p.name, p.kind, p.default) for p in parameters]

    methods = [name for name in vars(Tracker) if not name.startswith("_")]
    assert {"log_params", "set_tags", "log_metrics", "log_artifact", "close"} <= set(methods)
    for name in methods:
        assert shape(getattr(mlflow_tracker.MlflowTracker, name)) == shape(getattr(Tracker, name)), name
    assert "run_id" in Tracker.__annotations__


def test_params_flatten_relog_same_value_and_conflict(store):
    tracker = _tracker(store, experiment="params")
    config = {"optim": {"lr": 0.1, "betas": [0.9, 0.99]}, "model": {"arch": "resnet50"}, "seed": 0}
    tracker.log_params(config)
    tracker.log_params(config)  # same values after a resume: no error
    tracker.log_params({"optim": {"lr": 0.1}, "train": {"epochs": 3}})  # new keys are added
    params = MlflowClient(store["uri"]).get_run(tracker.run_id).data.params
    assert params == {
        "optim.lr": "0.1",
        "optim.betas": "[0.9, 0.99]",
        "model.arch": "resnet50",
        "seed": "0",
        "train.epochs": "3",
    }
    with pytest.raises(ValueError, match=r"'optim\.lr'.*'0\.1'.*'0\.2'"):
        tracker.log_params({"optim": {"lr": 0.2}})
    # a resumed tracker knows the stored params too
    resumed = _tracker(store, experiment="params", run_id=tracker.run_id)
    resumed.log_params(config)
    with pytest.raises(ValueError, match="model.arch"):
        resumed.log_params({"model": {"arch": "resnet18"}})
    resumed.close()


def test_metrics_per_epoch_and_resume_logs_each_step_once(store):
    client = MlflowClient(store["uri"])
    tracker = _tracker(store, experiment="resume")
    for epoch in range(3):
        tracker.log_metrics({"train/loss": 1.0 / (epoch + 1), "val/top1": 0.1 * epoch}, step=epoch)
    tracker.close(status="FAILED")  # the worker died after epoch 2 was logged, the checkpoint has epoch 1
    assert client.get_run(tracker.run_id).info.status == "FAILED"

    resumed = _tracker(store, experiment="resume", run_id=tracker.run_id)
    assert resumed.run_id == tracker.run_id
    assert client.get_run(tracker.run_id).info.status == "RUNNING"
    for epoch in range(2, 5):  # epoch 2 is re-run from the checkpoint
        resumed.log_metrics({"train/loss": 1.0 / (epoch + 1), "val/top1": 0.1 * epoch}, step=epoch)
    resumed.close()

    assert client.get_run(tracker.run_id).info.status == "FINISHED"
    for key in ("train/loss", "val/top1"):
        history = client.get_metric_history(tracker.run_id, key)
        assert sorted(m.step for m in history) == [0, 1, 2, 3, 4]
    top1 = {m.step: m.value for m in client.get_metric_history(tracker.run_id, "val/top1")}
    assert top1[4] == pytest.approx(0.4)
    assert len(client.search_runs([client.get_experiment_by_name("resume").experiment_id])) == 1


def test_artifact_tags_and_close_status(store, tmp_path):
    tracker = _tracker(store, experiment="artifacts")
    (tmp_path / "config.yaml").write_text("optim:\n  lr: 0.1\n")
    tracker.log_artifact(str(tmp_path / "config.yaml"), artifact_path="config")
    tags = provenance.run_tags(
        "s3://user:secret@bucket/toy/manifest.json",
        manifest_digest="sha256:abc",
        arch="cifar_resnet20",
        params=269_722,
        macs=40_551_040,
    )
    tracker.set_tags(tags)
    tracker.close(status="KILLED")
    client = MlflowClient(store["uri"])
    run = client.get_run(tracker.run_id)
    assert run.info.status == "KILLED"
    assert [a.path for a in client.list_artifacts(tracker.run_id, "config")] == ["config/config.yaml"]
    stored = run.data.tags
    assert stored["git.revision"] == "unknown" or len(stored["git.revision"]) == 40
    assert stored["version.mlflow"].startswith("3.") and stored["version.torch"][0].isdigit()
    assert {"version.torchvision", "version.ray", "version.webdataset"} <= stored.keys()
    assert stored["dataset.manifest_url"] == "s3://bucket/toy/manifest.json"
    assert stored["dataset.manifest_digest"] == "sha256:abc"
    assert (stored["model.arch"], stored["model.params"], stored["model.macs"]) == (
        "cifar_resnet20",
        "269722",
        "40551040",
    )
    assert "secret" not in str(stored)
    with pytest.raises(ValueError, match="status"):
        tracker.close(status="DONE")


def test_git_revision_outside_a_checkout_is_unknown(tmp_path):
    assert provenance.git_revision(tmp_path) == "unknown"


def test_redact_uri():
    assert provenance.redact_uri("https://alice:p%40ss@mlflow.example:5000/x") == (
        "https://mlflow.example:5000/x"
    )
    assert provenance.redact_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    assert provenance.redact_uri("sqlite:////tmp/m.db") == "sqlite:////tmp/m.db"


def test_null_tracker_off_rank_zero_and_when_off(store):
    common = {"experiment": "null", "run_name": "run", "required": True}
    assert isinstance(mlflow_tracker.open_tracker(uri=store["uri"], rank=1, **common), NullTracker)
    assert isinstance(mlflow_tracker.open_tracker(uri="none", **common), NullTracker)


def test_open_tracker_uri_resolution(store, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    common = {"experiment": "resolve", "run_name": "run", "required": True}
    tracker = mlflow_tracker.open_tracker(uri=None, **common)  # the embedded default
    assert tracker.tracking_uri == f"sqlite:///{tmp_path.resolve()}/.cache/mlflow/mlflow.db"
    tracker.close()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    tracker = mlflow_tracker.open_tracker(uri=None, **common)
    assert tracker.tracking_uri == store["uri"]
    tracker.close()
    resumed = mlflow_tracker.open_tracker(uri=store["uri"], run_id=tracker.run_id, **common)
    assert resumed.run_id == tracker.run_id
    resumed.close()


def test_unreachable_server_fails_fast_without_password():
    uri = f"http://alice:hunter2@127.0.0.1:{free_port()}"
    start = time.monotonic()
    with pytest.raises(mlflow_tracker.TrackingError) as error:
        mlflow_tracker.open_tracker(uri=uri, experiment="x", run_name="r", required=True)
    assert time.monotonic() - start < 10
    message = str(error.value)
    assert provenance.redact_uri(uri) in message and "hunter2" not in message and "alice" not in message
    assert "tracking.required=false" in message and "tracking.uri" in message


def test_unreachable_server_not_required_warns_and_tracks_nothing():
    uri = f"http://127.0.0.1:{free_port()}"
    with pytest.warns(RuntimeWarning, match="127.0.0.1"):
        tracker = mlflow_tracker.open_tracker(uri=uri, experiment="x", run_name="r", required=False)
    assert isinstance(tracker, NullTracker)


def test_alias_moves_only_on_improvement(store, tmp_path):
    checkpoint = tmp_path / "best.pt"
    checkpoint.write_bytes(b"state dict")
    results = []
    for top1 in (0.5, 0.4, 0.7):
        tracker = _tracker(store, experiment="register")
        tracker.log_metrics({"val/top1": top1}, step=0)
        tracker.log_artifact(str(checkpoint), artifact_path="model")
        tracker.close()
        results.append(
            mlflow_tracker.register_model(
                tracker,
                artifact_path="model",
                name="toy-cls",
                alias="champion",
                metric="val/top1",
                mode="max",
            )
        )
    assert [r.version for r in results] == ["1", "2", "3"]
    assert [r.alias_moved for r in results] == [True, False, True]
    assert (results[1].previous_version, results[1].previous_value) == ("1", 0.5)
    assert (results[2].previous_version, results[2].previous_value) == ("1", 0.5)
    champion = MlflowClient(store["uri"]).get_model_version_by_alias("toy-cls", "champion")
    assert str(champion.version) == "3" and champion.run_id == tracker.run_id
    assert champion.source.endswith("/model")

    # a run id works as well as a tracker; "min" mode: lower loss wins
    with pytest.raises(ValueError, match="no metric 'val/loss'"):
        mlflow_tracker.register_model(
            tracker.run_id,
            artifact_path="model",
            name="toy-cls",
            alias="champion",
            metric="val/loss",
            mode="min",
            tracking_uri=store["uri"],
        )
