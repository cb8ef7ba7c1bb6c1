"""The local stack: a Ray head, an MLflow tracking server and an S3 endpoint, all on 127.0.0.1, no docker.

    python -m pipeline.stack up|down|status|env [--state-dir .cache/stack] [--mlflow-port 5055] ...

(``make stack-up`` / ``make stack-down`` wrap it through ``infra/local/``.) What runs:

- an S3-compatible endpoint (``moto_server``) with the bucket created;
- ``mlflow server`` with a sqlite backend in the state directory and artifacts proxied to
  ``s3://BUCKET/mlflow`` on that endpoint (clients never need S3 credentials for artifacts);
- ``ray start --head`` with the dashboard and job server, started with the S3 endpoint and the MLflow URI in
  its environment, so ``ray job submit`` jobs read shards from the bucket and log to the server unchanged.

Everything binds to 127.0.0.1. The ports default clear of MLflow's and moto's shared default 5000 and are
flags (or ``STACK_*`` variables through make). PIDs (with their start times, so a recycled PID is never
taken for ours), logs and data live under one state directory. ``up`` is idempotent: a healthy service is
left alone, a dead one is started again, a port held by something else is an error naming the flag to change.
``down`` stops only the processes this state directory recorded.

moto keeps objects in memory: ``down`` loses the bucket's contents, so it also clears the MLflow database that
would point at them (logs stay). The S3 credentials are moto's fixed dummies, not secrets.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil

from pipeline.errors import PipelineError
from pipeline.ports import free_port

HOST = "127.0.0.1"
STATE_FILE = "stack.json"
# moto accepts any key pair; these name themselves as dummies so nobody mistakes them for credentials.
DUMMY_S3_ENV = {
    "AWS_ACCESS_KEY_ID": "local-stack-dummy",
    "AWS_SECRET_ACCESS_KEY": "local-stack-dummy",
    "AWS_DEFAULT_REGION": "us-east-1",
}
_BIN = Path(sys.executable).parent


class StackError(PipelineError, RuntimeError):
    """A stack service could not be started or reached; the message names it, its log and the fix."""


@dataclass(frozen=True)
class StackConfig:
    state_dir: str = ".cache/stack"
    s3_port: int = 9055
    mlflow_port: int = 5055
    ray_port: int = 6390
    dashboard_port: int = 8265
    bucket: str = "pipeline"
    num_cpus: int | None = None
    """Logical CPUs the Ray head offers. None: this machine's cores + 1, the one extra for the idle driver
    processes that reserve a little CPU next to the workers (Tune's trial functions take 0.01 each, so two
    one-CPU trials on two cores would otherwise never run side by side)."""
    start_timeout_s: float = 120.0

    @property
    def s3_endpoint(self) -> str:
        return f"http://{HOST}:{self.s3_port}"

    @property
    def mlflow_uri(self) -> str:
        return f"http://{HOST}:{self.mlflow_port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{HOST}:{self.dashboard_port}"

    @property
    def ray_token_path(self) -> Path:
        """This stack's Ray authentication token (written by ``up``, readable by its owner only). Ray binds
        its GCS, raylet, agent and client server to every interface whatever --node-ip-address says, so
        the token is what keeps anyone who reaches the machine from running code on it."""
        return Path(self.state_dir).resolve() / "ray_auth_token"

    def ray_auth_headers(self) -> dict[str, str]:
        """HTTP headers for the dashboard and job API (e.g. ``JobSubmissionClient(url, headers=...)``)."""
        return {"Authorization": f"Bearer {self.ray_token_path.read_text().strip()}"}

    def client_env(self) -> dict[str, str]:
        """What a client process (the demo, a test, a user's shell) needs to use the stack."""
        return {
            "AWS_ENDPOINT_URL": self.s3_endpoint,
            "AWS_ENDPOINT_URL_S3": self.s3_endpoint,  # boto3 prefers it over AWS_ENDPOINT_URL if one is set
            **DUMMY_S3_ENV,
            "MLFLOW_TRACKING_URI": self.mlflow_uri,
            "RAY_ADDRESS": self.dashboard_url,
            **self.ray_auth_env(),
        }

    def ray_auth_env(self) -> dict[str, str]:
        """Ray's token authentication for a process: the CLI, ray.init and the jobs read the token file."""
        return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(self.ray_token_path)}


# --------------------------------------------------------------------------------------------------------
# Process bookkeeping


def _alive(record: dict[str, Any]) -> bool:
    """The recorded process still runs and is the one we started (same PID *and* start time)."""
    try:
        process = psutil.Process(record["pid"])
        return abs(process.create_time() - record["create_time"]) < 1.0 and process.is_running()
    except (psutil.Error, KeyError):
        return False


