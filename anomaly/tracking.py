"""MLflow tracking adapter: where runs go, and how a training run is logged (parameters, per-epoch
losses, data range, threshold, metrics, figures). With ``registry.py`` the only importers of mlflow.
"""

from __future__ import annotations

import logging
import math
import numbers
import os
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from anomaly.config import canonical_store_uri, sqlite_file
from anomaly.errors import ConfigError, RegistryError
from anomaly.redaction import masked
from anomaly.training import EpochStats

log = logging.getLogger(__name__)


def _quiet_mlflow() -> None:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # SQLAlchemy 2.1 warns about mlflow's use of noload() on every store open (DESIGN.md §5).
    warnings.filterwarnings("ignore", message=".*noload.*")
    logging.getLogger("alembic").setLevel(logging.WARNING)


_lock_dir: str | None = None  # configure's lock_dir (mlflow.lock_dir): where registry.alias_lock's files go


_said_unread: set[tuple[str, str]] = set()
_set_by_us: dict[str, str] = {}  # variable -> the URI configure gave mlflow, which writes it into os.environ


def _say_mlflow_variables_unread(tracking_uri: str, registry_uri: str | None) -> None:
    """Warn (once per value) when MLflow's own MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI name another store
    than the configuration: they are not read here, and a store set that way was passed over in silence.
    (``mlflow.set_tracking_uri`` itself sets them: a value an earlier ``configure`` left is not the user's.)"""
    for variable, field, configured in (("MLFLOW_TRACKING_URI", "tracking_uri", tracking_uri),
                                        ("MLFLOW_REGISTRY_URI", "registry_uri", registry_uri or tracking_uri)):
        value = os.environ.get(variable)
        said_by_us = _set_by_us.get(variable) == value
        _set_by_us[variable] = configured
        if value and value != configured and not said_by_us and (variable, value) not in _said_unread:
            _said_unread.add((variable, value))
            log.warning("%s=%s is not read: the store is mlflow.%s (%s); set ANOMALY_MLFLOW__%s (or --config) "
                        "to use another", variable, value, field, configured, field.upper())


def lock_dir() -> Path:
    """The lock folder ``configure`` was given (``locks.lock_folder``)."""
    from anomaly.locks import lock_folder

    return lock_folder(_lock_dir)


def configure_from(ml: Any, create: bool = True) -> None:
    """``configure`` with an ``[mlflow]`` section's store URIs and lock folder (``MlflowSettings``)."""
    configure(ml.tracking_uri, ml.registry_uri, create=create, lock_dir=ml.lock_dir)


def configure(tracking_uri: str, registry_uri: str | None = None, create: bool = True,
              lock_dir: str | None = None) -> None:
    """Point mlflow at the store; a local SQLite file gets its folder created first. ``create=False``
    (commands that only read the store: ``models``, ``score``): a SQLite file that does not exist is a
    ``ConfigError`` naming the field, not a new empty store (a typo in the URI listed no models, exit 0).
    ``lock_dir``: ``mlflow.lock_dir``, the folder of the alias locks (None: the temp folder)."""
    global _lock_dir
    _lock_dir = lock_dir or None
    _say_mlflow_variables_unread(tracking_uri, registry_uri)
    _quiet_mlflow()
    import mlflow

    for field, uri in (("mlflow.tracking_uri", tracking_uri), ("mlflow.registry_uri", registry_uri)):
        path = sqlite_file(uri) if uri else None
        if path is not None:
            if path.is_dir():
                raise ConfigError(field, f"{path} is a folder: name the store's SQLite file in it "
                                         f"(e.g. sqlite:///{(path / 'mlflow.db').as_posix()})")
            if not create and not path.is_file():
                raise ConfigError(field, f"no MLflow store at {path}: the file does not exist (nothing was trained "
                                         f"there; check the URI, or train a model first)")
            path.parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(registry_uri or tracking_uri)


def registry_uri() -> str:
    """The registry URI mlflow uses now, a relative ``sqlite:///`` path made absolute (where it looks)."""
    import mlflow

    return canonical_store_uri(mlflow.get_registry_uri())


REACH_TIMEOUT_S = 5.0  # require_reachable: an MLflow server that does not answer /health in this is down


def is_server(uri: str | None) -> bool:
    """Whether a tracking or registry URI is an MLflow server (http or https), not a store on this machine."""
    return uri is not None and uri.split(":", 1)[0] in ("http", "https")


