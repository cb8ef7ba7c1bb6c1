"""Run by tests/test_stack.py, as a local process and as a ``ray job submit`` entrypoint: join or start Ray the
way the jobs do (``pipeline.launch.ensure_ray``) and ask Ray's state API from inside a worker, with no address,
as Ray Train's placement-group cleaner does. Prints ``probe: ok`` when the worker saw this job's own cluster.

``--hold FILE``: keep this Ray instance up until FILE exists (a second instance on the machine for the other
probe).
"""

import argparse
import sys
import time
from pathlib import Path

import ray

from pipeline.config import ScalingConfig
from pipeline.launch import ensure_ray


@ray.remote(num_cpus=0)
def _nodes_seen_by_a_worker() -> list[str]:
    from ray.util.state import list_nodes

    return sorted(node.node_id for node in list_nodes())


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hold", type=Path)
    args = parser.parse_args()
    ensure_ray(ScalingConfig(num_workers=1))
    own = sorted(node["NodeID"] for node in ray.nodes())
    try:
        seen = ray.get(_nodes_seen_by_a_worker.remote())
    except Exception as error:  # noqa: BLE001 (the probe reports whatever the state API raised)
        print(f"probe: failed: {type(error).__name__}: {error}", flush=True)
        return 1
    print("probe: ok" if seen == own else f"probe: another cluster: {seen} != {own}", flush=True)
    while args.hold and not args.hold.exists():
        time.sleep(0.5)
    return 0 if seen == own else 1


if __name__ == "__main__":
    sys.exit(main())
