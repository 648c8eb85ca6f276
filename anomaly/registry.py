"""MLflow model registry adapter: register a detector, list versions, promote, roll back, load.

A registered version is a models-from-code pyfunc (``anomaly/mlflow_model.py``) whose one artifact is
the detector directory (state_dict + JSON). Promotion moves an alias (``champion`` by default) and
records the previous holder in the registered model's ``champion_history`` tag, so a rollback knows
where to go back to; every move (rollbacks too) is also appended to its ``champion_log`` tag and stamped
on the versions (``champion_since`` / ``champion_reason`` on the new holder, ``champion_until`` on the
one before), so the registry's UI tells who held it when. With ``tracking.py`` the only importers of mlflow.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd

from anomaly import retention, tracking
from anomaly.detector import Detector
from anomaly.config import alias_problem
from anomaly.errors import AnomalyError, RegistryError
from anomaly.listing import some
from anomaly.locks import FileLock, Locked

log = logging.getLogger(__name__)

PYFUNC_CODE = Path(__file__).with_name("mlflow_model.py")
HISTORY_TAG = "{alias}_history"  # registered-model tag: JSON list of versions that held the alias (rollback's stack)
LOG_TAG = "{alias}_log"  # registered-model tag: JSON list of the alias's latest moves, each {at, from, to, reason}
LOG_ENTRIES = 20  # moves kept in the log tag (and fewer where they would not fit a tag value)
TAG_VALUE_CHARS = tracking.TAG_CHARS  # what every MLflow store takes in a tag value (one figure for runs and versions)
MODEL_DESCRIPTION = (
    "Anomaly detector for one asset type: an LSTM autoencoder over windows of sensor readings; a window "
    "whose reconstruction error is above its threshold is anomalous. Versions are trained by `anomaly train` "
    "and by the retrain job (tagged retrain.*). @champion is the version the workers serve and @challenger "
    "the latest candidate; the champion_log tag lists every move of @champion (when, from, to, why), and "
    "each version's champion_since / champion_until / champion_reason tags say when it held it.")


@dataclass(frozen=True)
class VersionInfo:
    name: str
    version: str
    aliases: tuple[str, ...]
    run_id: str | None
    created: str
    tags: dict[str, str]
    metrics: dict[str, float]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "aliases": list(self.aliases), "run_id": self.run_id,
                "created": self.created, "tags": self.tags, "metrics": self.metrics}


def client():
    from mlflow import MlflowClient

    return MlflowClient()


def log_detector(detector: Detector, input_example: pd.DataFrame, artifact_name: str = "model") -> str:
    """Log the detector as a pyfunc model in the active run; returns the logged model's URI."""
    import mlflow
    from mlflow.models import infer_signature

    from anomaly.mlflow_model import ENTITY_COLUMN, DetectorModel

    with tempfile.TemporaryDirectory() as tmp:
        det_dir = detector.save(Path(tmp) / "detector")
        wrapper = DetectorModel()
        wrapper.detector = detector
        output = wrapper.predict(None, input_example)
        signature = infer_signature(input_example, output)
        if ENTITY_COLUMN not in detector.sensors:  # optional: a fleet's rows, each entity held to its own threshold
            from mlflow.models import ModelSignature
            from mlflow.types.schema import AnyType, ColSpec, Schema

            # any type: ids may be text or numbers (predict reads each as str), as in the worker's keys
            signature = ModelSignature(Schema([*signature.inputs.inputs, ColSpec(AnyType(), ENTITY_COLUMN, required=False)]),
                                       signature.outputs)
        info = mlflow.pyfunc.log_model(name=artifact_name, python_model=str(PYFUNC_CODE),
                                       artifacts={"detector": str(det_dir)}, signature=signature,
                                       input_example=input_example, pip_requirements=_requirements(),
                                       # the package travels with the model: a server built from the model's
                                       # own environment (mlflow models serve, build-docker) can import it
                                       code_paths=[str(Path(__file__).resolve().parent)])
    return info.model_uri


def _requirements() -> list[str]:
    """Pinned from the running environment; saves MLflow's requirement inference, which loads the
    model in a subprocess (seconds per logged model)."""
    from importlib.metadata import version

    return [f"{pkg}=={version(pkg).split('+')[0]}" for pkg in ("torch", "mlflow", "numpy", "pandas")]