STACK_MARK = "PIPELINE_STACK_ID"
"""Set in the environment of every process a stack starts (Ray passes it on to all its daemons, agents and
workers): what ``down`` looks for. Command lines are not enough: Ray's agents rename themselves
(``ray::DashboardAgent``) and outlive a killed raylet for a while, holding their ports."""


def _marked(stack_id: str, service: str | None = None) -> list[psutil.Process]:
    """The processes of one stack (``service``: of one of its services), found by their environment."""
    found = []
    for process in psutil.process_iter():
        try:
            mark = process.environ().get(STACK_MARK, "")
        except psutil.Error:
            continue
        owner, _, name = mark.rpartition(":")
        if owner == stack_id and service in (None, name):
            found.append(process)
    return found


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:
        return []


def _terminate(processes: list[psutil.Process], timeout_s: float = 15.0) -> None:
    for process in processes:
        try:
            process.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(processes, timeout=timeout_s)
    for process in alive:
        try:
            process.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(alive, timeout=5)


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def _http_ok(url: str, timeout_s: float = 2.0, headers: dict[str, str] | None = None) -> bool:
    try:
        request = urllib.request.Request(url, headers=headers or {})
        with urllib.request.urlopen(request, timeout=timeout_s) as response:  # noqa: S310 (loopback URL we built)
            return 200 <= response.status < 300
    except (urllib.error.URLError, OSError):
        return False


# --------------------------------------------------------------------------------------------------------
# The stack