def require_reachable(*uris: str | None, timeout_s: float = REACH_TIMEOUT_S) -> None:
    """A ``RegistryError`` at once when an http(s) tracking or registry server does not answer, instead of
    the MLflow client's retries (about four minutes) at the first call. For commands a person waits on;
    the long-running worker and scheduler keep the client's retries. Other stores are not checked."""
    import base64
    import urllib.error
    import urllib.parse
    import urllib.request

    for uri in dict.fromkeys(u for u in uris if is_server(u)):
        try:
            # user info (http://user:pw@host, which MLflow sends as basic auth): urllib takes it for a host
            parts = urllib.parse.urlsplit(uri.rstrip("/"))
            host = parts.netloc.rpartition("@")[2]
            request = urllib.request.Request(urllib.parse.urlunsplit(parts._replace(netloc=host)) + "/health")
            if "@" in parts.netloc:
                user = urllib.parse.unquote(parts.username or "")
                password = urllib.parse.unquote(parts.password or "")
                token = base64.b64encode(f"{user}:{password}".encode()).decode("ascii")
                request.add_header("Authorization", f"Basic {token}")
            with urllib.request.urlopen(request, timeout=timeout_s):
                pass
        except urllib.error.HTTPError:
            pass  # it answers (a proxy in front may not serve /health): let the client speak for it
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise RegistryError(f"MLflow server {uri} does not answer ({reason}); is it running? "
                                f"(mlflow.tracking_uri / --tracking-uri)") from None


def artifact_uri(location: str) -> str:
    """A local path becomes an absolute file URI (its folder made); a URI (s3://, file://,
    mlflow-artifacts:/...) is kept as is. A one-letter scheme is a Windows drive, i.e. a path."""
    uri = _as_uri(location)
    if uri != location:
        Path(location).resolve().mkdir(parents=True, exist_ok=True)
    return uri


def _as_uri(location: str) -> str:
    """``artifact_uri`` without making the folder."""
    from urllib.parse import urlparse

    return location if len(urlparse(location).scheme) > 1 else Path(location).resolve().as_uri()


def ensure_experiment(name: str, artifact_location: str) -> str:
    """The experiment's id, creating it (with its artifact root) when it does not exist."""
    import mlflow

    from mlflow.exceptions import MlflowException

    try:
        exp = mlflow.get_experiment_by_name(name)
        if exp is None:
            try:
                exp_id = mlflow.create_experiment(name, artifact_location=artifact_uri(artifact_location))
            except MlflowException as exc:
                # another process created it since the look-up (two first runs on a new store at once)
                exp = mlflow.get_experiment_by_name(name)
                if exp is None:
                    raise
                log.info("experiment %r was created by another process meanwhile (%s); using it", name,
                         exc.error_code)
                exp_id = exp.experiment_id
        else:
            exp_id = exp.experiment_id
            _say_other_artifact_root(name, exp.artifact_location, artifact_location)
        mlflow.set_experiment(experiment_id=exp_id)
        root = exp.artifact_location if exp is not None else mlflow.get_experiment(exp_id).artifact_location
    except Exception as exc:  # mlflow raises many types; the caller needs one
        raise RegistryError(f"cannot open experiment {name!r} at {mlflow.get_tracking_uri()}: {exc}") from exc
    _say_local_artifacts(name, mlflow.get_tracking_uri(), root)
    return exp_id


_said_artifacts: set[tuple[str, str]] = set()  # (experiment, what) said once per process


def _say_local_artifacts(name: str, tracking_uri: str, root: str | None) -> None:
    """Warn (once per experiment) when a tracking server's experiment keeps its artifacts on this machine's
    disk: runs and versions are recorded on the server, their files here, and a worker, scheduler or
    `anomaly score` on another machine cannot load the model ("holds no detector artifact")."""
    if not is_server(tracking_uri) or not (root or "").startswith("file:"):
        return
    if (name, "local") not in _said_artifacts:
        _said_artifacts.add((name, "local"))
        log.warning("experiment %r of the MLflow server %s keeps its artifacts (the models' files) at %s, a path on "
                    "this machine: a worker or scheduler elsewhere cannot load its models. Unless that path is "
                    "shared by every machine, set mlflow.artifact_location = \"mlflow-artifacts:/%s\" (through the "
                    "server) or a shared store (s3://...) and use a new mlflow.experiment", name, tracking_uri, root,
                    name)


def _say_other_artifact_root(name: str, root: str | None, setting: str) -> None:
    """Say (once per experiment) that an existing experiment keeps the artifact root it was created with when
    ``mlflow.artifact_location`` names another: MLflow fixes it at creation, and a changed setting was
    silently ignored."""
    if root is None or root.rstrip("/") == _as_uri(setting).rstrip("/") or (name, "other") in _said_artifacts:
        return
    _said_artifacts.add((name, "other"))
    log.warning("experiment %r keeps the artifact location it was created with, %s; mlflow.artifact_location (%s) "
                "applies to new experiments only: set mlflow.experiment to a new name to use it", name, root, setting)


