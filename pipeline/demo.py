"""The end-to-end main job behind ``make demo`` (and ``make demo-local``): data, pre-training, a search and a
fine-tune, each a real job of this project, then a summary.

With the stack (the default) the steps are what a user does on a cluster: shards go into the S3 endpoint,
and pre-training, the Tune search and the fine-tune are ``ray job submit`` jobs against the local Ray head,
tracked by the MLflow server. ``local=True`` runs the same commands without servers: each job starts its own
in-process Ray and logs to the embedded sqlite store.

Every step writes its full output to ``<logs>/<step>.log``; the console gets the lines that matter, and a
failing step prints its name, the tail of its log and the log's path.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import PipelineError

REPO = Path(__file__).resolve().parents[1]
PRETRAIN_RECIPE = "configs/pretrain/toy_resnet20.yaml"
SEARCH_RECIPE = "configs/tune/toy_asha.yaml"
FINETUNE_RECIPE = "configs/finetune/toy_two_stage.yaml"
PRETRAIN_MODEL = "toy-resnet20"
# One validation image per class of the embedded data (written by the data step) for the predict step.
DEMO_IMAGES = ".cache/toy/pretrain/val"
# Lines of a job's output worth showing while it runs (the rest is in its log).
_SHOWN = re.compile(
    r"^(===|best |last epoch|checkpoints and|MLflow (parent )?run|registered |trial \d+:|epochs used|"
    r"best config|pretrain: failed|finetune: failed|tune: failed|predict: failed|.*config error|"
    r"\[[\w.-]+\] +epoch \d+/|  image |evaluation: |[\d.]+ img/s; predictions)"
)
# Ray prefixes what a worker prints with its actor and pid, in color on a terminal:
# "\x1b[36m(RayTrainWorker pid=123)\x1b[0m [toy-resnet20] epoch 1/10 ..."
_RAY_PREFIX = re.compile(r"^(\x1b\[[0-9;]*m)*\([^)]*pid=\d+[^)]*\)(\x1b\[[0-9;]*m)* ")
# Ray's job server asks to retry while its agent starts, right after `ray start`.
_AGENT_NOT_READY = "No available agent"


class DemoError(PipelineError, RuntimeError):
    """A demo step failed: the message names the step and its log."""


@dataclass
class DemoOptions:
    local: bool = False
    state_dir: str = ".cache/stack"
    logs: str = ".cache/demo/logs"
    pretrain_epochs: int = 10
    search_trials: int = 4
    search_epochs: int = 3
    finetune_epochs: int = 8
    extra: dict[str, list[str]] = field(default_factory=dict)
    """Extra overrides per step (pretrain, search, finetune), e.g. for a faster test."""


@dataclass
class StepResult:
    name: str
    seconds: float
    log: Path
    output: str


class Demo:
    def __init__(self, options: DemoOptions, *, echo: Callable[[str], None] = print) -> None:
        self.options = options
        self.echo = echo
        self.logs = Path(options.logs).resolve()
        self.logs.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", MLFLOW_DISABLE_TELEMETRY="true")
        self.results: list[StepResult] = []
        self.stack_cfg = None

    # ---- plumbing
    def _run(self, step: str, cmd: list[str], *, retry_on: str | None = None) -> StepResult:
        log = self.logs / f"{step}.log"
        self.echo(f"[demo] {step}: running (log: {log})")
        start = time.monotonic()
        deadline = start + 90
        while True:
            with open(log, "w") as out:
                out.write("$ " + " ".join(cmd) + "\n")
                out.flush()
                process = subprocess.Popen(
                    cmd, cwd=REPO, env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
                )
                lines = []
                assert process.stdout is not None
                for line in process.stdout:
                    out.write(line)
                    lines.append(line)
                    shown = _RAY_PREFIX.sub("", line)
                    if _SHOWN.match(shown):
                        self.echo("    " + shown.rstrip())
                rc = process.wait()
            output = "".join(lines)
            if rc != 0 and retry_on and retry_on in output and time.monotonic() < deadline:
                time.sleep(3)
                continue
            break
        seconds = time.monotonic() - start
        if rc != 0:
            tail = "\n".join(output.strip().splitlines()[-25:])
            raise DemoError(
                f"demo: step '{step}' failed (exit {rc}) after {seconds:.0f} s.\n--- last lines of {log} ---\n"
                f"{tail}\n--- full log: {log}"
            )
        self.echo(f"[demo] {step}: done in {seconds:.0f} s")
        result = StepResult(step, seconds, log, output)
        self.results.append(result)
        return result

    def _job(self, step: str, script: str, config: str | None, overrides: list[str]) -> StepResult:
        """One of the project's jobs: ``ray job submit`` to the stack's head, or a plain local process."""
        recipe = ["--config", config] if config else []
        args = ["python", script, *recipe, *overrides, *self.options.extra.get(step, [])]
        if self.options.local:
            return self._run(step, [sys.executable, *args[1:]])
        runtime_env = {
            "excludes": [".venv", ".cache", ".git", "*.egg-info", "docs"],
            # The job's copy of the code has no .git: runs are tagged with the revision it came from.
            "env_vars": {"PIPELINE_GIT_REVISION": _git_head()},
        }
        cmd = [
            str(Path(sys.executable).parent / "ray"),
            "job",
            "submit",
            "--address",
            self.stack_cfg.dashboard_url,
            "--working-dir",
            str(REPO),
            "--runtime-env-json",
            json.dumps(runtime_env),
            "--submission-id",
            f"demo-{step}-{int(time.time())}",
            "--",
            *args,
        ]
        return self._run(step, cmd, retry_on=_AGENT_NOT_READY)

    # ---- steps
    def stack(self) -> None:
        from pipeline.stack import Stack, StackConfig

        self.echo("[demo] stack: starting the Ray head, MLflow server and S3 endpoint on 127.0.0.1")
        self.stack_cfg = StackConfig(state_dir=self.options.state_dir)
        start = time.monotonic()
        try:
            urls = Stack(self.stack_cfg).up()
        except PipelineError as err:
            raise DemoError(f"demo: step 'stack' failed: {err}") from None
        for name, url in urls.items():
            self.echo(f"    {name:14s} {url}")
        self.env.update(self.stack_cfg.client_env())
        self.env.pop("RAY_ADDRESS", None)  # jobs go through `ray job submit --address`, not this variable
        self.results.append(StepResult("stack", time.monotonic() - start, Path(self.stack_cfg.state_dir), ""))

    def _shards_root(self) -> str:
        return ".cache/shards" if self.options.local else f"s3://{self.stack_cfg.bucket}/shards"

    def _tracking(self) -> str:
        return "null" if self.options.local else self.stack_cfg.mlflow_uri

    def _storage(self) -> str:
        return ".cache/ray_results" if self.options.local else f"s3://{self.stack_cfg.bucket}/ray_results"

    def _manifest(self, task: str, split: str) -> str:
        return f"{self._shards_root()}/{task}/{split}/manifest.json"

    def data(self) -> None:
        self._run(
            "data",
            [sys.executable, "jobs/demo.py", "--data-only", f"shards.dest={self._shards_root()}"],
        )

    def pretrain(self) -> StepResult:
        return self._job(
            "pretrain",
            "jobs/pretrain.py",
            PRETRAIN_RECIPE,
            [
                f"data.train_manifest={self._manifest('pretrain', 'train')}",
                f"data.val_manifest={self._manifest('pretrain', 'val')}",
                f"train.epochs={self.options.pretrain_epochs}",
                f"tracking.uri={self._tracking()}",
                f"checkpoint.storage_path={self._storage()}",
                "checkpoint.name=demo-pretrain",
            ],
        )

    def search(self) -> StepResult:
        return self._job(
            "search",
            "jobs/tune.py",
            SEARCH_RECIPE,
            [
                f"pretrain.data.train_manifest={self._manifest('pretrain', 'train')}",
                f"pretrain.data.val_manifest={self._manifest('pretrain', 'val')}",
                f"pretrain.train.epochs={self.options.search_epochs}",
                f"pretrain.tracking.uri={self._tracking()}",
                f"search.num_trials={self.options.search_trials}",
                f"search.storage_path={self._storage()}",
                f"search.name=demo-search-{int(time.time())}",
            ],
        )

    def finetune(self) -> StepResult:
        return self._job(
            "finetune",
            "jobs/finetune.py",
            FINETUNE_RECIPE,
            [
                f"data.train_manifest={self._manifest('downstream', 'train')}",
                f"data.val_manifest={self._manifest('downstream', 'val')}",
                f"finetune.source=models:/{PRETRAIN_MODEL}@champion",
                f"train.epochs={self.options.finetune_epochs}",
                f"tracking.uri={self._tracking()}",
                f"checkpoint.storage_path={self._storage()}",
                "checkpoint.name=demo-finetune",
            ],
        )

    def predict(self) -> StepResult:
        """The registered pre-trained model on one validation image per class (class-named folders, so the
        job also evaluates): label and score printed for each."""
        from pipeline.data import s3, storage

        images = f"{self._shards_root().rsplit('/', 1)[0]}/demo-images"
        # This process uploads them: to the stack's S3 endpoint, like the jobs it starts.
        os.environ.update({k: v for k, v in self.env.items() if k.startswith("AWS_")})
        s3.reset_clients()
        for folder in sorted(Path(DEMO_IMAGES).iterdir()):
            first = sorted(folder.iterdir())[0]
            storage.makedirs(storage.join(images, folder.name))
            storage.put_file(str(first), storage.join(images, folder.name, first.name))
        return self._job(
            "predict",
            "jobs/predict.py",
            None,
            [
                "--model",
                f"models:/{PRETRAIN_MODEL}@champion",
                "--input",
                images,
                "--output",
                f"{self._storage().rsplit('/', 1)[0]}/predictions/demo-{int(time.time())}",
                f"tracking.uri={self._tracking()}",
            ],
        )

    def run(self) -> dict[str, str]:
        start = time.monotonic()
        total = 5 if self.options.local else 6
        steps: list[tuple[str, Callable[[], object]]] = [
            ("data", self.data),
            ("pretrain", self.pretrain),
            ("search", self.search),
            ("finetune", self.finetune),
            ("predict", self.predict),
        ]
        if not self.options.local:
            steps.insert(0, ("stack", self.stack))
        for index, (name, step) in enumerate(steps, 1):
            self.echo(f"\n[demo] step {index}/{total}: {name}")
            step()
        summary = self.summary(time.monotonic() - start)
        return summary

    def summary(self, seconds: float) -> dict[str, str]:
        found = {r.name: r.output for r in self.results}
        lines = {
            "pretrain": _grep(found.get("pretrain", ""), r"^best val/top1 = (\S+) at epoch (\S+)"),
            "search": _grep(found.get("search", ""), r"^trial \d+: .*<- best"),
            "finetune": _grep(found.get("finetune", ""), r"^best val/balanced_acc = (\S+) at epoch (\S+)"),
            "predict": _grep(found.get("predict", ""), r"^evaluation: "),
        }
        tracking = (
            "the embedded sqlite store (.cache/mlflow/mlflow.db): `mlflow ui --backend-store-uri "
            "sqlite:///.cache/mlflow/mlflow.db --host 127.0.0.1 --port 5055`"
            if self.options.local
            else f"{self.stack_cfg.mlflow_uri}"
        )
        self.echo("\n=== demo summary ===")
        self.echo(f"pre-training ({PRETRAIN_RECIPE}): {lines['pretrain'] or 'see its log'}")
        self.echo(f"search ({SEARCH_RECIPE}): {lines['search'] or 'see its log'}")
        self.echo(f"fine-tuning ({FINETUNE_RECIPE}): {lines['finetune'] or 'see its log'}")
        self.echo(f"prediction (models:/{PRETRAIN_MODEL}@champion): {lines['predict'] or 'see its log'}")
        self.echo(f"total {seconds / 60:.1f} min; step logs in {self.logs}")
        self.echo(f"MLflow UI: {tracking}")
        self.echo(
            "  experiments pretrain-toy, tune-toy (parent run with nested trials), finetune-toy, predict; models "
            f"{PRETRAIN_MODEL}, {PRETRAIN_MODEL}-tuned, {PRETRAIN_MODEL}-downstream (alias champion)"
        )
        if not self.options.local:
            self.echo(f"Ray dashboard: {self.stack_cfg.dashboard_url} (the four jobs under Jobs)")
            self.echo("stop the stack: make stack-down")
        return lines


def _git_head() -> str:
    from pipeline.provenance import git_revision

    return git_revision(REPO)


def _grep(text: str, pattern: str) -> str:
    for line in text.splitlines():
        if re.match(pattern, line):
            return line.strip()
    return ""
