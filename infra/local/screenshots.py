"""Screenshots of the MLflow UI showing the demo's results, for docs/ (re-run after `make demo`):

    .venv/bin/python infra/local/screenshots.py [--mlflow http://127.0.0.1:5055] [--out docs/images]

Uses headless Chromium from Debian's packages (`apt-get install chromium`). For each view it first renders
the page's DOM and checks that the UI really shows what the picture is meant to show (the runs' names, the
model's name); a UI with no runs is an error (exit 1), never a blank screenshot in the docs.

Views: the search's parent run with its nested trials, the trials' parallel-coordinates comparison, the
pre-training run's learning curves, and the registered model.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path

# Headless, no network beyond the page itself (this machine has none), fresh profile each time.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


class UIError(RuntimeError):
    pass


@dataclass(frozen=True)
class View:
    name: str
    url: str
    must_show: list[str]
    """Texts the rendered page must contain (run names, a model name), or the view is wrong/empty."""


def _api(base: str, path: str, body: dict | None = None, **query) -> dict:
    url = f"{base}/api/2.0/mlflow/{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 (the user's server)
            return json.loads(response.read())
    except OSError as error:
        raise UIError(f"MLflow at {base} is not reachable ({error}); start it with `make stack-up`") from None


def _runs(base: str, experiment: str) -> tuple[str, list[dict]]:
    found = _api(base, "experiments/get-by-name", experiment_name=experiment) if experiment else {}
    if not found.get("experiment"):
        raise UIError(f"MLflow at {base} has no experiment {experiment!r}: run `make demo` first")
    experiment_id = found["experiment"]["experiment_id"]
    runs = _api(base, "runs/search", {"experiment_ids": [experiment_id], "max_results": 200}).get("runs", [])
    if not runs:
        raise UIError(f"MLflow at {base}: experiment {experiment!r} shows no runs: run `make demo` first")
    return experiment_id, runs


def demo_views(base: str) -> list[View]:
    """The four views of the demo's results, resolved to URLs through the REST API."""
    views = []
    search_id, search_runs = _runs(base, "tune-toy")
    parents = [r for r in search_runs if "mlflow.parentRunId" not in _tags(r)]
    parent = max(parents, key=lambda r: r["info"]["start_time"])
    trials = [r for r in search_runs if _tags(r).get("mlflow.parentRunId") == parent["info"]["run_id"]]
    views.append(
        View(
            "search_nested_trials",
            f"{base}/#/experiments/{search_id}",
            [parent["info"]["run_name"], *[t["info"]["run_name"] for t in trials[:2]]],
        )
    )
    ids = json.dumps([t["info"]["run_id"] for t in trials])
    views.append(
        View(
            "search_parallel_coordinates",
            f"{base}/#/compare-runs?runs={urllib.parse.quote(ids)}&experiments={urllib.parse.quote(json.dumps([search_id]))}",
            [trials[0]["info"]["run_name"]],
        )
    )
    pretrain_id, pretrain_runs = _runs(base, "pretrain-toy")
    latest = max(pretrain_runs, key=lambda r: r["info"]["start_time"])
    views.append(
        View(
            "pretrain_learning_curves",
            f"{base}/#/experiments/{pretrain_id}/runs/{latest['info']['run_id']}/model-metrics",
            ["val/top1"],
        )
    )
    views.append(View("registered_model", f"{base}/#/models/toy-resnet20", ["toy-resnet20", "champion"]))
    return views


def _tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        if path := shutil.which(name):
            return path
    raise UIError("headless Chromium is not installed: `apt-get install chromium` (Debian's package)")


def _render(url: str, *, dom: bool, out: Path | None = None, size: str = "1440,900") -> str:
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        cmd = [
            _chromium(),
            *CHROMIUM_FLAGS,
            f"--user-data-dir={profile}",
            f"--window-size={size}",
            "--virtual-time-budget=15000",  # let the single-page app fetch and draw before the capture
            "--dump-dom" if dom else f"--screenshot={out}",
            url,
        ]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if result.returncode != 0:
        raise UIError(f"chromium failed on {url}: {result.stderr.strip()[-500:]}")
    return result.stdout


def check(view: View) -> None:
    """The rendered page contains every text the view must show."""
    page = _render(view.url, dom=True)
    missing = [text for text in view.must_show if text not in page]
    if missing:
        raise UIError(f"the MLflow UI at {view.url} does not show {missing}: no runs to picture")


def take(views: list[View], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for view in views:
        check(view)
        path = out_dir / f"mlflow_{view.name}.png"
        _render(view.url, dom=False, out=path)
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mlflow", default="http://127.0.0.1:5055", help="the MLflow server of the stack")
    parser.add_argument("--out", default="docs/images")
    args = parser.parse_args(argv)
    try:
        for path in take(demo_views(args.mlflow.rstrip("/")), Path(args.out)):
            print(f"wrote {path}")
    except UIError as error:
        print(f"screenshots: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
