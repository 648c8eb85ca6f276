#!/usr/bin/env bash
# The test command: `make test` runs this, and .ci/run runs `make test`. It prints the 25 slowest tests at the end,
# so a slow CI run says where its time went.
set -euo pipefail
VENV=${VENV:-.venv}
export MLFLOW_DISABLE_TELEMETRY=true
export MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false
exec "$VENV/bin/python" -m pytest -q -rs --durations=25 "$@" tests
