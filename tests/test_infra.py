"""Cluster manifests (infra/) and docs/deploy.md, checked offline in seconds.

Mistakes that a cluster reveals only after minutes of booting, or never (a pasted key), fail here: Ray's own
launcher validation of the AWS config, images on pyproject's Ray pin, GPUs on the workers and none on the head,
a RayJob entrypoint that the job's own command line accepts (so a renamed config key fails) and that fits its
cluster, MLflow on Postgres with S3 artifacts and a Secret-held password, and a scan for credentials.
"""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import importlib.util
import ipaddress
import json
import re
import shlex
import tomllib
import typing
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from pipeline.config import ConfigError, FinetuneConfig, PretrainConfig, TuneConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
DEPLOY_DOC = ROOT / "docs" / "deploy.md"
YAML_FILES = sorted(p for p in INFRA.rglob("*") if p.suffix in (".yaml", ".yml"))
DOCKERFILE = INFRA / "docker" / "Dockerfile"
JOB_CONFIGS = {"pretrain": PretrainConfig, "finetune": FinetuneConfig, "tune": TuneConfig}
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def _pin(package: str) -> str:
    for dep in PYPROJECT["project"]["dependencies"]:
        match = re.fullmatch(rf"{package}(\[[^\]]*\])?==([\w.]+)", dep.replace(" ", ""))
        if match:
            return match.group(2)
    raise AssertionError(f"pyproject.toml pins no exact {package} version")


RAY_VERSION = _pin("ray")
MLFLOW_VERSION = _pin("mlflow")
# "py311" from requires-python ">=3.11,<3.12": Ray's image tags name the Python they carry.
PY_TAG = "py" + "".join(re.search(r">=\s*(\d+)\.(\d+)", PYPROJECT["project"]["requires-python"]).groups())
PROJECT_IMAGE_TAG = f"{PYPROJECT['project']['version']}-ray{RAY_VERSION}"

ACCOUNT = r"(?:<ACCOUNT_ID>|\d{12})"
INSTANCE_PROFILE_ARN = re.compile(rf"arn:aws:iam::{ACCOUNT}:instance-profile/[\w+=,.@-]+")
ROLE_ARN = re.compile(rf"arn:aws:iam::{ACCOUNT}:role/[\w+=,.@/-]+")
IRSA_ANNOTATION = "eks.amazonaws.com/role-arn"

# Ray's CLI module imports Ray Serve, whose pydantic models warn on import: not our code.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.serve.*")


