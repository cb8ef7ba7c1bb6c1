"""infra/local/screenshots.py against a real MLflow server (S3-proxied artifacts) and headless Chromium: it
pictures the demo's views, and it fails when the UI shows no runs instead of writing blank pictures."""

from __future__ import annotations

import importlib.util
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from pipeline.stack import Stack, StackConfig, free_port

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(
    shutil.which("chromium") is None, reason="headless Chromium not installed (apt-get install chromium)"
)


def _script():
    spec = importlib.util.spec_from_file_location("screenshots", REPO / "infra" / "local" / "screenshots.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def mlflow_server():
    stack = Stack(
        StackConfig(
            state_dir=tempfile.mkdtemp(prefix="shots-", dir="/tmp"),
            s3_port=free_port(),
            mlflow_port=free_port(),
            bucket="shots",
        )
    )
    try:
        stack.up(with_ray=False)
        yield stack.cfg.mlflow_uri
    finally:
        stack.down()


def _demo_like_runs(uri: str) -> None:
    """What the demo leaves: a pre-training run with curves, a search parent with nested trials, a model."""
    from pipeline.tracking.mlflow_tracker import MlflowTracker, child_tracker, register_model

    with MlflowTracker(tracking_uri=uri, experiment="pretrain-toy", run_name="demo-pretrain") as run:
        for epoch, value in enumerate([0.2, 0.35, 0.45]):
            run.log_metrics({"val/top1": value, "train/loss": 2.0 - epoch / 2}, step=epoch)
        run.log_text("weights", "model/model.pt")
    register_model(
        run, artifact_path="model", name="toy-resnet20", alias="champion", metric="val/top1", mode="max"
    )
    with MlflowTracker(tracking_uri=uri, experiment="tune-toy", run_name="search-demo") as parent:
        for index in range(2):
            child = child_tracker(
                tracking_uri=uri,
                parent_run_id=parent.run_id,
                key_tag="trial",
                key=str(index),
                run_name=f"trial-{index:03d}",
            )
            child.log_params({"optim.weight_decay": 1e-3 * (index + 1), "model.dropout": 0.1 * index})
            child.log_metrics({"val/top1": 0.3 + index / 10}, step=0)
            child.close()


def test_no_runs_is_an_error_not_a_blank_picture(mlflow_server, tmp_path, capsys):
    shots = _script()
    assert shots.main(["--mlflow", mlflow_server, "--out", str(tmp_path)]) == 1
    assert "run `make demo` first" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png"))


def test_pictures_of_the_demo_views(mlflow_server, tmp_path):
    shots = _script()
    _demo_like_runs(mlflow_server)
    views = shots.demo_views(mlflow_server)
    assert [v.name for v in views] == [
        "search_nested_trials",
        "search_parallel_coordinates",
        "pretrain_learning_curves",
        "registered_model",
    ]
    written = shots.take(views, tmp_path)
    assert len(written) == 4 and all(p.stat().st_size > 20_000 for p in written), [
        p.stat().st_size for p in written
    ]
    # The DOM check is what makes a picture trustworthy: a run the UI does not show fails it.
    bogus = shots.View("bogus", views[0].url, ["no-such-run-name"], wait_s=4)
    with pytest.raises(shots.UIError, match="does not show"):
        shots.check(bogus)
