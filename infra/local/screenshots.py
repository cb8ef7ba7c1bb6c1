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
import asyncio
import base64
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
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
    click: str = ""
    """JavaScript run once the page shows them, e.g. expanding the parent run's row."""
    settle_s: float = 2.0
    wait_s: float = 45.0
    """How long the page may take to show ``must_show``."""


def _api(base: str, path: str, body: dict | None = None, **query) -> dict:
    url = f"{base}/api/2.0/mlflow/{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 (the user's server)
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        if error.code == 404:  # e.g. no such experiment: the caller says what is missing
            return {}
        raise UIError(f"MLflow at {base} answered {error.code} to {path}") from None
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
            f"{base}/#/experiments/{search_id}/runs",
            [parent["info"]["run_name"]],
            # The parent's row starts collapsed: click its expander to show the nested trials.
            click="document.querySelector('button[data-component-id$=\"runnamecellrenderer.tsx_46\"]').click()",
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
            [latest["info"]["run_name"]],  # the curves are SVG, their titles are not page text
            settle_s=5.0,
        )
    )
    views.append(View("registered_model", f"{base}/#/models/toy-resnet20", ["toy-resnet20", "champion"]))
    return views


# The UI opens an "MLflow Assistant" side panel that would cover a third of every picture: close it.
CLOSE_ASSISTANT = (
    "(() => { const b = document.querySelector('button[data-component-id=\"mlflow.assistant.chat_panel.close\"]');"
    " if (b) b.click(); })()"
)


def _tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def _chromium() -> str:
    for name in ("chromium", "chromium-browser"):
        if path := shutil.which(name):
            return path
    raise UIError("headless Chromium is not installed: `apt-get install chromium` (Debian's package)")


class Browser:
    """Headless Chromium driven over the DevTools protocol (aiohttp's websocket client, which Ray already
    installs): the MLflow UI is a single-page app whose nested runs only show after a click."""

    def __init__(self) -> None:
        self._profile = tempfile.TemporaryDirectory(prefix="chromium-", ignore_cleanup_errors=True)
        self._process = subprocess.Popen(
            [
                _chromium(),
                *CHROMIUM_FLAGS,
                f"--user-data-dir={self._profile.name}",
                "--remote-debugging-address=127.0.0.1",
                "--remote-debugging-port=0",
                "--window-size=1440,900",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,  # its renderer and GPU helpers go down with it in close()
        )
        assert self._process.stderr is not None
        deadline = time.monotonic() + 30
        port = None
        while port is None and time.monotonic() < deadline:
            line = self._process.stderr.readline()
            if match := re.search(r"DevTools listening on ws://127\.0\.0\.1:(\d+)/", line):
                port = int(match.group(1))
            elif not line and self._process.poll() is not None:
                break
        if port is None:
            self.close()
            raise UIError("chromium did not start (no DevTools endpoint)")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:  # noqa: S310
            pages = [t for t in json.loads(response.read()) if t["type"] == "page"]
        self._ws_url = pages[0]["webSocketDebuggerUrl"]

    def close(self) -> None:
        try:
            os.killpg(self._process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._process.wait()
        self._profile.cleanup()

    def shoot(self, view: View, out: Path | None) -> str:
        """Open ``view.url``, wait until its page text shows every ``must_show`` (else UIError), run its
        clicks, and save a PNG to ``out`` (None: check only). Returns the page text."""
        return asyncio.run(self._shoot(view, out))

    async def _shoot(self, view: View, out: Path | None) -> str:
        import aiohttp

        async with aiohttp.ClientSession() as session, session.ws_connect(self._ws_url, max_msg_size=0) as ws:
            counter = iter(range(1, 1_000_000))

            async def call(method: str, **params):
                ident = next(counter)
                await ws.send_json({"id": ident, "method": method, "params": params})
                async for message in ws:
                    data = message.json()
                    if data.get("id") == ident:
                        if "error" in data:
                            raise UIError(f"chromium: {method} failed: {data['error']}")
                        return data.get("result", {})
                raise UIError("chromium closed the DevTools connection")

            async def text() -> str:
                result = await call(
                    "Runtime.evaluate", expression="document.body ? document.body.innerText : ''"
                )
                return result.get("result", {}).get("value", "")

            await call("Page.navigate", url=view.url)
            deadline = time.monotonic() + view.wait_s
            page = ""
            while time.monotonic() < deadline:
                page = await text()
                if all(item in page for item in view.must_show):
                    break
                await asyncio.sleep(0.5)
            missing = [item for item in view.must_show if item not in page]
            if missing:
                raise UIError(f"the MLflow UI at {view.url} does not show {missing}: no runs to picture")
            await call("Runtime.evaluate", expression=CLOSE_ASSISTANT)
            if view.click:
                await asyncio.sleep(0.5)
                await call("Runtime.evaluate", expression=view.click)
            await asyncio.sleep(view.settle_s)  # charts animate in
            page = await text()
            if out is not None:
                shot = await call("Page.captureScreenshot", format="png")
                out.write_bytes(base64.b64decode(shot["data"]))
            return page


def check(view: View) -> None:
    """The rendered page contains every text the view must show."""
    browser = Browser()
    try:
        browser.shoot(view, None)
    finally:
        browser.close()


def take(views: list[View], out_dir: Path) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    browser = Browser()
    try:
        for view in views:
            path = out_dir / f"mlflow_{view.name}.png"
            browser.shoot(view, path)
            written.append(path)
    finally:
        browser.close()
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
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