def _docs(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _one(docs: list[dict], kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d.get("kind") == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def aws() -> dict:
    (config,) = _docs(INFRA / "aws" / "cluster.yaml")
    return config


@pytest.fixture(scope="module")
def raycluster() -> dict:
    return _one(_docs(INFRA / "kuberay" / "raycluster.yaml"), "RayCluster")


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return _one(_docs(INFRA / "kuberay" / "rayjob.yaml"), "RayJob")


@pytest.fixture(scope="module")
def ray_service_account() -> dict:
    return _one(_docs(INFRA / "kuberay" / "serviceaccount.yaml"), "ServiceAccount")


@pytest.fixture(scope="module")
def mlflow_docs() -> list[dict]:
    return _docs(INFRA / "mlflow" / "mlflow.yaml")


@pytest.fixture(scope="module")
def ray_cli():
    from ray.scripts.scripts import cli

    return cli


# --------------------------------------------------------------------------------------------------------
# Every file


def test_infra_has_the_cluster_manifests():
    names = {p.relative_to(INFRA).as_posix() for p in YAML_FILES}
    assert {
        "aws/cluster.yaml",
        "kuberay/raycluster.yaml",
        "kuberay/rayjob.yaml",
        "kuberay/serviceaccount.yaml",
        "mlflow/mlflow.yaml",
    } <= names


@pytest.mark.parametrize("path", YAML_FILES, ids=lambda p: p.relative_to(INFRA).as_posix())
def test_every_infra_yaml_parses(path):
    docs = _docs(path)
    assert docs and all(isinstance(d, dict) for d in docs)
    for doc in docs:
        if "apiVersion" in doc:
            # IRSA trust policies name namespace/serviceaccount: an object in whatever namespace kubectl
            # defaults to would silently lose S3 access.
            assert doc["metadata"].get("namespace"), f"{path.name}: {doc['kind']} names no namespace"


def test_readme_lists_every_manifest():
    readme = (INFRA / "README.md").read_text()
    for path in [*YAML_FILES, DOCKERFILE]:
        assert f"`{path.relative_to(INFRA).as_posix()}`" in readme, f"infra/README.md does not list {path}"


def test_every_placeholder_is_explained_in_the_deploy_doc():
    doc = DEPLOY_DOC.read_text()
    for path in [*YAML_FILES, DOCKERFILE]:
        for placeholder in set(re.findall(r"<[A-Z][A-Z_]*>", path.read_text())):
            assert f"`{placeholder}`" in doc, f"{path.name}: {placeholder} is not explained in docs/deploy.md"


# --------------------------------------------------------------------------------------------------------
# Images: one Ray version everywhere


def _assert_ray_image(image: str, where: str) -> None:
    repository, _, tag = image.rpartition(":")
    assert repository and tag and tag != "latest", f"{where}: image {image!r} is not pinned"
    if repository == "rayproject/ray":
        assert tag.startswith(f"{RAY_VERSION}-{PY_TAG}"), (
            f"{where}: {image} is not Ray {RAY_VERSION}, {PY_TAG}"
        )
    else:
        # The project image (infra/docker/Dockerfile); its tag carries the Ray it was built on.
        assert repository.endswith("/imgcls-pipeline") and tag == PROJECT_IMAGE_TAG, (
            f"{where}: {image} is neither rayproject/ray:{RAY_VERSION}-{PY_TAG}-* nor the project image "
            f"tagged {PROJECT_IMAGE_TAG}"
        )


def _dockerfile() -> list[tuple[str, str]]:
    lines = DOCKERFILE.read_text().replace("\\\n", " ").splitlines()
    return [tuple(line.strip().split(None, 1)) for line in lines if line.strip() and not line.startswith("#")]


def test_dockerfile_builds_on_the_pinned_ray_and_installs_this_package():
    instructions = _dockerfile()
    assert instructions[0] == ("FROM", f"rayproject/ray:{RAY_VERSION}-{PY_TAG}-gpu")
    runs = " ".join(arg for op, arg in instructions if op == "RUN")
    assert "pyproject.toml" in runs and "-r /tmp/requirements.txt" in runs, (
        "pinned dependencies not installed"
    )
    assert re.search(r"pip install [^&]*--no-deps \.", runs), "the package itself is not installed"
    assert PROJECT_IMAGE_TAG in DOCKERFILE.read_text(), "the build command tags another version"


def _dockerfile_workdir() -> str:
    return [arg for op, arg in _dockerfile() if op == "WORKDIR"][-1]


def _dockerfile_copied() -> set[str]:
    copied = set()
    for op, arg in _dockerfile():
        if op == "COPY":
            sources = [a for a in arg.split() if not a.startswith("--")][:-1]
            copied.update(s.rstrip("/") for s in sources)
    return copied


# --------------------------------------------------------------------------------------------------------
# AWS cluster launcher


def test_aws_config_passes_rays_own_validation(aws):
    """What `ray up` runs before touching AWS: defaults merged, then the JSON schema and cross-field checks
    (an unknown or misspelled key is an error; head_node_type must exist; min_workers within max_workers)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    assert aws["provider"]["type"] == "aws"
    validate_config(prepare_config(copy.deepcopy(aws)))


def test_ray_validation_rejects_a_misspelled_field(aws):
    from jsonschema import ValidationError
    from ray.autoscaler._private.util import prepare_config, validate_config

    broken = copy.deepcopy(aws)
    node_type = next(n for n in broken["available_node_types"] if n != broken["head_node_type"])
    broken["available_node_types"][node_type]["min_worker"] = 0
    with pytest.raises(ValidationError, match="min_worker"):
        validate_config(prepare_config(broken))


def _gpu_recipes() -> list[PretrainConfig]:
    recipes = [load_config(PretrainConfig, p) for p in sorted((ROOT / "configs" / "pretrain").glob("*.yaml"))]
    return [r for r in recipes if r.scaling.use_gpu]


def test_aws_gpu_workers_autoscale_and_the_head_has_no_gpu(aws):
    types = aws["available_node_types"]
    head = types[aws["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, (
        "the head must not advertise GPUs: Train workers would land there"
    )
    workers = {name: t for name, t in types.items() if name != aws["head_node_type"]}
    assert workers
    # A GPU node must hold as many Train workers as it has GPUs, each with the recipe's CPUs; otherwise Ray
    # waits for resources forever.
    cpus_per_worker = max(r.scaling.cpus_per_worker for r in _gpu_recipes())
    for name, node_type in workers.items():
        gpus = node_type["resources"].get("GPU", 0)
        assert gpus >= 1, f"{name}: no GPU resource declared"
        assert node_type.get("min_workers", 0) == 0 and node_type["max_workers"] >= 1, (
            f"{name}: not autoscaled"
        )
        assert node_type["resources"]["CPU"] / gpus >= cpus_per_worker, f"{name}: too few CPUs per GPU"


def test_aws_nodes_get_s3_from_instance_profiles_not_keys(aws):
    assert "aws_credentials" not in aws["provider"], "credentials belong in instance profiles, not the config"
    for name, node_type in aws["available_node_types"].items():
        config = node_type["node_config"]
        assert INSTANCE_PROFILE_ARN.fullmatch(config["IamInstanceProfile"]["Arn"]), (
            f"{name}: no instance profile"
        )
        assert config.get("ImageId"), f"{name}: no ImageId (Ray's fallback AMI is too old for torch)"


def test_aws_image_is_the_pinned_ray(aws):
    docker = aws["docker"]
    for key in ("image", "head_image", "worker_image"):
        if key in docker:
            _assert_ray_image(docker[key], f"cluster.yaml docker.{key}")


def _commands(lines: list[str]) -> list[list[str]]:
    """Simple commands of shell lines, split at ; && || and |."""
    commands = []
    for line in lines:
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        current: list[str] = []
        for token in lexer:
            if set(token) <= set(";&|"):
                commands.append(current)
                current = []
            else:
                current.append(token)
        commands.append(current)
    return [c for c in commands if c]


def _ray_start(ray_cli, lines: list[str]) -> dict:
    starts = [c[2:] for c in _commands(lines) if c[:2] == ["ray", "start"]]
    assert len(starts) == 1, f"expected one `ray start` in {lines}"
    return ray_cli.commands["start"].make_context("start", starts[0]).params  # unknown flags raise


def test_aws_ray_start_flags_exist_and_the_dashboard_stays_on_loopback(aws, ray_cli):
    head = _ray_start(ray_cli, aws["head_start_ray_commands"])
    assert head["head"]
    host = head["dashboard_host"]
    assert host == "localhost" or ipaddress.ip_address(host).is_loopback, "dashboard bound beyond loopback"
    worker = _ray_start(ray_cli, aws["worker_start_ray_commands"])
    assert not worker["head"] and worker["address"]


def test_aws_nodes_install_this_checkout(aws):
    synced = [remote for remote, local in aws["file_mounts"].items() if Path(local) == Path(".")]
    assert synced, "the checkout is not synced to the nodes"
    installs = [c for c in _commands(aws["setup_commands"]) if c[:2] == ["pip", "install"]]
    assert any(synced[0] in c for c in installs), "setup_commands do not install the synced checkout"
    # .venv (gigabytes of torch) and .cache are git-ignored; rsync must skip them.
    assert ".gitignore" in aws.get("rsync_filter", [])


# --------------------------------------------------------------------------------------------------------
# KubeRay

# Fields of the KubeRay v1 API (ray-operator/apis/ray/v1/*_types.go) that may appear here: a misspelled one
# is dropped by the operator without a word.
RAYCLUSTER_SPEC_FIELDS = {
    "headGroupSpec", "workerGroupSpecs", "rayVersion", "enableInTreeAutoscaling", "autoscalerOptions",
    "headServiceAnnotations", "suspend", "gcsFaultToleranceOptions", "managedBy",
}  # fmt: skip
HEAD_GROUP_FIELDS = {"serviceType", "headService", "enableIngress", "rayStartParams", "template"}
WORKER_GROUP_FIELDS = {
    "groupName", "replicas", "minReplicas", "maxReplicas", "numOfHosts", "rayStartParams", "template",
    "scaleStrategy", "suspend", "idleTimeoutSeconds",
}  # fmt: skip
AUTOSCALER_FIELDS = {
    "resources", "image", "imagePullPolicy", "env", "envFrom", "volumeMounts", "securityContext",
    "idleTimeoutSeconds", "upscalingMode", "version",
}  # fmt: skip
RAYJOB_SPEC_FIELDS = {
    "activeDeadlineSeconds", "backoffLimit", "rayClusterSpec", "submitterPodTemplate", "metadata",
    "clusterSelector", "submitterConfig", "managedBy", "deletionStrategy", "entrypoint", "runtimeEnvYAML",
    "jobId", "submissionMode", "entrypointResources", "entrypointNumCpus", "entrypointNumGpus",
    "ttlSecondsAfterFinished", "shutdownAfterJobFinishes", "suspend", "schedule",
}  # fmt: skip


def _assert_known(mapping: dict, known: set[str], where: str) -> None:
    unknown = set(mapping) - known
    assert not unknown, f"{where}: unknown KubeRay field(s) {sorted(unknown)}"


def _ray_container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]  # KubeRay's Ray container is the first


def _gpus(container: dict) -> int:
    resources = container.get("resources", {})
    limit = int(resources.get("limits", {}).get("nvidia.com/gpu", 0))
    request = resources.get("requests", {}).get("nvidia.com/gpu")
    assert request is None or int(request) == limit, "GPU requests must equal limits"
    return limit


def _cpus(quantity: str | int | float) -> float:
    text = str(quantity)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


def _in_cluster_mlflow_url(mlflow_docs: list[dict]) -> str:
    service = _one(mlflow_docs, "Service", "mlflow")
    (port,) = service["spec"]["ports"]
    return f"http://{service['metadata']['name']}.{service['metadata']['namespace']}.svc.cluster.local:{port['port']}"


def test_raycluster(raycluster, ray_service_account, mlflow_docs):
    assert raycluster["apiVersion"] == "ray.io/v1"
    spec = raycluster["spec"]
    _assert_known(spec, RAYCLUSTER_SPEC_FIELDS, "spec")
    _assert_known(spec.get("autoscalerOptions", {}), AUTOSCALER_FIELDS, "spec.autoscalerOptions")
    assert spec["rayVersion"] == RAY_VERSION
    assert spec["enableInTreeAutoscaling"] is True

    head = spec["headGroupSpec"]
    _assert_known(head, HEAD_GROUP_FIELDS, "headGroupSpec")
    assert head.get("serviceType", "ClusterIP") == "ClusterIP", "the dashboard must not be exposed"
    assert _gpus(_ray_container(head)) == 0 and head["rayStartParams"].get("num-gpus", "0") == "0"

    groups = spec["workerGroupSpecs"]
    assert groups
    for group in groups:
        where = f"workerGroupSpecs[{group['groupName']}]"
        _assert_known(group, WORKER_GROUP_FIELDS, where)
        assert _gpus(_ray_container(group)) >= 1, f"{where}: no nvidia.com/gpu limit"
        assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"], where
        assert group["maxReplicas"] >= 1, where

    account = ray_service_account["metadata"]
    assert ROLE_ARN.fullmatch(account["annotations"][IRSA_ANNOTATION])
    for group in [head, *groups]:
        pod = group["template"]["spec"]
        assert pod["serviceAccountName"] == account["name"], (
            "pods without the IRSA service account have no S3"
        )
        assert raycluster["metadata"]["namespace"] == account["namespace"]
        for container in pod["containers"]:
            _assert_ray_image(container["image"], f"raycluster {container['name']}")
        env = _env(_ray_container(group))
        assert env["MLFLOW_TRACKING_URI"]["value"] == _in_cluster_mlflow_url(mlflow_docs)


def test_rayjob_runs_on_the_raycluster_spec(rayjob, raycluster):
    assert rayjob["apiVersion"] == "ray.io/v1"
    spec = rayjob["spec"]
    _assert_known(spec, RAYJOB_SPEC_FIELDS, "RayJob spec")
    assert spec["rayClusterSpec"] == raycluster["spec"], (
        "rayjob.yaml's rayClusterSpec drifted from raycluster.yaml"
    )
    assert rayjob["metadata"]["namespace"] == raycluster["metadata"]["namespace"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] > 0


def _entrypoint(rayjob: dict) -> tuple[Path, list[str]]:
    python, job, *args = shlex.split(rayjob["spec"]["entrypoint"])
    assert python in ("python", "python3")
    return Path(job), args


def test_rayjob_working_dir_is_the_code_in_the_image(rayjob):
    runtime_env = yaml.safe_load(rayjob["spec"]["runtimeEnvYAML"])
    assert runtime_env["working_dir"] == _dockerfile_workdir()
    job, args = _entrypoint(rayjob)
    config = Path(args[args.index("--config") + 1])
    copied = _dockerfile_copied()
    for path in (job, config):
        assert (ROOT / path).is_file(), f"{path} does not exist"
        assert path.parts[0] in copied, f"{path} is not copied into the image's working directory"


def _run_job_cli(job: Path, args: list[str], capsys) -> int:
    # Loaded from its file: the repository root need not be on sys.path (it is not under bin/pytest).
    spec = importlib.util.spec_from_file_location(f"_infra_{job.stem}", ROOT / job)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    capsys.readouterr()
    return module.main([*args, "--print-config"])


def _typed(job: Path, args: list[str]):
    config = args[args.index("--config") + 1]
    overrides = [a for a in args if "=" in a and not a.startswith("-")]
    return load_config(JOB_CONFIGS[job.stem], ROOT / config, overrides)


def test_rayjob_entrypoint_is_accepted_by_the_job(rayjob, capsys, monkeypatch):
    """The job's own command line (argparse, recipe, every key=value override) with --print-config, which
    stops before Ray; a renamed config key or a bad value exits 2 and fails here."""
    monkeypatch.chdir(ROOT)  # the job runs in a copy of the repository (working_dir)
    job, args = _entrypoint(rayjob)
    assert _run_job_cli(job, args, capsys) == 0, capsys.readouterr().err
    printed = yaml.safe_load(capsys.readouterr().out)
    cfg = _typed(job, args)
    assert printed["scaling"]["num_workers"] == cfg.scaling.num_workers


def test_the_entrypoint_check_fails_on_a_renamed_key(rayjob, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    job, args = _entrypoint(rayjob)
    renamed = [a.replace("scaling.num_workers=", "scaling.workers=") for a in args]
    assert renamed != args
    assert _run_job_cli(job, renamed, capsys) == 2
    with pytest.raises(ConfigError, match="scaling.workers"):
        _typed(job, renamed)


def test_rayjob_fits_its_cluster(rayjob):
    job, args = _entrypoint(rayjob)
    cfg = _typed(job, args)
    assert cfg.scaling.use_gpu
    groups = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    gpu_slots = sum(g["maxReplicas"] * _gpus(_ray_container(g)) for g in groups)
    assert cfg.scaling.num_workers <= gpu_slots, "more GPU workers than the cluster can ever have"
    for group in groups:
        pod_cpus = _cpus(_ray_container(group)["resources"]["limits"]["cpu"])
        assert cfg.scaling.cpus_per_worker * _gpus(_ray_container(group)) <= pod_cpus, (
            f"{group['groupName']}: a worker pod cannot hold its Train workers' CPUs; Ray would wait forever"
        )
    # Pods share no disk: data and checkpoints must be where every pod (and --resume) can reach them.
    for url in (cfg.data.train_manifest, cfg.data.val_manifest, cfg.checkpoint.storage_path):
        assert url.startswith("s3://"), url


# --------------------------------------------------------------------------------------------------------
# MLflow


def _mlflow_server_flags() -> set[str]:
    """Options of `mlflow server`, read from mlflow's source: importing mlflow costs seconds."""
    package = Path(importlib.util.find_spec("mlflow").origin).parent  # finds it without importing it
    cli = (package / "cli" / "__init__.py").read_text()
    start = cli.index("Run the MLflow tracking server")
    block = cli[start : cli.index("\ndef server(", start)]
    shared = (package / "utils" / "cli_args.py").read_text()
    flags = set(re.findall(r'"(--[a-z][a-z-]*)', block))
    for name in re.findall(r"@cli_args\.([A-Z_]+)", block):
        option = re.search(rf"^{name} = click\.option\(\s*\"([^\"]+)\"", shared, re.M)
        flags.update(re.findall(r"--[a-z][a-z-]*", option.group(1)))
    assert {"--host", "--port", "--backend-store-uri", "--artifacts-destination"} <= flags, (
        "source layout changed"
    )
    assert 'envvar="MLFLOW_BACKEND_STORE_URI"' in block
    return flags


def _mlflow_server(container: dict) -> dict[str, str | bool]:
    """`mlflow server` options of the container's shell command, as {flag: value or True}."""
    shell = " ".join([*container.get("command", []), *container.get("args", [])])
    commands = [c[1:] if c[0] == "exec" else c for c in _commands([shell])]
    (server,) = [c for c in commands if len(c) > 1 and c[0].endswith("mlflow") and c[1] == "server"]
    options: dict[str, str | bool] = {}
    for token in server[2:]:
        if token.startswith("--"):
            flag, _, value = token.partition("=")
            options[flag] = value or True
        else:
            last = next(reversed(options))
            assert options[last] is True, f"stray argument {token!r}"
            options[last] = token
    return options


def test_mlflow_server_uses_postgres_and_s3(mlflow_docs):
    deployment = _one(mlflow_docs, "Deployment", "mlflow")
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    options = _mlflow_server(container)
    assert set(options) <= _mlflow_server_flags(), (
        f"unknown mlflow server flags {set(options) - _mlflow_server_flags()}"
    )
    assert options.get("--serve-artifacts") is True, "artifacts must be proxied: clients get no S3 rights"
    assert str(options["--artifacts-destination"]).startswith("s3://")
    assert f"mlflow=={MLFLOW_VERSION}" in " ".join(container["args"]), (
        "server and clients must run one MLflow"
    )

    # The backend URI comes from the environment, so the password is on no command line; Kubernetes expands
    # $(VAR) only from variables defined before it.
    assert "--backend-store-uri" not in options
    env = container["env"]
    names = [e["name"] for e in env]
    uri = env[names.index("MLFLOW_BACKEND_STORE_URI")]["value"]
    match = re.fullmatch(r"postgresql://(\w+):\$\((\w+)\)@([\w.-]+):(\d+)/(\w+)", uri)
    assert match, f"not a postgresql URI with a password reference: {uri}"
    user, password_var, host, port, database = match.groups()
    assert names.index(password_var) < names.index("MLFLOW_BACKEND_STORE_URI")
    secret = env[names.index(password_var)]["valueFrom"]["secretKeyRef"]

    postgres = _one(mlflow_docs, "StatefulSet")
    postgres_env = _env(postgres["spec"]["template"]["spec"]["containers"][0])
    assert postgres_env["POSTGRES_PASSWORD"]["valueFrom"]["secretKeyRef"] == secret
    assert postgres_env["POSTGRES_USER"]["value"] == user and postgres_env["POSTGRES_DB"]["value"] == database
    service = _one(mlflow_docs, "Service", host.split(".")[0])
    assert int(port) in [p["port"] for p in service["spec"]["ports"]]
    assert service["spec"]["selector"] == postgres["spec"]["selector"]["matchLabels"]

    account = _one(mlflow_docs, "ServiceAccount")
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    assert ROLE_ARN.fullmatch(account["metadata"]["annotations"][IRSA_ANNOTATION])


def _mlflow_allows(allowed: list[str], host: str) -> bool:
    # The rule of mlflow.server.security_utils.is_allowed_host_header (not imported: mlflow takes seconds).
    return "*" in allowed or any(fnmatch.fnmatch(host, a) if "*" in a else host == a for a in allowed)


def test_mlflow_accepts_the_host_names_clients_use(mlflow_docs, raycluster):
    """MLflow answers 403 to unknown Host headers (/health is exempt, so probes pass while every call fails)."""
    options = _mlflow_server(
        _one(mlflow_docs, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]
    )
    allowed = str(options["--allowed-hosts"]).split(",")
    tracking = urlsplit(
        _env(_ray_container(raycluster["spec"]["headGroupSpec"]))["MLFLOW_TRACKING_URI"]["value"]
    )
    service_port = _one(mlflow_docs, "Service", "mlflow")["spec"]["ports"][0]["port"]
    for host in (tracking.netloc, f"localhost:{service_port}"):  # Ray pods; kubectl port-forward
        assert _mlflow_allows(allowed, host), f"MLflow would reject Host {host}"
    assert not _mlflow_allows(allowed, "attacker.example:5000")


def test_nothing_is_exposed_outside_the_cluster():
    for path in YAML_FILES:
        for doc in _docs(path):
            assert doc.get("kind") != "Ingress", path.name
            if doc.get("kind") == "Service":
                assert doc["spec"].get("type", "ClusterIP") == "ClusterIP", (
                    f"{path.name}: {doc['metadata']['name']}"
                )


# --------------------------------------------------------------------------------------------------------
# No credentials

LEAKS = {
    "AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "AWS secret or session key": re.compile(
        r"(?i)aws_?(?:secret_?access_?key|session_?token)[\"']?\s*[:=]\s*[\"']?(?![$<\"'\s])\S"
    ),
    # A literal after password: / PASSWORD= ...; references ($VAR, $(VAR), <PLACEHOLDER>) are fine.
    "password": re.compile(r"(?i)(?:password|passwd|pwd)[\"']?\s*[:=][ \t]*[\"']?(?![$<\"'\s{])\S"),
    "credentials in a URL": re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s/:@]+:(?![$<])[^\s/@]+@"),
}


