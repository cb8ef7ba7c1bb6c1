#!/usr/bin/env bash
# Stop what stack-up started (recorded PIDs only; never `ray stop`, which would kill every Ray on the machine).
set -euo pipefail
cd "$(dirname "$0")/../.."
exec .venv/bin/python -m pipeline.stack down "$@"
