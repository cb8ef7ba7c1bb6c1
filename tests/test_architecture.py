"""The import rules the architecture rests on, checked on the source (AST, no imports executed):
one adapter module per framework, no production module on the local-stack tooling, and no import cycle
between the package's modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PRODUCTION = sorted(p for p in (REPO / "pipeline").rglob("*.py"))
JOBS = sorted((REPO / "jobs").glob("*.py"))

# framework -> the only modules allowed to import it
ADAPTERS = {
    "mlflow": ("pipeline/tracking/",),
    "ray": (
        "pipeline/launch.py",
        "pipeline/launch_callbacks.py",
        "pipeline/search/tuner.py",
        "pipeline/batch_inference.py",
        "pipeline/data/ray_ingest.py",
    ),
    "boto3": ("pipeline/data/s3.py", "pipeline/data/storage.py", "pipeline/stack.py"),
}
# The local stack (moto, an MLflow server, a Ray head on this machine) is tooling for `make demo`.
STACK_USERS = ("pipeline/demo.py", "pipeline/stack.py")


def _imports(path: Path, *, top_level_only: bool = False) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    names = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def _relative(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


@pytest.mark.parametrize("framework", sorted(ADAPTERS))
def test_each_framework_is_imported_by_its_adapter_only(framework):
    offenders = [
        _relative(path)
        for path in PRODUCTION + JOBS
        if not _relative(path).startswith(ADAPTERS[framework])
        and any(name == framework or name.startswith(f"{framework}.") for name in _imports(path))
    ]
    assert not offenders, f"{framework} imported outside {ADAPTERS[framework]}: {offenders}"


def test_no_production_module_imports_the_local_stack():
    offenders = [
        _relative(path)
        for path in PRODUCTION
        if _relative(path) not in STACK_USERS
        and any(name == "pipeline.stack" or name.startswith("pipeline.stack.") for name in _imports(path))
    ]
    assert not offenders, offenders


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_module_level_imports_have_no_cycle():
    """Deferred imports inside functions are allowed (they keep Ray and MLflow out of the jobs' start-up);
    what every importer pays - the module-level graph - must be acyclic."""
    modules = {_module_name(path): path for path in PRODUCTION}
    graph = {
        name: {
            target for target in _imports(path, top_level_only=True) if target in modules and target != name
        }
        for name, path in modules.items()
    }
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycle = trail[trail.index(nxt) :] + [nxt] if nxt in trail else [node, nxt]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt, [*trail, nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_the_checks_see_a_violation(tmp_path):
    """The AST scan finds an import nested in a function, the form the adapters' users rely on."""
    probe = tmp_path / "probe.py"
    probe.write_text("def f():\n    from mlflow import MlflowClient\n    import ray.train\n")
    assert {"mlflow", "mlflow.MlflowClient", "ray.train"} <= _imports(probe)
    assert _imports(probe, top_level_only=True) == set()