def _leaks(text: str) -> list[str]:
    return [name for name, pattern in LEAKS.items() if pattern.search(text)]


@pytest.mark.parametrize(
    "path",
    [*sorted(p for p in INFRA.rglob("*") if p.is_file()), DEPLOY_DOC],
    ids=lambda p: p.relative_to(ROOT).as_posix(),
)
def test_no_credentials_in_infra_or_the_deploy_doc(path):
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), start=1):
        assert not _leaks(line), (
            f"{path.relative_to(ROOT)}:{number}: looks like a credential ({_leaks(line)})"
        )


def test_no_secret_objects_and_no_literal_credential_variables():
    credential = re.compile(r"AWS_(ACCESS_KEY_ID|SECRET_ACCESS_KEY|SESSION_TOKEN)|.*(PASSWORD|SECRET|TOKEN)$")

    def walk(node, where):
        if isinstance(node, dict):
            if isinstance(node.get("name"), str) and credential.fullmatch(node["name"]):
                assert "value" not in node, f"{where}: {node['name']} has a literal value; use secretKeyRef"
            for value in node.values():
                walk(value, where)
        elif isinstance(node, list):
            for value in node:
                walk(value, where)

    for path in YAML_FILES:
        for doc in _docs(path):
            assert doc.get("kind") != "Secret", (
                f"{path.name}: Secrets are created with kubectl, never committed"
            )
            walk(doc, path.name)