class Stack:
    """The three services of one state directory."""

    def __init__(self, cfg: StackConfig) -> None:
        self.cfg = cfg
        self.state_dir = Path(cfg.state_dir).resolve()
        self.logs = self.state_dir / "logs"

    # ---- state file
    def _read(self) -> dict[str, Any]:
        path = self.state_dir / STATE_FILE
        return json.loads(path.read_text()) if path.is_file() else {"services": {}}

    def _write(self, state: dict[str, Any]) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.state_dir / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.state_dir / STATE_FILE)

    # ---- services
    def _log(self, name: str) -> Path:
        return self.logs / f"{name}.log"

    def _spawn(self, name: str, cmd: list[str], env: dict[str, str]) -> dict[str, Any]:
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self._log(name), "ab") as log:
            process = subprocess.Popen(
                cmd,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=self.state_dir,
                start_new_session=True,  # survives the shell that ran `make stack-up`; stopped by `down`
            )
        return {"pid": process.pid, "create_time": psutil.Process(process.pid).create_time(), "cmd": cmd}

    def _wait(self, name: str, healthy, record: dict[str, Any] | None) -> None:
        deadline = time.monotonic() + self.cfg.start_timeout_s
        while time.monotonic() < deadline:
            if healthy():
                return
            if record is not None and not _alive(record):
                break
            time.sleep(0.5)
        tail = self._log(name).read_text(errors="replace")[-1500:] if self._log(name).is_file() else ""
        raise StackError(f"stack: {name} did not become healthy; its log is {self._log(name)}:\n{tail}")

    def _check_port(self, name: str, port: int, flag: str) -> None:
        if not _port_free(port):
            raise StackError(
                f"stack: {name} port {port} on {HOST} is taken by another process; choose another with {flag} "
                f"(or STACK_{flag.removeprefix('--').replace('-', '_').upper()}=... with make)"
            )

    @property
    def stack_id(self) -> str:
        return str(self.state_dir)

    def _env(self, service: str) -> dict[str, str]:
        env = dict(os.environ)
        env.pop("RAY_ADDRESS", None)
        env.update(
            PATH=f"{_BIN}{os.pathsep}{env.get('PATH', '')}",  # the venv's python runs the Ray jobs
            MLFLOW_DISABLE_TELEMETRY="true",
            RAY_USAGE_STATS_ENABLED="0",
        )
        env[STACK_MARK] = f"{self.stack_id}:{service}"
        return env

    def _s3_healthy(self) -> bool:
        return _http_ok(f"{self.cfg.s3_endpoint}/moto-api/")

    def _mlflow_healthy(self) -> bool:
        return _http_ok(f"{self.cfg.mlflow_uri}/health")

    def _ray_healthy(self) -> bool:
        if not self.cfg.ray_token_path.is_file():
            return False
        return _http_ok(f"{self.cfg.dashboard_url}/api/version", headers=self.cfg.ray_auth_headers())

    def _ensure_ray_token(self) -> None:
        """A random token for this stack's Ray, kept across restarts of the head (clients keep working)."""
        path = self.cfg.ray_token_path
        if path.is_file() and path.read_text().strip():
            return
        import secrets

        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(secrets.token_hex(32))

    def _start_s3(self, state: dict[str, Any]) -> None:
        self._check_port("S3 endpoint", self.cfg.s3_port, "--s3-port")
        record = self._spawn(
            "s3", [str(_BIN / "moto_server"), "-H", HOST, "-p", str(self.cfg.s3_port)], self._env("s3")
        )
        state["services"]["s3"] = record
        self._write(state)
        self._wait("s3", self._s3_healthy, record)

    def _ensure_bucket(self) -> None:
        import boto3

        client = boto3.client("s3", endpoint_url=self.cfg.s3_endpoint, **_boto_credentials())
        existing = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
        if self.cfg.bucket not in existing:
            client.create_bucket(Bucket=self.cfg.bucket)

    def _start_mlflow(self, state: dict[str, Any]) -> None:
        self._check_port("MLflow", self.cfg.mlflow_port, "--mlflow-port")
        env = self._env("mlflow")
        # Only the server talks to S3 for artifacts (proxied): clients upload through its REST API.
        env.update(
            DUMMY_S3_ENV,
            MLFLOW_S3_ENDPOINT_URL=self.cfg.s3_endpoint,
            AWS_ENDPOINT_URL=self.cfg.s3_endpoint,
            AWS_ENDPOINT_URL_S3=self.cfg.s3_endpoint,
        )
        env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"  # ~1 GB of job workers the stack never uses
        cmd = [
            str(_BIN / "mlflow"),
            "server",
            "--backend-store-uri",
            f"sqlite:///{self.state_dir / 'mlflow.db'}",
            "--artifacts-destination",
            f"s3://{self.cfg.bucket}/mlflow",
            "--host",
            HOST,
            "--port",
            str(self.cfg.mlflow_port),
            "--workers",
            "1",
        ]
        record = self._spawn("mlflow", cmd, env)
        state["services"]["mlflow"] = record
        self._write(state)
        self._wait("mlflow", self._mlflow_healthy, record)

    def _start_ray(self, state: dict[str, Any]) -> None:
        self._check_port("Ray GCS", self.cfg.ray_port, "--ray-port")
        self._check_port("Ray dashboard", self.cfg.dashboard_port, "--dashboard-port")
        # Ray's socket paths are length-limited: a short temp dir, recorded so `down` finds its daemons.
        temp_dir = tempfile.mkdtemp(prefix="pstack-", dir="/tmp")
        self._ensure_ray_token()
        env = self._env("ray")
        env.update(self.cfg.client_env())  # with RAY_AUTH_MODE=token and the token file: auth stays on
        env.pop("RAY_ADDRESS")
        cmd = [
            str(_BIN / "ray"),
            "start",
            "--head",
            f"--node-ip-address={HOST}",
            f"--port={self.cfg.ray_port}",
            f"--dashboard-host={HOST}",
            f"--dashboard-port={self.cfg.dashboard_port}",
            "--include-dashboard=true",
            f"--ray-client-server-port={free_port()}",
            # Not Ray's fixed default (52365): a second stack or a test cluster on the machine would collide.
            f"--dashboard-agent-listen-port={free_port()}",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
            f"--num-cpus={self.cfg.num_cpus if self.cfg.num_cpus is not None else (os.cpu_count() or 1) + 1}",
            "--num-gpus=0",
        ]
        self.logs.mkdir(parents=True, exist_ok=True)
        with open(self._log("ray"), "ab") as log:
            started = subprocess.run(
                cmd, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=self.cfg.start_timeout_s
            )
        state["services"]["ray"] = {"temp_dir": temp_dir, "cmd": cmd}
        self._write(state)
        if started.returncode != 0:
            raise StackError(
                f"stack: `ray start` failed (exit {started.returncode}); its log is {self._log('ray')}"
            )
        self._wait("ray", self._ray_healthy, None)

    def _ray_processes(self) -> list[psutil.Process]:
        return _marked(self.stack_id, "ray")

    def _ray_alive(self, record: dict[str, Any] | None) -> bool:
        return bool(record) and bool(self._ray_processes())

    # ---- public
    def up(self, *, with_ray: bool = True) -> dict[str, str]:
        """Start what is not running and healthy; return the URLs. ``with_ray=False``: S3 and MLflow only."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        state = self._read()
        services = state["services"]
        if not (_alive(services.get("s3", {})) and self._s3_healthy()):
            self._stop_one("s3", services.pop("s3", None))
            self._start_s3(state)
        self._ensure_bucket()
        if not (_alive(services.get("mlflow", {})) and self._mlflow_healthy()):
            self._stop_one("mlflow", services.pop("mlflow", None))
            self._start_mlflow(state)
        if with_ray and not (self._ray_alive(services.get("ray")) and self._ray_healthy()):
            self._stop_one("ray", services.pop("ray", None))
            self._start_ray(state)
        state["config"] = asdict(self.cfg)
        self._write(state)
        return self.urls()

    def urls(self) -> dict[str, str]:
        return {
            "MLflow UI": self.cfg.mlflow_uri,
            "Ray dashboard": self.cfg.dashboard_url,
            "S3 endpoint": f"{self.cfg.s3_endpoint} (bucket s3://{self.cfg.bucket})",
        }

    def status(self) -> dict[str, bool]:
        services = self._read()["services"]
        return {
            "s3": _alive(services.get("s3", {})) and self._s3_healthy(),
            "mlflow": _alive(services.get("mlflow", {})) and self._mlflow_healthy(),
            "ray": self._ray_alive(services.get("ray")) and self._ray_healthy(),
        }

    def _stop_one(self, name: str, record: dict[str, Any] | None) -> None:
        if not record:
            return
        if name == "ray":
            # The GCS server and the autoscaler's monitor take ~15 s to honour SIGTERM (they wait for the
            # raylet they just lost); the stack's Ray keeps nothing worth a graceful exit, so 3 s, then kill.
            _terminate(self._ray_processes(), timeout_s=3.0)
            shutil.rmtree(record["temp_dir"], ignore_errors=True)
        else:
            _terminate(_marked(self.stack_id, name))  # the server and any worker processes it forked

    def stop(self, name: str) -> None:
        """Stop one service (the fault tests stop MLflow mid-run); ``up`` starts it again."""
        state = self._read()
        self._stop_one(name, state["services"].pop(name, None))
        self._write(state)

    def down(self) -> list[str]:
        """Stop what this state directory started; clear the data moto's restart would orphan."""
        state = self._read()
        stopped = []
        for name in ("ray", "mlflow", "s3"):  # clients first, the store last
            record = state["services"].pop(name, None)
            if record:
                self._stop_one(name, record)
                stopped.append(name)
        _terminate(_marked(self.stack_id))  # anything of ours still around (e.g. a server's stray child)
        (self.state_dir / STATE_FILE).unlink(missing_ok=True)
        (self.state_dir / "mlflow.db").unlink(missing_ok=True)
        return stopped


