"""Provenance helpers every driver uses, whatever records them: the config tree as flat params, URIs without
credentials, the code's git revision and the package versions, and the tags that make a run reproducible.
Kept apart from the MLflow adapter: nothing here imports a tracking library."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import subprocess
import urllib.parse
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

TRACKED_PACKAGES = ("torch", "torchvision", "ray", "mlflow", "webdataset")
_REPO_DIR = Path(__file__).resolve().parents[1]


def flatten_params(params: Mapping[str, Any] | Any, prefix: str = "") -> dict[str, str]:
    """``{"optim": {"lr": 0.1}} -> {"optim.lr": "0.1"}``; dataclasses (the config tree) count as dicts."""
    if dataclasses.is_dataclass(params) and not isinstance(params, type):
        params = {field.name: getattr(params, field.name) for field in dataclasses.fields(params)}
    flat: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) or (dataclasses.is_dataclass(value) and not isinstance(value, type)):
            flat.update(flatten_params(value, prefix=f"{name}."))
        else:
            flat[name] = str(value)
    return flat


def redact_uri(uri: str) -> str:
    """``http://user:secret@host:5000/x -> http://host:5000/x``: credentials never go into logs or tags."""
    parts = urllib.parse.urlsplit(uri)
    if parts.username is None and parts.password is None:
        return uri
    host = parts.netloc.rpartition("@")[2]
    return urllib.parse.urlunsplit(parts._replace(netloc=host))


def git_revision(repo_dir: Path = _REPO_DIR) -> str:
    """``git rev-parse HEAD`` of ``repo_dir``; else ``$PIPELINE_GIT_REVISION`` (a ``ray job submit`` working
    dir is a copy without .git: the submitter passes the revision in the runtime env); else ``"unknown"``."""
    fallback = os.environ.get("PIPELINE_GIT_REVISION") or "unknown"
    try:
        result = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo_dir, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.TimeoutExpired):
        return fallback
    return result.stdout.strip() if result.returncode == 0 and result.stdout.strip() else fallback


def package_versions(packages: Sequence[str] = TRACKED_PACKAGES) -> dict[str, str]:
    versions = {}
    for package in packages:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def run_tags(manifest_url: str, *, manifest_digest: str, arch: str, params: int, macs: int) -> dict[str, str]:
    """The tags that make a run reproducible: code, environment, data and model identity."""
    tags = {
        "git.revision": git_revision(),
        "dataset.manifest_url": redact_uri(manifest_url),
        "dataset.manifest_digest": manifest_digest,
        "model.arch": arch,
        "model.params": str(params),
        "model.macs": str(macs),
        "model.flops": str(2 * macs),  # one multiply-add = 2 FLOPs (torchvision's "GFLOPS" are MACs)
    }
    tags.update({f"version.{package}": version for package, version in package_versions().items()})
    return tags