@pytest.mark.parametrize(
    "pasted",
    [
        "AKIA" + "Q" * 16,
        "  aws_secret_access_key = " + "wJalrXUtnFEMI/K7MDENG" + "/bPxRfiCYzzzzzzzzzzz",
        "AWS_SECRET_ACCESS_KEY: abc123",
        "-----BEGIN OPENSSH " + "PRIVATE KEY-----",
        "      password: hunter2",
        "POSTGRES_PASSWORD=hunter2",
        'db_password: "hunter2"',
        "postgresql://mlflow:hunter2@mlflow-postgres:5432/mlflow",
    ],
)
def test_the_scan_catches_a_pasted_credential(pasted):
    assert _leaks(pasted)


@pytest.mark.parametrize(
    "reference",
    [
        "postgresql://mlflow:$(POSTGRES_PASSWORD)@mlflow-postgres:5432/mlflow",
        'kubectl create secret generic x --from-literal=password="$(openssl rand -hex 24)"',
        "secretKeyRef: {name: mlflow-postgres, key: password}",
        "- name: POSTGRES_PASSWORD",
        "http://127.0.0.1:8265",
    ],
)
def test_the_scan_passes_references(reference):
    assert not _leaks(reference)


# --------------------------------------------------------------------------------------------------------
# docs/deploy.md: every command, path and key it names exists


