#!/usr/bin/env bash
# Start (or check) the local stack: Ray head, MLflow server, S3 endpoint, all on 127.0.0.1.
# Ports and the state directory: STACK_STATE_DIR, STACK_S3_PORT, STACK_MLFLOW_PORT, STACK_RAY_PORT,
# STACK_DASHBOARD_PORT (defaults 9055, 5055, 6390, 8265) or the flags of `python -m pipeline.stack --help`.
set -euo pipefail
cd "$(dirname "$0")/../.."
exec .venv/bin/python -m pipeline.stack up "$@"