class MlflowEpochLogger:
    """Training callback: logs losses and speed per epoch to the active run. A tracking server that stops
    answering stops the logging, with a warning, not the training: the epochs' figures are in the run up to
    there, and the trained model is what matters (``train_job.run_training`` keeps it when the registry
    cannot take it)."""

    def __init__(self, prefix: str = "") -> None:
        self.prefix = prefix
        self.failed: str | None = None  # why the logging stopped

    def on_epoch_end(self, stats: EpochStats) -> None:
        import mlflow

        if self.failed is not None:
            return
        try:
            mlflow.log_metrics({f"{self.prefix}train_loss": stats.train_loss, f"{self.prefix}val_loss": stats.val_loss,
                                f"{self.prefix}windows_per_s": stats.windows_per_s}, step=stats.epoch)
        except Exception as exc:
            self.failed = str(exc)
            log.warning("epoch %d's losses could not be logged to MLflow (%s): training goes on, epochs are no "
                        "longer logged", stats.epoch, masked(str(exc))[:300])


def flat_params(prefix: str, values: Mapping[str, Any]) -> dict[str, str]:
    """Parameters as MLflow wants them: flat, string-valued, prefixed by section; a list comma-separated
    (as the ``data.sensors`` tag is), not as Python writes it."""
    def text(v: Any) -> str:
        if v is None:
            return ""
        if isinstance(v, (list, tuple)):
            return ",".join(str(x) for x in v)
        return str(v)

    return {f"{prefix}.{k}": text(v)[:6000] for k, v in values.items()}


def log_figure(fig: Any, name: str) -> None:
    import mlflow

    from anomaly.plots import close

    try:
        mlflow.log_figure(fig, f"plots/{name}")
    finally:
        close(fig)  # also when logging fails: pyplot keeps every open figure


def finite_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """The numeric, finite entries of ``metrics`` as floats (numpy numbers too; booleans, None, NaN and
    inf left out: MLflow would store a NaN and turn inf into 1.8e308)."""
    out = {}
    for key, value in metrics.items():
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
            continue
        if math.isfinite(float(value)):
            out[key] = float(value)
    return out


TAG_CHARS = 5000  # a run tag's value is cut to this: what every MLflow store takes


class Run:
    """An MLflow run as a context manager; ``log_*`` write to it. Failure marks the run FAILED."""

    def __init__(self, experiment: str, artifact_location: str, run_name: str | None = None,
                 tags: Mapping[str, Any] | None = None) -> None:
        self.experiment, self.artifact_location = experiment, artifact_location
        # cut as set_tags cuts: start_run does not check a tag's length, and Postgres's varchar(8000) refused
        # a fleet retrain's entity list (every retrain of 700 pumps failed to start its run)
        self.run_name, self.tags = run_name, {k: str(v)[:TAG_CHARS] for k, v in (tags or {}).items()}
        self.run_id: str | None = None

    def __enter__(self) -> "Run":
        import mlflow

        ensure_experiment(self.experiment, self.artifact_location)
        active = mlflow.start_run(run_name=self.run_name, tags=self.tags)
        self.run_id = active.info.run_id
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        import mlflow

        if exc_type is None:
            status = "FINISHED"
        elif issubclass(exc_type, (KeyboardInterrupt, SystemExit)):
            status = "KILLED"  # stopped by a person or a signal, not a failure of the run
        else:
            status = "FAILED"
        if exc_type is None:
            mlflow.end_run(status=status)
            return
        try:  # the error in flight is the one to report (a server gone away: ending the run fails too)
            mlflow.end_run(status=status)
        except Exception as end_exc:
            log.warning("the MLflow run %s could not be ended %s: %s", self.run_id, status, end_exc)

    def log_params(self, params: Mapping[str, Any]) -> None:
        import mlflow

        mlflow.log_params(dict(params))

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        import mlflow

        clean = finite_metrics(metrics)
        if clean:
            mlflow.log_metrics(clean, step=step)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        import mlflow

        mlflow.set_tags({k: str(v)[:TAG_CHARS] for k, v in tags.items()})

    def log_dict(self, data: Any, name: str) -> None:
        import mlflow

        mlflow.log_dict(data, name)

    def log_figure(self, fig: Any, name: str) -> None:
        log_figure(fig, name)

    def log_input(self, values: np.ndarray, columns: Sequence[str], name: str, source: str,
                  context: str = "training") -> None:
        """Log ``values`` (rows, columns) as the run's input dataset (the UI's Datasets column: name,
        digest, schema, profile). ``source`` is a path or URI where MLflow can resolve one, else it is
        kept only in the dataset's name. Best effort: a failure is logged, never raised."""
        import mlflow
        import pandas as pd

        frame = pd.DataFrame(np.asarray(values), columns=list(columns))
        # a file or a URI; not a Kafka topic or a dataset folder's description
        where = source if "://" in source or Path(source).exists() else None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "can be interpreted in multiple ways": a local file
                try:
                    dataset = mlflow.data.from_pandas(frame, source=where, name=name)
                except Exception:  # a source MLflow cannot resolve
                    dataset = mlflow.data.from_pandas(frame, name=name)
                mlflow.log_input(dataset, context=context)
        except Exception as exc:
            log.warning("the run's input dataset was not logged: %s", exc)

    def log_artifact(self, path: str | Path) -> None:
        import mlflow

        mlflow.log_artifact(str(path))