def _doc_commands() -> list[list[str]]:
    blocks = re.findall(r"```bash\n(.*?)```", DEPLOY_DOC.read_text(), re.S)
    lines = [line for block in blocks for line in block.replace("\\\n", " ").splitlines()]
    return _commands([line.split(" # ")[0] for line in lines])


def test_deploy_doc_paths_exist():
    text = DEPLOY_DOC.read_text()
    paths = set(re.findall(r"(?<![\w/.-])((?:infra|configs|jobs|docs|tests)/[\w./-]*\w)", text))
    assert paths
    for path in paths:
        assert (ROOT / path).exists(), f"docs/deploy.md names {path}, which does not exist"


def _is_field(cls: type, dotted: str) -> bool:
    for part in dotted.split("."):
        if not dataclasses.is_dataclass(cls):
            return False
        hints = typing.get_type_hints(cls)
        if part not in hints:
            return False
        cls = hints[part]
    return True


def test_deploy_doc_config_keys_exist():
    sections = "|".join(f.name for f in dataclasses.fields(PretrainConfig))
    keys = set(
        re.findall(
            rf"(?<![\w./(\[-])((?:{sections})\.[a-z_]+(?:\.[a-z_]+)*)(?![\w(/-])", DEPLOY_DOC.read_text()
        )
    )
    assert {"scaling.num_workers", "train.channels_last", "train.amp"} <= keys
    for key in keys:
        assert _is_field(PretrainConfig, key), f"docs/deploy.md names {key}, which is no PretrainConfig field"