def register(model_uri: str, name: str, tags: Mapping[str, Any] | None = None,
             description: str | None = None) -> str:
    """Register a logged model as a new version of ``name``; returns the version number."""
    import mlflow

    try:
        mv = mlflow.register_model(model_uri, name, tags={k: str(v) for k, v in (tags or {}).items()})
        if description:
            client().update_model_version(name, mv.version, description=description)
        if not client().get_registered_model(name).description:  # the model's page in the UI says what it is
            client().update_registered_model(name, description=MODEL_DESCRIPTION)
        return str(mv.version)
    except Exception as exc:
        raise RegistryError(f"cannot register {model_uri} as {name!r}: {exc}") from exc




def version_number(text: Any) -> str | None:
    """``text`` as a registry version number (``"7"``, ``"07"``, ``"v7"`` -> ``"7"``), or None when it names
    none (an alias). "07" was recorded as another version than "7" in the alias's history and log."""
    match = re.fullmatch(r"\s*[vV]?([0-9]+)\s*", str(text))
    return str(int(match.group(1))) if match else None


def check_alias(alias: str) -> str:
    """``alias`` if the registry takes it as an alias, else ``RegistryError`` saying why (checked before
    a training run, so a bad ``--alias`` does not fail after the work is done); rules in
    ``config.alias_problem``."""
    problem = alias_problem(alias)
    if problem:
        raise RegistryError(problem)
    return alias


def alias_version(name: str, alias: str) -> str | None:
    """The version that holds ``alias``; None when the model or the alias does not exist. A registry
    that cannot be reached (or a tracking URI it cannot use) is a ``RegistryError``, not "no version"."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client().get_model_version_by_alias(name, alias).version)
    except MlflowException as exc:
        if _not_found(exc):
            return None
        raise RegistryError(f"cannot read {name}@{alias} from the model registry: {exc}") from exc
    except Exception as exc:
        raise RegistryError(f"cannot read {name}@{alias} from the model registry: {exc}") from exc


def _model_exists(name: str) -> bool:
    """Whether the registry holds a model called ``name`` (any failure to tell counts as yes: the caller's
    own message then stands)."""
    from mlflow.exceptions import MlflowException

    try:
        client().get_registered_model(name)
        return True
    except MlflowException as exc:
        return not _not_found(exc)
    except Exception:
        return True


def _not_found(exc: Exception) -> bool:
    """Whether an MLflow error says a model or alias does not exist (the stores report a missing alias as
    INVALID_PARAMETER_VALUE "... not found", which is also the code of an unusable URI)."""
    code = getattr(exc, "error_code", "")
    return code == "RESOURCE_DOES_NOT_EXIST" or (code == "INVALID_PARAMETER_VALUE" and "not found" in str(exc))


ALIAS_LOCK_WAIT_S = 30.0  # longest wait for another process's move of the same alias


@contextlib.contextmanager
def alias_lock(name: str, alias: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` for moves of ``name@alias`` in this registry (a file in ``mlflow.lock_dir``,
    by default the temp folder, keyed by registry URI, relative paths resolved, model and alias) while
    reading the alias and moving it. MLflow has no compare-and-set for aliases: without it, a promotion by
    hand landing between the retrain gate's check and its move was overridden, and dropped from the
    rollback stack. It serialises the processes that share that folder (a scheduler, ``anomaly models``,
    ``anomaly up``; containers through a shared volume); moves from two hosts in the same instant can
    still interleave."""
    key = json.dumps([tracking.registry_uri(), name, alias])
    path = tracking.lock_dir() / f"anomaly-alias-{hashlib.sha256(key.encode()).hexdigest()[:16]}.lock"
    lock = FileLock(path, what=f"move of {name}@{alias}", field="mlflow.lock_dir", mode=0o666)
    try:
        lock.acquire(wait_s=ALIAS_LOCK_WAIT_S)
    except Locked as exc:
        raise RegistryError(f"another process (pid {exc.pid if exc.pid is not None else '?'}) has been moving "
                            f"{name}@{alias} for {ALIAS_LOCK_WAIT_S:g} s (lock {path}); not moved") from None
    except AnomalyError as exc:
        raise RegistryError(str(exc)) from None  # the lock file cannot be made
    try:
        yield
    finally:
        lock.release()


