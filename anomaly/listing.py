"""Names in a log line or an error: the first few, and how many more. No I/O."""

from __future__ import annotations

from collections.abc import Sequence


def some(names: Sequence[str], shown: int = 10, *, quoted: bool = False) -> str:
    """The first ``shown`` of ``names``, comma-separated (``quoted``: each as ``repr`` shows it, so that an
    entity id with spaces or commas stays one), and how many more."""
    head = [repr(name) if quoted else name for name in names[:shown]]
    return ", ".join(head) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def added_removed(added: Sequence[str], removed: Sequence[str]) -> str:
    """``+rpm -flow``: sensors added, then those removed ('' for none)."""
    return " ".join([*(f"+{s}" for s in added), *(f"-{s}" for s in removed)])