def test_deploy_doc_job_commands_are_accepted(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    make_shards_flags = set(
        re.findall(r'add_argument\(\s*"(--[a-z-]+)"', (ROOT / "jobs/make_shards.py").read_text())
    )
    checked = set()
    for command in _doc_commands():
        jobs = [i for i, t in enumerate(command) if re.fullmatch(r"jobs/\w+\.py", t)]
        if not jobs:
            continue
        job, args = Path(command[jobs[0]]), command[jobs[0] + 1 :]
        assert (ROOT / job).is_file(), job
        if job.stem in JOB_CONFIGS:
            assert _run_job_cli(job, args, capsys) == 0, f"{shlex.join(command)}: {capsys.readouterr().err}"
        elif job.stem == "make_shards":
            flags = {a.split("=")[0] for a in args if a.startswith("--")}
            assert flags <= make_shards_flags, f"unknown make_shards flags {flags - make_shards_flags}"
        checked.add(job.stem)
    assert {"pretrain", "make_shards"} <= checked


def test_deploy_doc_ray_commands_are_accepted(ray_cli):
    checked = 0
    for command in _doc_commands():
        if command[0] != "ray":
            continue
        group, rest = ray_cli, command[1:]
        while hasattr(group, "commands"):
            assert rest and rest[0] in group.commands, f"no such ray command: {shlex.join(command)}"
            group, rest = group.commands[rest[0]], rest[1:]
        group.make_context(group.name, list(rest))  # unknown options raise
        checked += 1
    assert checked >= 4


# --------------------------------------------------------------------------------------------------------
# Every cluster command in README.md and docs/ runs as written against the shipped manifests

DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _doc_blocks(path: Path) -> list[list[list[str]]]:
    """Each bash block of a document as its simple commands (continuations joined, comments dropped)."""
    blocks = re.findall(r"```bash\n(.*?)```", path.read_text(), re.S)
    return [
        _commands([line.split(" # ")[0] for line in block.replace("\\\n", " ").splitlines()])
        for block in blocks
    ]


def _placeholders() -> set[str]:
    """The values a user substitutes, as docs/deploy.md's placeholder table lists them."""
    section = DEPLOY_DOC.read_text().split("## Placeholders", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([^`]+)` \|", section, re.M))


def _dashboard_port(aws: dict, raycluster: dict, rayjob: dict) -> int:
    """The port the job server is reached on: the same in every manifest (and Ray's default on EC2)."""
    from ray._private.ray_constants import DEFAULT_DASHBOARD_PORT

    head_commands = " ".join(aws["head_start_ray_commands"])
    assert "--dashboard-port" not in head_commands, "the EC2 head keeps Ray's default dashboard port"
    for manifest in (raycluster["spec"], rayjob["spec"]["rayClusterSpec"]):
        ports = manifest["headGroupSpec"]["template"]["spec"]["containers"][0]["ports"]
        assert {"containerPort": DEFAULT_DASHBOARD_PORT, "name": "dashboard"} in ports
    return DEFAULT_DASHBOARD_PORT


def _cluster_commands() -> list[tuple[str, list[str], bool]]:
    """(where, command, on KubeRay) for every `ray job submit` in the docs."""
    found = []
    for path in DOC_FILES:
        for block in _doc_blocks(path):
            kuberay = any(command[0] == "kubectl" for command in block)
            for command in block:
                if command[:3] == ["ray", "job", "submit"]:
                    found.append((path.relative_to(ROOT).as_posix(), command, kuberay))
    return found


def _flat(tree: typing.Any, prefix: str = "") -> dict[str, typing.Any]:
    if isinstance(tree, dict):
        return {k: v for key, value in tree.items() for k, v in _flat(value, f"{prefix}{key}.").items()}
    return {prefix.rstrip("."): tree}


def test_every_cluster_command_in_the_docs_runs_as_written(aws, raycluster, rayjob, capsys, monkeypatch):
    """Same address and port as the manifests, the job's own command line accepts it, every recipe field
    that holds a placeholder is set on the command line, data and checkpoints in S3 (nodes share no disk),
    a tracking store the driver reaches, and no placeholder beyond the documented ones."""
    from pipeline.config import to_dict
    from pipeline.search.driver import base_config

    monkeypatch.chdir(ROOT)
    port = _dashboard_port(aws, raycluster, rayjob)
    user_values = _placeholders()
    assert {"YOUR-BUCKET", "MLFLOW_HOST"} <= user_values
    commands = _cluster_commands()
    assert {where for where, _, _ in commands} >= {"README.md", "docs/deploy.md", "docs/pretrain.md"}
    for where, command, kuberay in commands:
        shown = f"{where}: {shlex.join(command)}"
        split = command.index("--")
        options, entry = command[3:split], command[split + 1 :]
        assert options[options.index("--address") + 1] == f"http://127.0.0.1:{port}", shown
        assert options[options.index("--working-dir") + 1] == ".", shown
        for token in command:
            assert "..." not in token and not re.search(r"<\w+>|\bHEAD\b", token), (
                f"placeholder left: {shown}"
            )
            for host in re.findall(r"(?:s3|https?)://([^/:]+)", token):
                assert host == host.lower() or host in user_values, f"unexplained host {host}: {shown}"
        env = {}
        if "--runtime-env-json" in options:
            env = json.loads(options[options.index("--runtime-env-json") + 1]).get("env_vars", {})

        assert entry[:1] == ["python"] and re.fullmatch(r"jobs/\w+\.py", entry[1]), shown
        job, args = Path(entry[1]), entry[2:]
        with monkeypatch.context() as patch:
            for name, value in env.items():
                patch.setenv(name, value)
            assert _run_job_cli(job, args, capsys) == 0, f"{shown}: {capsys.readouterr().err}"
        if job.stem == "predict":  # flags, no recipe: what it reads and writes is on the command line
            printed = yaml.safe_load(capsys.readouterr().out)
            assert printed["input"].startswith("s3://") and printed["output"].startswith("s3://"), shown
            assert printed["model"].startswith("models:/"), shown
            assert printed["tracking"]["uri"] or env.get("MLFLOW_TRACKING_URI") or kuberay, shown
            continue
        given = {a.split("=", 1)[0] for a in args if "=" in a and not a.startswith("-")}
        recipe = _typed(job, [a for a in args if a.startswith("--") or a.endswith(".yaml")])
        prefix = "pretrain." if job.stem == "tune" else ""
        shipped = _flat(to_dict(base_config(recipe) if job.stem == "tune" else recipe), prefix)
        holding = {k for k, v in shipped.items() if any(u in str(v) for u in user_values)}
        assert holding <= given, f"{shown}: recipe placeholders not overridden: {sorted(holding - given)}"

        typed = _typed(job, args)
        pretrain = base_config(typed) if job.stem == "tune" else typed
        assert pretrain.data.train_manifest.startswith("s3://"), shown
        assert pretrain.data.val_manifest.startswith("s3://"), shown
        storage_field = "search.storage_path" if job.stem == "tune" else f"{prefix}checkpoint.storage_path"
        section, _, name = storage_field.rpartition(".")
        stored = getattr(getattr(typed, section.split(".")[-1]), name)
        assert (stored or env.get("PIPELINE_STORAGE_ROOT", "")).startswith("s3://"), f"local storage: {shown}"
        tracked = pretrain.tracking.uri or env.get("MLFLOW_TRACKING_URI")
        assert tracked or kuberay, f"no tracking store (the job's temporary copy would hold it): {shown}"