def end_dead_runs(experiment: str, started_from_s: float, tags: Mapping[str, str], reason: str,
                  unless: Callable[[Mapping[str, str]], bool] = lambda tags: False) -> list[str]:
    """Mark FAILED, with the tag ``anomaly.ended`` = ``reason``, the runs of ``experiment`` still RUNNING that
    started at ``started_from_s`` (epoch s) or later and carry ``tags``, but not those whose tags ``unless``
    picks; their ids. For runs whose process was killed (SIGKILL, out of memory): nothing else ends them, and
    the UI shows them running for ever."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    where = [f"attributes.status = 'RUNNING'", f"attributes.start_time >= {int(started_from_s * 1000)}"]
    where += [f"tags.`{key}` = '{value}'" for key, value in tags.items()]
    ended = []
    for run in client.search_runs([found.experiment_id], filter_string=" and ".join(where), max_results=100):
        if unless(run.data.tags):
            continue
        client.set_tag(run.info.run_id, "anomaly.ended", reason[:TAG_CHARS])
        client.set_terminated(run.info.run_id, status="FAILED")
        ended.append(run.info.run_id)
    return ended


def code_version(checkout: Path | None = None) -> str:
    """The package version plus the git commit when running from a checkout (``checkout``: this
    package's directory unless given), marked ``.dirty`` when tracked files differ from that commit: a
    model trained from uncommitted code says so."""
    import subprocess

    from anomaly import __version__

    here = checkout or Path(__file__).resolve().parent

    def git(*args: str) -> str:
        return subprocess.run(["git", *args], capture_output=True, text=True, timeout=5, cwd=here).stdout.strip()

    sha, dirty = "", False
    try:
        sha = git("rev-parse", "--short", "HEAD")
        # --no-optional-locks: never takes .git/index.lock, so a person's own git command is not disturbed
        dirty = bool(sha) and bool(git("--no-optional-locks", "status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        pass  # the commit alone, when only the dirty check failed
    return code_version_string(__version__, sha, dirty)


def code_fingerprint(checkout: Path | None = None) -> str:
    """``code_version``, and for a checkout with uncommitted changes a hash of them (``git diff HEAD``
    and the Python files git does not track yet): what a cache of results computed by this code is
    keyed on, so two different sets of uncommitted edits do not share one."""
    import hashlib
    import subprocess

    version = code_version(checkout)
    if not version.endswith(".dirty"):
        return version
    here = checkout or Path(__file__).resolve().parent
    digest = hashlib.sha256()
    try:
        def git(*args: str, cwd: Path = here) -> bytes:
            return subprocess.run(["git", "--no-optional-locks", *args], capture_output=True, timeout=30,
                                  cwd=cwd).stdout

        digest.update(git("diff", "HEAD"))
        top = Path(git("rev-parse", "--show-toplevel").decode().strip() or here)
        # From the top: names relative to it, and the whole checkout's new files (not only this folder's).
        for name in sorted(git("ls-files", "--others", "--exclude-standard", "--", "*.py", cwd=top).decode().split("\n")):
            if name:
                digest.update(name.encode() + b"\0" + (top / name).read_bytes())
    except (OSError, subprocess.SubprocessError):
        return f"{version}.{time.time_ns()}"  # cannot tell what changed: a key no cache has
    return f"{version}.{digest.hexdigest()[:12]}"


def code_version_string(version: str, sha: str, dirty: bool) -> str:
    """``0.1.0``, ``0.1.0+abc1234`` or ``0.1.0+abc1234.dirty`` (a PEP 440 local version)."""
    if not sha:
        return version
    return f"{version}+{sha}.dirty" if dirty else f"{version}+{sha}"
