"""Evaluation job as a script: ``python -m pipelines.evaluate ...`` is ``anomaly evaluate ...``."""

import sys

from anomaly.cli import main

if __name__ == "__main__":
    sys.exit(main(["evaluate", *sys.argv[1:]]))
