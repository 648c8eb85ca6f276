"""Retraining job as a script: ``python -m pipelines.retrain ...`` is ``anomaly retrain ...`` (same flags):
one cycle of collect → exclude anomalies → train a challenger → compare with the champion → promote or keep."""

import sys

from anomaly.cli import main

if __name__ == "__main__":
    sys.exit(main(["retrain", *sys.argv[1:]]))