class AliasMoved(RegistryError):
    """``promote(expected_previous=...)`` found the alias on another version: someone moved it meanwhile."""


_ANY = object()


def promote(name: str, version: str, alias: str = "champion", reason: str = "",
            expected_previous: Any = _ANY) -> str | None:
    """Move ``alias`` to ``version``; returns the version that held it before (None if none).

    ``expected_previous``: the version the caller believes holds the alias (None: no version); if another
    one holds it now, ``AliasMoved`` and nothing changes (the retrain gate: a promotion by hand while it
    compared is not overridden)."""
    check_alias(alias)
    version = version_number(version) or str(version)
    try:
        c = client()
        # the number as MLflow reads it ("+2" is v2 to its int()): the history and log hold that, else a
        # "+2" in the log read as a move made in the UI and every rollback "returned" to v2
        version = str(c.get_model_version(name, version).version)
    except Exception as exc:
        if getattr(exc, "error_code", None) == "RESOURCE_DOES_NOT_EXIST":
            raise RegistryError(f"{name} has no version {version}: {exc}") from exc
        # not an answer about the version: a store that cannot be read, a URL that is no MLflow server
        raise RegistryError(f"cannot read {name} v{version} from the registry at {tracking.registry_uri()}: "
                            f"{str(exc)[:300]}") from exc
    with alias_lock(name, alias):  # the check and the move as one, for the processes sharing mlflow.lock_dir
        return _promote(c, name, str(version), alias, reason, expected_previous)


def _promote(c: Any, name: str, version: str, alias: str, reason: str, expected_previous: Any) -> str | None:
    previous = alias_version(name, alias)
    if expected_previous is not _ANY and previous != (None if expected_previous is None else str(expected_previous)):
        raise AliasMoved(f"{name}@{alias} is on v{previous} now, not v{expected_previous}: not moving it to v{version}")
    if previous == str(version):
        return previous
    # The rollback stack first: if the move then fails, its top is the version still holding the alias,
    # which rollback skips; the other way round, a failed write would leave the alias moved and the
    # stack without the version a rollback should return to.
    try:
        history = _history(name, alias, previous)
        if previous is not None:
            history.append(previous)
            c.set_registered_model_tag(name, HISTORY_TAG.format(alias=alias), json.dumps(history[-50:]))
    except Exception as exc:
        raise RegistryError(f"cannot record v{previous} in {name}@{alias}'s promotion history; "
                            f"@{alias} not moved: {exc}") from exc
    try:
        c.set_registered_model_alias(name, alias, str(version))
    except Exception as exc:  # e.g. an alias MLflow refuses ("latest", "v2", spaces)
        raise RegistryError(f"cannot set {name}@{alias} -> v{version}: {exc}") from exc
    _record_move_or_warn(name, alias, previous, str(version), reason or "promoted")
    log.info("%s: alias @%s moved %s -> v%s %s", name, alias, f"v{previous}" if previous else "(none)", version, reason)
    return previous


def _record_move_or_warn(name: str, alias: str, previous: str | None, version: str, reason: str) -> None:
    """``_record_move`` after the alias has moved: a failure to write the log is a warning, not an error
    (the move, which workers follow, happened; saying it failed would be wrong)."""
    try:
        _record_move(name, alias, previous, version, reason)
    except Exception as exc:
        log.warning("%s: @%s moved to v%s, but its log and version tags could not be written: %s",
                    name, alias, version, exc)


def _record_move(name: str, alias: str, previous: str | None, version: str, reason: str) -> None:
    """What the registry's UI shows of a move of ``alias``: the new holder's ``<alias>_since`` and
    ``<alias>_reason`` (its ``<alias>_until`` from an earlier spell removed), the previous holder's
    ``<alias>_until``, and one more entry in the model's ``<alias>_log`` (the latest ``LOG_ENTRIES``)."""
    c = client()
    # The log first: ``_history`` reads its last holder to notice moves made in the MLflow UI, so a log
    # left behind by a failed tag write read this move as one (a second rollback went back to the
    # version rolled from).
    _log_move(c, name, alias, previous, version, reason)
    _stamp_holders(c, name, alias, previous, version, reason)


