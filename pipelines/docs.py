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
    """``readme`` with the reference between its markers renewed; ValueError when they are not there in
    order (without the end marker everything after the start was cut off the README, and without both
    a second reference was appended to it)."""
    if readme.count(START) != 1 or readme.count(END) != 1 or readme.index(END) < readme.index(START):
        raise ValueError(f"the README needs {START} and, after it, {END}, once each")
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
    try:
        wanted = render(current)
    except ValueError as exc:
        print(f"{path}: {exc}; nothing written", file=sys.stderr)
        return 2
    if args.check:
        if current != wanted:
            print(f"{path} is stale: run python -m pipelines.docs", file=sys.stderr)
            return 1
        return 0
    path.write_text(wanted, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
