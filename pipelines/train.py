"""Training job as a script: ``python -m pipelines.train ...`` is ``anomaly train ...`` (same flags)."""

import sys

from anomaly.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
