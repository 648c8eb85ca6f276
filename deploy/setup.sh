#!/usr/bin/env bash
# Creates the virtual environment and installs everything. torch==2.13.0 goes first: any other torch
# requirement would pull several GB of CUDA packages (README "Quick start").
set -euo pipefail
VENV=${1:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
# Plain PyPI's Linux wheel of torch brings the CUDA packages; where pip finds no CPU build of its own,
# TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu takes it from PyTorch's CPU index.
"$VENV/bin/python" -m pip install -q ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "torch==2.13.0"
"$VENV/bin/python" -m pip install -q -e ".[test,broker]"
echo "setup: $("$VENV/bin/python" -c 'import torch, mlflow; print("torch", torch.__version__, "mlflow", mlflow.__version__)')"
