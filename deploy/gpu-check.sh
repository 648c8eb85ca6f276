#!/usr/bin/env bash
# The GPU checks as one short, prepared script, for a session lent a GPU machine (README "Training and
# scoring speed"). Two steps:
#
#   bash deploy/gpu-check.sh prepare    # here: copy the data the checks read into .gpu-data/ (ignored)
#   bash deploy/gpu-check.sh run        # there, from the repository root, carrying .gpu-data
#
# `run` uses the machine's own python3 with its CUDA torch (the project's package is read from the
# checkout, not installed; nothing it runs needs MLflow or Kafka): the CUDA tests (tests/unit/test_gpu.py:
# bf16 training, CPU-equal scores, a detector saved on CUDA loading on CPU), then the training and
# scoring benchmark on CPU and CUDA side by side (python -m pipelines.bench_train, the README's table),
# its JSON and log under $OUT (or results/ when $OUT is unset). `--quick` shortens the benchmark.
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=.gpu-data

case "${1:-}" in
prepare)
  src="${ANOMALY_DATASETS:-../shared/datasets}"
  rm -rf "$DATA" && mkdir -p "$DATA/smd"
  cp -r "$src/skab" "$DATA/skab"
  for part in train test test_label; do  # bench_train reads machine-1-2 alone: the whole of SMD is too big to carry
    mkdir -p "$DATA/smd/$part" && cp "$src/smd/$part/machine-1-2.txt" "$DATA/smd/$part/"
  done
  grep -qxF "/$DATA/" .git/info/exclude 2>/dev/null || echo "/$DATA/" >> .git/info/exclude
  du -sh "$DATA"
  ;;
run)
  [ -d "$DATA/skab" ] || { echo "gpu-check: no $DATA here: run 'bash deploy/gpu-check.sh prepare' and carry $DATA" >&2; exit 2; }
  out="${OUT:-results}"
  mkdir -p "$out"
  PY="${PYTHON:-python3}"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 ANOMALY_DATASETS="$PWD/$DATA"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(),
torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')" | tee "$out/gpu-check.log"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null | tee -a "$out/gpu-check.log" || true
  # the unit conftest needs nothing but the package; -p no:cacheprovider: the tree may be read-only
  tests=0  # a failing CUDA test must not cost the benchmark: its status is the script's, at the end
  "$PY" -m pytest -q -rs -p no:cacheprovider tests/unit/test_gpu.py 2>&1 | tee -a "$out/gpu-check.log" || tests=$?
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    # a CPU-only run here would be rendered over this machine's own CPU figures in the README
    echo "gpu-check: torch sees no CUDA device here: no GPU figures to take" | tee -a "$out/gpu-check.log" >&2
    exit 3
  fi
  # What runs the LSTMs under bf16 autocast: torch's autocast wrapper for cuDNN's RNN has cast to
  # float16 whatever dtype was asked (anomaly.scoring.network_input clamps for that); record which.
  "$PY" -c "import torch
lstm = torch.nn.LSTM(8, 32, batch_first=True).cuda()
with torch.autocast('cuda', dtype=torch.bfloat16):
    out, _ = lstm(torch.randn(4, 10, 8, device='cuda'))
print('LSTM output dtype under bf16 autocast on CUDA:', out.dtype)" 2>&1 | tee -a "$out/gpu-check.log"
  "$PY" -m pipelines.bench_train --devices cpu,cuda --data-dir "$DATA" --json "$out/bench_train_gpu.json" \
      "${@:2}" 2>&1 | tee -a "$out/gpu-check.log"
  [ "$tests" -eq 0 ] || { echo "gpu-check: the CUDA tests failed (exit $tests)" >&2; exit "$tests"; }
  ;;
*)
  echo "usage: bash deploy/gpu-check.sh prepare|run [bench_train options, e.g. --quick]" >&2
  exit 2
  ;;
esac