def _utc_now() -> str:
    """Now, as the alias's log and version tags write it (RFC 3339, UTC, whole seconds)."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def _log_move(c: Any, name: str, alias: str, previous: str | None, version: str | None, reason: str) -> str | None:
    """Add a move of ``alias`` (to ``version``; None: removed) to the model's ``<alias>_log``, the latest
    ``LOG_ENTRIES`` that fit in a tag (the oldest dropped whole: a cut one is not JSON, and the next
    move started the log over); returns the log's text before (None: there was none)."""
    return _append_log(c, name, LOG_TAG.format(alias=alias),
                       {"at": _utc_now(), "from": previous, "to": version, "reason": reason[:200]})


def _append_log(c: Any, name: str, key: str, entry: Mapping[str, Any]) -> str | None:
    """Add ``entry`` to the model's tag ``key``, a JSON list of the latest ``LOG_ENTRIES`` that fit in a
    tag (the oldest dropped whole: a cut one is not JSON); returns the tag's text before (None: none)."""
    before = (c.get_registered_model(name).tags or {}).get(key)
    try:
        entries = list(json.loads(before or "[]"))
    except (json.JSONDecodeError, TypeError):
        entries = []
    entries = (entries + [dict(entry)])[-LOG_ENTRIES:]
    text = json.dumps(entries)
    while len(text) > TAG_VALUE_CHARS and len(entries) > 1:
        entries = entries[1:]
        text = json.dumps(entries)
    c.set_registered_model_tag(name, key, text)
    return before


def _stamp_holders(c: Any, name: str, alias: str, previous: str | None, version: str, reason: str) -> None:
    """The version tags of a move: the new holder's ``<alias>_since``/``_reason`` (an earlier spell's
    ``_until`` removed), the previous holder's ``<alias>_until``."""
    now = _utc_now()
    if previous is not None and previous != version:
        c.set_model_version_tag(name, previous, f"{alias}_until", now)
    c.set_model_version_tag(name, version, f"{alias}_since", now)
    c.set_model_version_tag(name, version, f"{alias}_reason", reason[:TAG_VALUE_CHARS])
    if f"{alias}_until" in (c.get_model_version(name, version).tags or {}):
        c.delete_model_version_tag(name, version, f"{alias}_until")


def remove_alias(name: str, alias: str, reason: str = "") -> str:
    """Take ``alias`` off the version holding it (a mistyped alias, one no longer used); returns that
    version. Logged as a move to none (``<alias>_log``, the version's ``<alias>_until``); its rollback
    stack goes with it. No version holds it: a ``RegistryError``."""
    check_alias(alias)
    with alias_lock(name, alias):
        previous = alias_version(name, alias)
        if previous is None:
            raise RegistryError(f"{name} has no alias @{alias}: nothing to remove")
        c = client()
        try:
            c.delete_registered_model_alias(name, alias)
        except Exception as exc:
            raise RegistryError(f"cannot remove {name}@{alias}: {exc}") from exc
        try:
            tags = c.get_registered_model(name).tags
            if HISTORY_TAG.format(alias=alias) in tags:
                c.delete_registered_model_tag(name, HISTORY_TAG.format(alias=alias))
            _log_move(c, name, alias, previous, None, reason or "alias removed")
            c.set_model_version_tag(name, previous, f"{alias}_until", _utc_now())
        except Exception as exc:
            log.warning("%s: @%s removed from v%s, but its log and version tags could not be written: %s",
                        name, alias, previous, exc)
    log.info("%s: alias @%s removed from v%s %s", name, alias, previous, reason)
    return previous


def tag_version(name: str, version: str, tags: Mapping[str, Any]) -> None:
    """Set ``tags`` on ``name`` version ``version`` (values as text, cut to what every store takes)."""
    try:
        c = client()
        for key, value in tags.items():
            c.set_model_version_tag(name, version, key, str(value)[:TAG_VALUE_CHARS])
    except Exception as exc:
        raise RegistryError(f"cannot tag {name} v{version}: {exc}") from exc


def rollback(name: str, alias: str = "champion", reason: str = "") -> str:
    """Give ``alias`` back to the version that held it before the last promotion; returns it.
    ``reason`` (why, as the operator put it) goes into the alias's log beside the version rolled from."""
    with alias_lock(name, alias):
        return _rollback(name, alias, reason)


