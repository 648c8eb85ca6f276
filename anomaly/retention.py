"""Which registered versions a registry keeps: the retrain's refused challengers pile up, one a cycle.

A scheduled retrain registers a challenger every cycle (daily by default), and the gate refuses most
of them: after a year, the model's page in the registry lists hundreds of versions nobody will serve,
each with its files (about 1.5 MB). ``plan`` says which of them go. Only a version a retrain made (tag
``retrain=true``) that no alias, pin or rollback needs goes; in this order, a version is kept when it

1. holds an alias (``@champion``, ``@challenger``, any a person set);
2. is pinned: its tag ``keep`` is true (set in the MLflow UI, or with ``mlflow``'s client);
3. was not made by a retrain (``anomaly train``: a person's, deleted by a person);
4. served: it held an alias other than the challenger's (its ``<alias>_since`` or ``<alias>_until`` tag:
   ``@champion``, or another alias workers follow, ``worker.model_alias``), or such an alias's history
   names it (on its rollback stack, the ``<alias>_history`` tag, or as the from or to of a move in its
   ``<alias>_log``: a move made in the MLflow UI stamps no version, but the next move by this tool logs
   the holder it moved from). Events name the version that raised them, and ``models rollback`` goes
   back to it. The challenger alias moves to every new challenger, so having held it is no reason,
   unless workers follow it (a canary fleet: ``challenger_alias`` None);
5. is among the newest ``keep`` of the versions left after 1-4 (the latest refused challengers, for a
   data scientist to look at);

and every other one is deleted. Pure: the registry's I/O is ``registry.prune``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

PIN_TAG = "keep"  # a version tag: true pins it
MADE_BY_RETRAIN_TAG = "retrain"  # set to "true" on every challenger a retrain registers
TRUE = frozenset({"true", "1", "yes", "on"})
HELD_TAGS = ("_since", "_until")  # version tags this tool stamps on an alias's holders (registry._stamp_holders)


@dataclass(frozen=True)
class Version:
    """What ``plan`` reads of a registered version."""

    version: str
    aliases: tuple[str, ...] = ()
    tags: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Plan:
    """``delete``: the versions to delete, oldest first; ``kept``: every other version and why."""

    delete: tuple[str, ...]
    kept: Mapping[str, str]

    def kept_counts(self) -> dict[str, int]:
        """How many versions are kept for each reason (``newest 20`` and the like), most first."""
        counts: dict[str, int] = {}
        for why in self.kept.values():
            reason = why.split(":")[0]
            counts[reason] = counts.get(reason, 0) + 1
        return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    def kept_text(self) -> str:
        """``20 newest 20, 3 holds an alias``: the counts of ``kept_counts`` as one line ('none': none kept)."""
        return ", ".join(f"{n} {why}" for why, n in self.kept_counts().items()) or "none"


def pinned(tags: Mapping[str, str]) -> bool:
    """Whether the version's ``keep`` tag is true (any case; ``false`` or anything else is not a pin)."""
    return str(tags.get(PIN_TAG, "")).strip().lower() in TRUE


def _serving(alias: str, challenger_alias: str | None) -> bool:
    return challenger_alias is None or alias != challenger_alias


def protected(v: Version, challenger_alias: str | None = "challenger", served: Iterable[str] = ()) -> str | None:
    """Why ``v`` is kept whatever its age (rules 1-4 of the module docstring), or None. ``served``: the
    versions the model's alias histories name (``served_versions``)."""
    if v.aliases:
        return "holds an alias: " + ", ".join(f"@{a}" for a in v.aliases)
    if pinned(v.tags):
        return f"pinned: tag {PIN_TAG}={v.tags[PIN_TAG]}"
    if str(v.tags.get(MADE_BY_RETRAIN_TAG, "")).lower() != "true":
        return "not made by a retrain"
    held = sorted({key[:-len(end)] for key in v.tags for end in HELD_TAGS
                   if key.endswith(end) and len(key) > len(end) and _serving(key[:-len(end)], challenger_alias)})
    if held:
        return "served: held " + ", ".join(f"@{a}" for a in held)
    if v.version in set(served):
        return "served: named in an alias's history"
    return None


def plan(versions: Sequence[Version], keep: int, challenger_alias: str | None = "challenger",
         served: Iterable[str] = ()) -> Plan:
    """Which of ``versions`` (of one registered model, in any order) to delete, keeping the newest ``keep``
    of those no rule protects. ``served``: the versions the model's alias histories name."""
    if keep < 0:
        raise ValueError(f"keep must be >= 0, got {keep}")
    named = {str(v) for v in served}
    kept: dict[str, str] = {}
    candidates: list[str] = []
    for v in sorted(versions, key=lambda v: -_number(v.version)):  # newest first
        why = protected(v, challenger_alias, named)
        if why is not None:
            kept[v.version] = why
        elif len(candidates) < keep:
            kept[v.version] = f"newest {keep}: not promoted, among the latest"
            candidates.append(v.version)
        else:
            candidates.append(v.version)
    delete = tuple(sorted((c for c in candidates if c not in kept), key=_number))
    return Plan(delete, kept)


def served_versions(model_tags: Mapping[str, str], challenger_alias: str | None = "challenger") -> set[str]:
    """The versions the registered model's alias histories name, the challenger alias's aside (None: none
    aside): every ``<alias>_history`` tag (a JSON list of versions, the rollback stack) and the ``from``
    and ``to`` of every move in every ``<alias>_log`` tag (a JSON list of moves). A tag that is not what it
    should be names none."""
    out: set[str] = set()
    for key, value in model_tags.items():
        for end in ("_history", "_log"):
            if not key.endswith(end) or not _serving(key[:-len(end)], challenger_alias):
                continue
            try:
                items = json.loads(value)
            except (TypeError, ValueError):
                continue
            if not isinstance(items, list):
                continue
            for item in items:
                if end == "_history":
                    out.add(str(item))
                elif isinstance(item, dict):
                    out.update(str(item[k]) for k in ("from", "to") if item.get(k) is not None)
    return out


def _number(version: str) -> int:
    return int(version)  # a registry's versions are numbers
