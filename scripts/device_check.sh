#!/usr/bin/env bash
# The one prepared GPU check (see scripts/device_check.py): run it once when a device is lent,
# commit results/gpu/. `--cpu-smoke` runs it on tiny shapes on the CPU (the test suite does).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PY:-.venv/bin/python}"
exec "$PY" scripts/device_check.py "$@"