def _rollback(name: str, alias: str, reason: str) -> str:
    try:
        c = client()
        current = alias_version(name, alias)
        history = _history(name, alias, current)
    except Exception as exc:
        raise RegistryError(f"cannot read the promotion history of {name}@{alias}: {exc}") from exc
    gone: list[str] = []
    while history:
        if history[-1] == current:
            history.pop()
        elif not _version_exists(c, name, history[-1]):
            gone.append(history.pop())  # deleted since it held the alias: the one before it is next
        else:
            break
    if gone:
        log.warning("%s: rolling @%s back past deleted version(s) %s", name, alias, ", ".join(f"v{v}" for v in gone))
    if not history:
        raise RegistryError(f"{name}@{alias}: no earlier version to roll back to"
                            + (f" (v{', v'.join(gone)} held it, and have been deleted)" if gone else ""))
    target = history.pop()
    rolled_from = f"from v{current}" if current is not None else f"(@{alias} was unset)"
    why = f"rollback {rolled_from}" + (f": {reason}" if reason else "")
    # The log before the move: a log left at the version rolled from (a failed write after the move) read
    # as a move made in the UI, and the next rollback went back to that version. A failed write moves nothing.
    try:
        log_before = _log_move(c, name, alias, current, target, why)
    except Exception as exc:
        raise RegistryError(f"cannot record the rollback in {name}'s {LOG_TAG.format(alias=alias)} tag; "
                            f"@{alias} not moved: {exc}") from exc
    try:
        c.set_registered_model_alias(name, alias, target)
    except Exception as exc:
        try:  # the log says what happened: this move did not
            if log_before is None:
                c.delete_registered_model_tag(name, LOG_TAG.format(alias=alias))
            else:
                c.set_registered_model_tag(name, LOG_TAG.format(alias=alias), log_before)
        except Exception as undo:
            log.warning("%s: the log of @%s names a rollback to v%s that did not happen: %s", name, alias, target, undo)
        raise RegistryError(f"cannot set {name}@{alias} -> v{target}: {exc}") from exc
    try:  # popped only once the alias is back (a failure here leaves v{target} on top: skipped next time)
        c.set_registered_model_tag(name, HISTORY_TAG.format(alias=alias), json.dumps(history))
    except Exception as exc:
        log.warning("%s: rolled @%s back to v%s, but its promotion history could not be written: %s",
                    name, alias, target, exc)
    try:
        _stamp_holders(c, name, alias, current, target, why)
    except Exception as exc:
        log.warning("%s: @%s moved to v%s, but its version tags could not be written: %s", name, alias, target, exc)
    log.info("%s: rolled @%s back %s to v%s", name, alias, rolled_from, target)
    return target


def _version_exists(c: Any, name: str, version: str) -> bool:
    """Whether ``name`` version ``version`` is still in the registry (any other failure to tell is an error)."""
    from mlflow.exceptions import MlflowException

    try:
        c.get_model_version(name, version)
        return True
    except MlflowException as exc:
        if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
            return False
        raise RegistryError(f"cannot read {name} v{version}: {exc}") from exc
    except Exception as exc:
        raise RegistryError(f"cannot read {name} v{version}: {exc}") from exc


def _history(name: str, alias: str, current: str | None) -> list[str]:
    """The versions that held ``alias`` before, oldest first, given that ``current`` holds it now.

    The stack is written by ``promote`` and ``rollback``; a move made elsewhere (the MLflow UI, the
    client) is not on it, so when another version than the last holder those recorded (the ``to`` of the
    alias's log) holds it now, that holder held it just before: it goes on top (a rollback after a move
    in the UI went to the version before that holder, skipping it). With the alias unset (its version
    deleted, or the alias removed) the stack is as written. A tag that is not a list reads empty."""
    tags = client().get_registered_model(name).tags or {}
    try:
        stack = json.loads(tags.get(HISTORY_TAG.format(alias=alias), "[]"))
    except json.JSONDecodeError:
        stack = []
    if not isinstance(stack, list):
        log.warning("%s: the %s tag is not a list of versions; read as empty", name, HISTORY_TAG.format(alias=alias))
        stack = []
    history = [str(v) for v in stack]
    try:
        moves = json.loads(tags.get(LOG_TAG.format(alias=alias), "[]"))
        last = str(moves[-1]["to"]) if isinstance(moves, list) and moves and isinstance(moves[-1], dict) \
            and moves[-1].get("to") is not None else None
    except (json.JSONDecodeError, KeyError):
        last = None
    if current is not None and last is not None and last != current and (not history or history[-1] != last):
        history.append(last)
    return history