def _boto_credentials() -> dict[str, str]:
    return {
        "aws_access_key_id": DUMMY_S3_ENV["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": DUMMY_S3_ENV["AWS_SECRET_ACCESS_KEY"],
        "region_name": DUMMY_S3_ENV["AWS_DEFAULT_REGION"],
    }


def config_from_state(state_dir: str) -> StackConfig:
    """The config a running stack was started with (``up`` records it), for clients such as the demo."""
    path = Path(state_dir) / STATE_FILE
    if not path.is_file():
        raise StackError(f"stack: no stack under {state_dir}; start it with `make stack-up`")
    return StackConfig(**json.loads(path.read_text())["config"])


def _parse(argv: list[str] | None) -> tuple[str, StackConfig]:
    defaults = StackConfig()
    parser = argparse.ArgumentParser(prog="python -m pipeline.stack", description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["up", "down", "status", "env"])
    parser.add_argument("--state-dir", default=os.environ.get("STACK_STATE_DIR", defaults.state_dir))
    for field, flag in (
        ("s3_port", "--s3-port"),
        ("mlflow_port", "--mlflow-port"),
        ("ray_port", "--ray-port"),
        ("dashboard_port", "--dashboard-port"),
    ):
        env_value = os.environ.get(f"STACK_{field.upper()}")
        parser.add_argument(flag, type=int, default=int(env_value) if env_value else getattr(defaults, field))
    parser.add_argument("--bucket", default=os.environ.get("STACK_BUCKET", defaults.bucket))
    parser.add_argument("--num-cpus", type=int, default=None)
    args = parser.parse_args(argv)
    cfg = StackConfig(
        state_dir=args.state_dir,
        s3_port=args.s3_port,
        mlflow_port=args.mlflow_port,
        ray_port=args.ray_port,
        dashboard_port=args.dashboard_port,
        bucket=args.bucket,
        num_cpus=args.num_cpus,
    )
    return args.command, cfg


def main(argv: list[str] | None = None) -> int:
    command, cfg = _parse(argv)
    if command != "up" and (Path(cfg.state_dir) / STATE_FILE).is_file():
        cfg = config_from_state(cfg.state_dir)  # the ports it was started with, not today's defaults
    stack = Stack(cfg)
    try:
        if command == "up":
            for name, url in stack.up().items():
                print(f"{name:14s} {url}")
            print(f"state, logs:   {stack.state_dir}\nstop it with:  make stack-down")
        elif command == "down":
            stopped = stack.down()
            print(
                f"stack: stopped {', '.join(stopped) or 'nothing (none was running)'}; logs kept in {stack.logs}"
            )
        elif command == "status":
            health = stack.status()
            for name, ok in health.items():
                print(f"{name:7s} {'healthy' if ok else 'down'}")
            return 0 if all(health.values()) else 1
        else:
            for key, value in cfg.client_env().items():
                print(f"export {key}={value}")
    except StackError as err:
        print(err, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
