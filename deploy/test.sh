#!/usr/bin/env bash
# The test command: `make test` runs this, and .ci/run runs `make test`.
set -euo pipefail
VENV=${VENV:-.venv}
export MLFLOW_DISABLE_TELEMETRY=true
export MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false
exec "$VENV/bin/python" -m pytest -q -rs "$@" tests