def list_versions(name: str | None = None) -> list[VersionInfo]:
    """Every version of ``name`` (or of every registered model), newest first, with the metrics of
    the run that produced it."""
    try:
        c = client()
        names = [name] if name else [m.name for m in _every_page(c.search_registered_models)]
        out: list[VersionInfo] = []
        for model_name in names:
            _, aliases_by_version, versions = _model_versions(c, model_name)
            for mv in versions:
                metrics: dict[str, float] = {}
                if mv.run_id:
                    try:
                        metrics = dict(c.get_run(mv.run_id).data.metrics)
                    except Exception:  # a deleted run leaves the version listable
                        metrics = {}
                created = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(mv.creation_timestamp / 1000))
                out.append(VersionInfo(model_name, str(mv.version), aliases_by_version.get(str(mv.version), ()),
                                       mv.run_id, created, dict(mv.tags or {}), metrics))
        out.sort(key=lambda v: (v.name, -int(v.version)))
        return out
    except Exception as exc:
        raise RegistryError(f"cannot list registered models: {exc}") from exc


PRUNED_LOG_TAG = "pruned_log"  # registered-model tag: JSON list of the latest prunes, {at, deleted, keep[, left]}


@dataclass(frozen=True)
class Pruned:
    """What ``prune`` did: the plan, the versions deleted, those it left with why (an error, or a change
    since the plan: an alias set, a pin), and the logged models deleted with the versions (their files go
    with ``mlflow gc --logged-model-ids``)."""

    plan: retention.Plan
    deleted: tuple[str, ...]
    skipped: Mapping[str, str]
    logged_models: tuple[str, ...] = ()

    @property
    def failed(self) -> dict[str, str]:
        """The versions left by an error (not by a change since the plan)."""
        return {v: why for v, why in self.skipped.items() if why.startswith("not deleted")}


def prune(name: str, keep: int, challenger_alias: str | None = "challenger", dry_run: bool = False) -> Pruned:
    """Delete the versions of ``name`` that ``retention.plan`` gives up (the retrain's refused challengers
    beyond the newest ``keep``; ``challenger_alias`` None: workers follow it, and having held it is having
    served), then each deleted version's logged model that no live version of any registered model still
    uses (its files go with ``mlflow gc``). Each version is read again just before it goes, under the lock
    of every alias the model holds (so no move by this tool lands between): one given an alias, a pin or
    a place in an alias's history since the plan stays, and so does one another version was copied from
    (its source). The versions deleted are logged in the model's ``pruned_log`` tag. ``dry_run``: the
    plan only. An error on one version is logged, and the rest go on; a logged model whose delete failed
    is named in the log (``logged_models_left``), and the next prune tries it again."""
    try:
        c = client()
        model, aliases, found = _model_versions(c, name)
    except Exception as exc:
        raise RegistryError(f"cannot list the versions of {name!r}: {exc}") from exc
    versions = [retention.Version(str(v.version), aliases.get(str(v.version), ()), dict(v.tags or {})) for v in found]
    plan = retention.plan(versions, keep, challenger_alias, retention.served_versions(model.tags or {}, challenger_alias))
    left = [] if dry_run else _logged_models_left((model.tags or {}).get(PRUNED_LOG_TAG))
    if dry_run or not (plan.delete or left):
        return Pruned(plan, (), {})
    sources = {str(v.version): (str(v.source or ""), getattr(v, "model_id", None)) for v in found}
    deleted: list[str] = []
    skipped: dict[str, str] = {}
    for version in plan.delete:
        try:
            why = _prune_one(c, name, version, challenger_alias)
        except Exception as exc:
            why = f"not deleted: {exc}"
            log.warning("%s: cannot delete v%s: %s", name, version, exc)
        if why is None:
            deleted.append(version)
        else:
            skipped[version] = why
    logged, failed = _delete_logged_models(c, name, [sources[v] for v in deleted] + [("", m) for m in left])
    if deleted or logged or failed:
        log.info("%s: deleted %d version(s) no alias, pin or rollback needs: %s (kept %s)", name, len(deleted),
                 some([f"v{v}" for v in deleted]), plan.kept_text())
        entry: dict[str, Any] = {"at": _utc_now(), "deleted": deleted[-200:], "keep": keep}
        if failed:
            entry["logged_models_left"] = failed[-50:]
        try:
            _append_log(c, name, PRUNED_LOG_TAG, entry)
        except Exception as exc:
            log.warning("%s: deleted %s, but the %s tag could not say so: %s", name, some([f"v{v}" for v in deleted]),
                        PRUNED_LOG_TAG, exc)
    return Pruned(plan, tuple(deleted), skipped, tuple(logged))


