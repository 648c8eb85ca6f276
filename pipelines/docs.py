"""Regenerates the generated parts of README.md: the configuration reference (from the typed
settings in ``anomaly/config.py``), so it cannot drift from the code.

    python -m pipelines.docs          # rewrite README.md in place
    python -m pipelines.docs --check  # exit 1 if README.md is stale
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from anomaly.config import reference_markdown

START, END = "<!-- config-reference:start -->", "<!-- config-reference:end -->"


def render(readme: str) -> str:
    head, _, rest = readme.partition(START)
    _, _, tail = rest.partition(END)
    return f"{head}{START}\n{reference_markdown()}\n{END}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.docs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="only check; exit 1 when README.md is stale")
    parser.add_argument("--readme", default="README.md")
    args = parser.parse_args(argv)
    path = Path(args.readme)
    current = path.read_text(encoding="utf-8")
    wanted = render(current)
    if args.check:
        if current != wanted:
            print(f"{path} is stale: run python -m pipelines.docs", file=sys.stderr)
            return 1
        return 0
    path.write_text(wanted, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