def _prune_one(c: Any, name: str, version: str, challenger_alias: str | None) -> str | None:
    """Delete ``name`` v``version`` unless what protects a version now protects it: None, or why it stays."""
    from mlflow.exceptions import MlflowException

    with contextlib.ExitStack() as locks:
        for alias in sorted(c.get_registered_model(name).aliases or {}):  # one order: no two processes cross
            locks.enter_context(alias_lock(name, alias))
        try:
            now = c.get_model_version(name, version)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                return "deleted already"
            raise
        model = c.get_registered_model(name)
        holders = tuple(a for a, v in (model.aliases or {}).items() if str(v) == version)
        why = retention.protected(retention.Version(version, holders, dict(now.tags or {})), challenger_alias,
                                  retention.served_versions(model.tags or {}, challenger_alias))
        if why is not None:
            return f"kept since the plan: {why}"
        copies = _users(c, f"models:/{name}/{version}")
        if copies is None or copies:
            return "kept: " + (f"the source of {some(copies)}" if copies else
                               "its name holds both kinds of quote, and copies of it cannot be searched for")
        c.delete_model_version(name, version)
    return None


def _users(c: Any, source: str) -> list[str] | None:
    """The live versions (of any registered model) whose source is ``source``, as ``name vN``; None when
    no filter can say (a source holding both kinds of quote)."""
    quote = "'" if "'" not in source else '"' if '"' not in source else None
    if quote is None:
        return None
    return [f"{v.name} v{v.version}" for v in _every_page(c.search_model_versions,
                                                          filter_string=f"source_path={quote}{source}{quote}")]


def _delete_logged_models(c: Any, name: str, sources: list[tuple[str, str | None]]) -> tuple[list[str], list[str]]:
    """Delete the logged models of the deleted versions (``sources``: each one's source and model id) that
    no live version of any registered model uses (as its source, or through where its files are: one
    registered from the logged model's folder, a copy of a copy) and that are not deleted already;
    returns the ids deleted and those whose delete failed."""
    from mlflow.exceptions import MlflowException

    ids = {model_id or source[len("models:/"):] for source, model_id in sources
           if model_id or source.startswith("models:/m-")}
    out: list[str] = []
    failed: list[str] = []
    locations: list[str] | None = None  # where every live version's files are (read once, if needed)
    for model_id in sorted(ids):
        try:
            users = _users(c, f"models:/{model_id}")
            if users is None or users:
                continue
            try:
                where = str(c.get_logged_model(model_id).artifact_location or "").rstrip("/")
            except MlflowException as exc:
                if exc.error_code == "RESOURCE_DOES_NOT_EXIST":
                    continue  # deleted already (a retry of one an earlier prune left)
                raise
            if locations is None:  # a version registered from the files' location, or a copy of a copy
                locations = [str(c.get_model_version_download_uri(v.name, v.version) or "").rstrip("/")
                             for v in _every_page(c.search_model_versions, filter_string="")]
            if not where or any(loc == where or loc.startswith(where + "/") for loc in locations):
                continue
            c.delete_logged_model(model_id)
            out.append(model_id)
        except Exception as exc:  # its version is gone: the next prune tries again (the log names it)
            failed.append(model_id)
            log.warning("%s: the logged model %s of a deleted version could not be deleted (the next prune tries "
                        "again): %s", name, model_id, exc)
    return out, failed


def _logged_models_left(text: str | None) -> list[str]:
    """The logged models the prunes in the ``pruned_log`` tag ``text`` failed to delete."""
    try:
        entries = json.loads(text or "[]")
    except (TypeError, ValueError):
        return []
    return sorted({str(m) for e in (entries if isinstance(entries, list) else []) if isinstance(e, dict)
                   for m in (e.get("logged_models_left") or []) if isinstance(m, str)})


def _model_versions(c: Any, name: str) -> tuple[Any, dict[str, tuple[str, ...]], list[Any]]:
    """Registered model ``name``, the aliases each of its versions holds (sorted), and its versions (every
    page; a name no filter can hold is searched for among all)."""
    model = c.get_registered_model(name)
    aliases: dict[str, list[str]] = {}
    for alias, version in (model.aliases or {}).items():
        aliases.setdefault(str(version), []).append(alias)
    name_filter = version_filter(name)
    versions = [v for v in _every_page(c.search_model_versions, filter_string=name_filter or "")
                if name_filter or v.name == name]
    return model, {v: tuple(sorted(a)) for v, a in aliases.items()}, versions


def version_filter(name: str) -> str | None:
    """An MLflow search filter for the versions of model ``name``, quoted so the name's own quotes do not
    end it (``name='o'brien'`` broke every listing of the registry); None for a name holding both kinds,
    which no filter string matches (MLflow has no escape): search all and keep the name's (pure)."""
    if "'" not in name:
        return f"name='{name}'"
    if '"' not in name:
        return f'name="{name}"'
    return None


def _every_page(search: Any, **kwargs: Any) -> Iterator[Any]:
    """Every result of an MLflow ``search_*`` call, page after page (one page held 100 models: a registry
    with more listed only the first 100)."""
    token = None
    while True:
        page = search(page_token=token, **kwargs)
        yield from page
        token = page.token
        if not token:
            return


def load_detector(name: str, alias_or_version: str = "champion") -> tuple[Detector, str]:
    """Download ``models:/name@alias`` (or ``/version``) and load its detector; returns it and the version."""
    import mlflow

    version = version_number(alias_or_version) or alias_version(name, alias_or_version)
    if version is None:
        if not _model_exists(name):
            try:
                known = sorted(m.name for m in client().search_registered_models(max_results=10))
            except Exception:
                known = []
            raise RegistryError(f"no registered model {name!r} (mlflow.model_name / --model-name)"
                                + (f"; the registry holds {', '.join(known)}" if known else
                                   "; the registry holds none: train one first"))
        raise RegistryError(f"{name} has no version with alias @{alias_or_version}")
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=tmp)
            candidates = list(Path(path).rglob("model.json"))
            if not candidates:
                raise RegistryError(f"models:/{name}/{version} holds no detector artifact{_stored_at(name, version)}")
            return Detector.load(candidates[0].parent), str(version)
    except RegistryError:
        raise
    except Exception as exc:
        raise RegistryError(f"cannot load models:/{name}/{version}: {exc}{_stored_at(name, version)}") from exc


def _stored_at(name: str, version: str) -> str:
    """Where a version's files are (its source URI), for an error that could not read them: a path on the
    machine that trained it is out of reach of every other machine (``mlflow.artifact_location``)."""
    try:
        c = client()
        source = str(c.get_model_version(name, str(version)).source or "")
        if source.startswith("models:/m-"):  # MLflow 3: a logged model, whose files are at its artifact location
            source = str(c.get_logged_model(source[len("models:/"):]).artifact_location or "")
    except Exception:
        return ""
    if not source:
        return ""
    import mlflow

    remote = tracking.is_server(mlflow.get_tracking_uri())  # a server: other machines read
    local = remote and (source.startswith("file:") or (source.startswith("/") and not source.startswith("//")))
    return (f" (its files are at {source}" + (", a path on the machine that registered it: set "
                                              "mlflow.artifact_location to a store every machine reaches, e.g. "
                                              "mlflow-artifacts:/<experiment> with a tracking server" if local else "")
            + ")")


def input_example(detector: Detector, values: np.ndarray, rows: int | None = None) -> pd.DataFrame:
    """A small frame of real readings (enough for two windows) to log beside the model."""
    rows = rows or detector.window_size + 2
    return pd.DataFrame(np.asarray(values[:rows], dtype=np.float64), columns=list(detector.sensors))
