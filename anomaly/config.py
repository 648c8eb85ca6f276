"""Typed, documented configuration, read once at the edge. No I/O except ``load_config``.

Sources, later wins: the defaults below, a TOML file, then ``ANOMALY_<SECTION>__<FIELD>`` environment
variables (e.g. ``ANOMALY_MODEL__WINDOW_SIZE=32``, ``ANOMALY_KAFKA__BOOTSTRAP_SERVERS=kafka:9092``).
Every field carries a one-line doc (``doc(...)``) that the README's configuration reference and
``anomaly config reference`` are generated from. A bad value raises ``ConfigError`` naming the field
(``model.window_size: must be >= 2, got 1``). Inside the package, code takes plain typed arguments,
not this object.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
import tomllib
import types
import typing
import zoneinfo
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping

from anomaly.adaptive import AdaptiveRule
from anomaly.crontab import cron_field_sets
from anomaly.episodes import EpisodeRule
from anomaly.errors import ConfigError

ENV_PREFIX = "ANOMALY_"
# ANOMALY_* names read by the command line rather than the configuration (no __ in them)
PLAIN_ENV = ("ANOMALY_DATASETS", "ANOMALY_LOG_LEVEL")
MAX_INTERVAL_S = 366 * 86400.0  # scheduler.interval_s: longer overflows APScheduler's arithmetic long before


def doc(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING) -> Any:
    """A dataclass field with a documentation line."""
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


def _at_least(section: str, settings: Any, names: tuple[str, ...], low: int) -> None:
    """``ConfigError`` naming ``section.name`` for the first of ``names`` below ``low``."""
    for name in names:
        if getattr(settings, name) < low:
            raise ConfigError(f"{section}.{name}", f"must be >= {low}, got {getattr(settings, name)}")


def _positive(section: str, settings: Any, names: tuple[str, ...]) -> None:
    """``ConfigError`` naming ``section.name`` for the first of ``names`` that is not > 0."""
    for name in names:
        if getattr(settings, name) <= 0:
            raise ConfigError(f"{section}.{name}", f"must be > 0, got {getattr(settings, name)}")


def _check_device(name: str, device: str) -> None:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
        raise ConfigError(name, f"must be auto, cpu, cuda or cuda:N; got {device!r}")


_ALIAS = re.compile(r"[A-Za-z0-9_-]{1,255}")


SQLITE_PREFIX = "sqlite:///"


def sqlite_file(uri: str) -> Path | None:
    """The file behind a ``sqlite:///`` URI (relative to the working directory; SQLAlchemy's options, such
    as ``?timeout=30``, aside), else None."""
    return Path(uri[len(SQLITE_PREFIX):].partition("?")[0]) if uri.startswith(SQLITE_PREFIX) else None


def canonical_store_uri(uri: str) -> str:
    """An MLflow store URI as one string per store: a relative ``sqlite:///`` path is made absolute (it
    names one file from wherever it is run), so locks keyed on the store agree however it is named."""
    path = sqlite_file(uri)
    if path is None:
        return uri
    _, sep, query = uri.partition("?")  # SQLAlchemy's options stay
    return SQLITE_PREFIX + str(path.resolve()) + sep + query


def alias_problem(alias: str) -> str | None:
    """Why the MLflow registry would refuse ``alias`` as an alias, or None: letters, digits, ``_`` and
    ``-`` only, and ``latest``, ``v<number>`` and a bare number already mean versions (a bare number is a
    version to ``anomaly score --model-alias``, so ``@1`` on version 2 scored version 1)."""
    if not _ALIAS.fullmatch(alias or ""):
        return f"alias {alias!r} is not usable: letters, digits, '_' and '-' only"
    if alias.lower() == "latest" or re.fullmatch(r"[vV]?\d+", alias):
        return f"alias {alias!r} is reserved: 'latest', 'v<number>' and numbers name versions"
    return None


def _check_alias(name: str, alias: str) -> None:
    problem = alias_problem(alias)
    if problem:
        raise ConfigError(name, problem)


def bootstrap_list(servers: str | typing.Sequence[str]) -> list[str]:
    """``"a:9092, b:9092"`` or ``["a:9092", "b:9092"]`` as a clean list (empty items skipped); none at
    all is a ``ConfigError``. Every Kafka client is given this list (``kafka_io``)."""
    items = servers.split(",") if isinstance(servers, str) else list(servers)
    clean = [item.strip() for item in items if item and item.strip()]
    if not clean:
        raise ConfigError("kafka.bootstrap_servers", f"no host:port given: {servers!r}")
    return clean


_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")  # what Kafka accepts as a topic name


def _check_bootstrap(name: str, servers: str) -> None:
    """host or host:port items (``bootstrap_list``; a host without a port means Kafka's 9092)."""
    for server in bootstrap_list(servers):
        if any(ch.isspace() or ch == ";" for ch in server):
            raise ConfigError(name, f"{server!r} in {servers!r}: a host:port holds no space or semicolon "
                                    f"(separate servers with commas)")
        host, sep, port = server.rpartition(":")
        if sep and host and not host.endswith(":") and not (port.isdigit() and 0 < int(port) <= 65535):
            raise ConfigError(name, f"{server!r} in {servers!r}: the port must be a number 1..65535")


@dataclass(frozen=True)
class DataSettings:
    """How raw readings become model input."""

    period_s: float | None = doc("sampling period of the grid in seconds; empty = the median gap of the training data (stamps with jitter: the mean gap, rounded as coarsely as keeps the grid within a tenth of a period of them)", None)
    fill: str = doc("gap filling on the grid: ffill, linear, zero or none", "ffill")
    max_fill_steps: int | None = doc("longest run of missing grid slots that is filled; empty = no limit when training and evaluating "
                                      "(but training leaves a table's outages out: more than worker.max_fill_steps slots in a "
                                      "row with no reading from any sensor), "
                                      "worker.max_fill_steps when `anomaly score` scores a file and when retraining reads "
                                      "the stream's history (as the worker would)", None)
    max_missing_fraction: float = doc("sensors missing more than this fraction of the training slots where some sensor "
                                      "reported are dropped (an outage of every sensor is no sensor's fault; with one "
                                      "sensor, only a sensor never observed)", 0.5)
    scaler: str = doc("per-sensor scaling fitted on training data: standard, robust or minmax", "standard")
    sensors: list[str] | None = doc("sensor columns to use; empty = every numeric column", None)
    timestamp_column: str | None = doc("timestamp column of input tables; empty = auto-detect", None)
    timezone: str | None = doc("IANA time zone (Europe/Berlin) of input tables' timestamps written without an offset (a logger on local time): read in it, a repeated hour where clocks go back kept in order, then turned to UTC; empty = such timestamps are UTC. Timestamps with an offset or Z, and epoch numbers, are exact either way", None)
    entity_column: str | None = doc("entity id column of input tables; empty = a column named entity if the table has one, else one entity. With several entities in a file, train fits one model shared by them and score scores each entity on its own (README Commands)", None)

    def check(self) -> None:
        if self.period_s is not None and self.period_s <= 0:
            raise ConfigError("data.period_s", f"must be > 0, got {self.period_s}")
        if self.fill not in ("ffill", "linear", "zero", "none"):
            raise ConfigError("data.fill", f"must be one of ffill, linear, zero, none; got {self.fill!r}")
        if self.max_fill_steps is not None and self.max_fill_steps < 0:
            raise ConfigError("data.max_fill_steps", f"must be >= 0, got {self.max_fill_steps}")
        if self.timezone is not None:
            import zoneinfo

            try:
                zoneinfo.ZoneInfo(self.timezone)
            except (zoneinfo.ZoneInfoNotFoundError, ValueError):
                raise ConfigError("data.timezone", f"{self.timezone!r} is not an IANA time zone (Europe/Berlin, "
                                                   "America/Chicago, UTC)") from None
        if not 0 < self.max_missing_fraction <= 1:
            raise ConfigError("data.max_missing_fraction", f"must be in (0, 1], got {self.max_missing_fraction}")
        if self.scaler not in ("standard", "robust", "minmax"):
            raise ConfigError("data.scaler", f"must be standard, robust or minmax; got {self.scaler!r}")
        if self.sensors:
            repeated = sorted({s for s in self.sensors if self.sensors.count(s) > 1})
            if repeated:
                raise ConfigError("data.sensors", f"names {', '.join(map(repr, repeated))} more than once")
        if self.entity_column and self.entity_column == self.timestamp_column:
            raise ConfigError("data.entity_column", f"must differ from data.timestamp_column (both "
                                                    f"{self.entity_column!r})")
        if self.sensors and self.entity_column in self.sensors:
            raise ConfigError("data.entity_column", f"{self.entity_column!r} is also in data.sensors")
        if self.sensors and self.timestamp_column in self.sensors:
            raise ConfigError("data.timestamp_column", f"{self.timestamp_column!r} is also in data.sensors: the "
                                                       "timestamp column is never a sensor")


@dataclass(frozen=True)
class ModelSettings:
    """The LSTM autoencoder's shape."""

    # The defaults were chosen on the accuracy benchmarks (README "Choosing the default network"):
    # as accurate as W 32 / hidden 64 / latent 16 there, at a fifth of the forward pass's cost.
    window_size: int = doc("W: readings per window", 10)
    hidden_size: int = doc("LSTM hidden units in encoder and decoder", 32)
    latent_size: int = doc("size of the bottleneck vector", 8)
    num_layers: int = doc("stacked LSTM layers", 1)
    dropout: float = doc("dropout between stacked layers and on the latent vector", 0.0)
    cell: str = doc("recurrent cell: lstm, gru or peephole (LSTM whose gates see the cell state; slower, no fused kernel)", "lstm")
    bidirectional: bool = doc("the encoder reads each window both ways; the decoder stays forward in time", False)
    attention: bool = doc("each decoder step attends over all encoder outputs (for long windows)", False)

    def check(self) -> None:
        if self.window_size < 2:
            raise ConfigError("model.window_size", f"must be >= 2, got {self.window_size}")
        _at_least("model", self, ("hidden_size", "latent_size", "num_layers"), 1)
        if not 0 <= self.dropout < 1:
            raise ConfigError("model.dropout", f"must be in [0, 1), got {self.dropout}")
        if self.cell not in ("lstm", "gru", "peephole"):
            raise ConfigError("model.cell", f"must be lstm, gru or peephole; got {self.cell!r}")

    def model_params(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class TrainingSettings:
    """How the autoencoder is trained."""

    epochs: int = doc("maximum epochs; early stopping usually ends sooner", 60)
    batch_size: int = doc("windows per optimisation step", 128)
    learning_rate: float = doc("Adam learning rate", 1e-3)
    weight_decay: float = doc("Adam weight decay", 0.0)
    validation_fraction: float = doc("last fraction of training windows held out for early stopping and the threshold", 0.2)
    patience: int = doc("epochs without validation improvement before stopping", 8)
    stride: int = doc("rows between consecutive training windows", 1)
    seed: int = doc("random seed (python, numpy, torch)", 0)
    device: str = doc("auto (CUDA when present), cpu, cuda or cuda:N", "auto")
    mixed_precision: bool = doc("bf16 autocast when training on CUDA (cuDNN runs the LSTM itself in float16 "
                                "there, so the loss is scaled: torch.amp.GradScaler)", True)
    fast: bool = doc("fast path: a larger batch (up to 1024; on CPU also batch x window x hidden <= 2^18, so 512 for "
                     "the default network and 128 for W 32 / hidden 64; never more than an eighth of the training "
                     "windows) with a sqrt learning-rate rule and warm-up, bf16 where native; much faster, results "
                     "differ slightly (see Benchmarks). The run's batch_size_used metric says the batch", False)
    cpu_threads: int = doc("torch threads while training on CPU (0 = torch's default); 1 is fastest on a busy 2-core box", 0)

    def check(self) -> None:
        if self.cpu_threads < 0:
            raise ConfigError("training.cpu_threads", f"must be >= 0, got {self.cpu_threads}")
        _at_least("training", self, ("epochs", "batch_size", "patience", "stride"), 1)
        if self.weight_decay < 0:
            raise ConfigError("training.weight_decay", f"must be >= 0, got {self.weight_decay}")
        if not 0 <= self.seed < 2**32:
            raise ConfigError("training.seed", f"must be in [0, 2**32), got {self.seed}")
        if self.learning_rate <= 0:
            raise ConfigError("training.learning_rate", f"must be > 0, got {self.learning_rate}")
        if not 0 < self.validation_fraction < 1:
            raise ConfigError("training.validation_fraction", f"must be in (0, 1), got {self.validation_fraction}")
        _check_device("training.device", self.device)


@dataclass(frozen=True)
class ThresholdSettings:
    """How the alarm threshold is fitted on validation reconstruction errors."""

    method: str = doc("pot (extreme value, peaks over threshold), quantile or mean_std", "pot")
    risk: float = doc("pot: target false-alarm probability per scored window", 1e-3)
    init_quantile: float = doc("pot: quantile of validation errors where the tail starts", 0.95)
    q: float = doc("quantile: the quantile of validation errors", 0.99)
    k: float = doc("mean_std: threshold = mean + k * std of validation errors", 3.0)
    scale: float = doc("multiplier applied to the fitted threshold (1 = as fitted)", 1.0)
    adaptive_rows: int = doc("readings whose scores set an adaptive bar per entity (0 = off): a window alarms only above both the fitted threshold and adaptive_factor x the adaptive_quantile of the scores of the adaptive_rows readings ending adaptive_lag readings before it (README, A threshold that adapts); saved with the model", 0)
    adaptive_factor: float = doc("adaptive: multiplier of the trailing quantile", AdaptiveRule.factor)
    adaptive_quantile: float = doc("adaptive: quantile of the trailing scores (0.5 = their median)", AdaptiveRule.quantile)
    adaptive_lag: int = doc("adaptive: readings between the trailing span and the scored reading, so an anomaly's onset does not raise its own bar", AdaptiveRule.lag)
    episode_drop: float = doc("alarm episodes (0 = off; > 1 on, not with adaptive_rows): the first window above the fitted threshold opens an episode, which stays alarmed while its windows score above its level (geometric mean of its scores; a run at or under the bar joins it only when a window above breaks the run) / episode_drop, never under the fitted threshold, and ends after episode_k readings in a row at or under that; the bar after it is episode_settle x the highest score among those windows that hold none of the last alarmed window's readings (README, Alarm episodes); saved with the model", 0.0)
    episode_settle: float = doc("episodes: the bar after an episode, as a multiple of the highest score of the windows that ended it and hold none of the last alarmed window's readings (its last window alone where episode_k is shorter than a window; at least the fitted threshold)", EpisodeRule.settle)
    episode_k: int = doc("episodes: readings in a row at or under the episode's bar that end it", EpisodeRule.k)
    per_entity_min_windows: int = doc("a model trained on several entities (train --data with data.entity_column) also fits each entity's own threshold, same method and scale, on that entity's validation windows when it has at least this many; the others, and entities it never saw, are held to the shared one. 0 = off. With an adaptive or episode rule, an entity's own value is the base its moving bar rises from; saved with the model", 200)

    def check(self) -> None:
        if self.method not in ("pot", "quantile", "mean_std"):
            raise ConfigError("threshold.method", f"must be pot, quantile or mean_std; got {self.method!r}")
        if not 0 < self.risk < 1:
            raise ConfigError("threshold.risk", f"must be in (0, 1), got {self.risk}")
        if not 0 < self.init_quantile < 1:
            raise ConfigError("threshold.init_quantile", f"must be in (0, 1), got {self.init_quantile}")
        if not 0 < self.q < 1:
            raise ConfigError("threshold.q", f"must be in (0, 1), got {self.q}")
        if self.scale <= 0:
            raise ConfigError("threshold.scale", f"must be > 0, got {self.scale}")
        if self.k < 0:
            raise ConfigError("threshold.k", f"must be >= 0, got {self.k}")
        if self.per_entity_min_windows < 0:
            raise ConfigError("threshold.per_entity_min_windows",
                              f"must be >= 0 (0 = off), got {self.per_entity_min_windows}")
        if self.adaptive_rows < 0:
            raise ConfigError("threshold.adaptive_rows", f"must be >= 0 (0 = off), got {self.adaptive_rows}")
        if not (math.isfinite(self.adaptive_factor) and self.adaptive_factor > 0):
            raise ConfigError("threshold.adaptive_factor", f"must be > 0, got {self.adaptive_factor}")
        if not 0 < self.adaptive_quantile < 1:
            raise ConfigError("threshold.adaptive_quantile", f"must be in (0, 1), got {self.adaptive_quantile}")
        if self.adaptive_lag < 0:
            raise ConfigError("threshold.adaptive_lag", f"must be >= 0, got {self.adaptive_lag}")
        if not (math.isfinite(self.episode_drop) and (self.episode_drop == 0 or self.episode_drop > 1)):
            raise ConfigError("threshold.episode_drop", f"must be 0 (off) or > 1, got {self.episode_drop}")
        if not (math.isfinite(self.episode_settle) and self.episode_settle > 0):
            raise ConfigError("threshold.episode_settle", f"must be > 0, got {self.episode_settle}")
        if self.episode_k < 1:
            raise ConfigError("threshold.episode_k", f"must be >= 1, got {self.episode_k}")
        if self.episode_drop > 0 and self.adaptive_rows > 0:
            raise ConfigError("threshold.episode_drop", "alarm episodes and the adaptive bar (adaptive_rows) both move "
                              "the bar; set one of them (episode_drop = 0 or adaptive_rows = 0)")

    def adaptive_rule(self) -> AdaptiveRule:
        """The adaptive part as ``anomaly.adaptive`` takes it (``rows`` 0: off)."""
        return AdaptiveRule(self.adaptive_rows, self.adaptive_factor, self.adaptive_quantile, self.adaptive_lag)

    def episode_rule(self) -> EpisodeRule:
        """The alarm-episode part as ``anomaly.episodes`` takes it (``drop`` 0: off)."""
        return EpisodeRule(self.episode_drop, self.episode_settle, self.episode_k)

    def rule_description(self) -> str:
        """How the bar moves, one line (the ``threshold.adaptive`` tag): the episodes', the adaptive
        rule's, or ``off``."""
        episodes = self.episode_rule()
        return episodes.describe() if episodes.enabled else self.adaptive_rule().describe()

    def policy_params(self) -> dict[str, Any]:
        """Parameters of the chosen method, as ``anomaly.thresholds.make_policy`` takes them."""
        return {"pot": {"risk": self.risk, "init_quantile": self.init_quantile},
                "quantile": {"q": self.q}, "mean_std": {"k": self.k}}[self.method]


@dataclass(frozen=True)
class MlflowSettings:
    """Where runs are tracked and models registered."""

    tracking_uri: str = doc("MLflow tracking URI; the default is a SQLite store under mlruns/", "sqlite:///mlruns/mlflow.db")
    registry_uri: str | None = doc("model registry URI; empty = the tracking URI", None)
    artifact_location: str = doc("artifact root for new experiments (local path or URI)", "mlruns/artifacts")
    experiment: str = doc("experiment that training runs are logged to", "anomaly")
    model_name: str = doc("registered model name (one per asset type)", "anomaly-detector")
    champion_alias: str = doc("alias of the served model version", "champion")
    challenger_alias: str = doc("alias of the candidate model version", "challenger")
    keep_dir: str | None = doc("folder where `anomaly train` keeps each model it trains until the registry has it: a tracking server gone during the run leaves the model there, and `anomaly models register FOLDER` registers it later; empty = not kept", "mlruns/unregistered")
    lock_dir: str | None = doc("folder of the lock files that serialise moves of an alias (promote, rollback, the retrain gate) and the retrains of a model; every process that moves this registry's aliases must see the same folder (containers: a volume they all mount, as deploy/compose.yaml does). Empty = the temp folder, shared by the processes of one host or container", None)

    def check(self) -> None:
        _check_alias("mlflow.champion_alias", self.champion_alias)
        _check_alias("mlflow.challenger_alias", self.challenger_alias)
        if not self.model_name.strip() or any(c in self.model_name for c in "/:?"):
            # the registry refuses "/" and ":", but only after a whole training run; "?" it takes, and a
            # load by models:/ (parsed as a URL) cut the name there: trained, registered, never served
            raise ConfigError("mlflow.model_name", f"must be a name without '/', ':' or '?', got {self.model_name!r}")


@dataclass(frozen=True)
class KafkaSettings:
    """Kafka connection and topics (any Kafka cluster; the local broker by default)."""

    bootstrap_servers: str = doc("comma-separated host:port list", "127.0.0.1:9092")
    input_topic: str = doc("topic of sensor readings", "sensors")
    events_topic: str = doc("topic anomaly events are written to", "anomalies")
    dlq_topic: str = doc("dead-letter topic for malformed readings", "sensors.dlq")
    scores_topic: str | None = doc("optional per-window scores topic; empty = off", None)
    feedback_topic: str | None = doc("topic of operators' verdicts on events and periods (`anomaly feedback`): the retrain trains on what they call normal, though the champion flags it, and keeps out what they call an anomaly; keep its retention at least retrain.lookback_s; empty = off", "anomalies.feedback")
    group_id: str = doc("consumer group of the scoring workers", "anomaly-worker")
    client_options: dict[str, Any] = doc("extra kafka-python options passed through to every client (TLS, SASL, ...)", factory=dict)


@dataclass(frozen=True)
class WorkerSettings:
    """The streaming scoring worker: windows, alert shaping, model following, metrics."""

    stride: int = doc("score a window every stride-th slot per entity (1 = every reading); 4 = a quarter of the forward passes for a few slots more detection delay (README, Streaming worker); at most the model's window size (a model with a shorter window is scored every window_size slots, with a warning)", 4)
    grace_slots: int = doc("how many sampling slots late a reading may arrive and still be placed in order", 0)
    entities: list[str] | None = doc("the entities this worker serves, as glob patterns on the entity id (fnmatch: * ? [...]; e.g. [\"pump-*\"]); the records of others are skipped, not dead-lettered, counted in anomaly_readings_skipped_total, and the retrain reads only these from the topic: several asset types on one input topic, each type's workers in a kafka.group_id of their own (README \"Several asset types\"); empty = every entity", None)
    partial_readings: bool = doc("accept readings that carry only some of the model's sensors, the absent ones missing as null is (a producer sending a slot's sensors one message each; with grace_slots >= 1 the parts of a slot are merged); off: such a reading is a dead letter (its sensor set differs from the model's). An unknown sensor is a dead letter either way. The retrain reads the topic the same way (the parts of a slot merged into one reading)", False)
    max_fill_steps: int = doc("missing slots forward-filled inside a window (a reading with every sensor null is none); "
                              "a longer gap restarts the entity's window. Also how many slots in a row (slots with no "
                              "reading counted) a null sensor takes its last value, then its typical one until it "
                              "reports again", 5)
    max_future_s: float = doc("a reading stamped more than this many seconds ahead of the worker's clock is a dead letter "
                              "(a clock far ahead would make its entity's later readings late and its neighbours look "
                              "idle); at most 3600, the idle timeout. -1 = off, for streams whose time runs ahead of the "
                              "clock on purpose (a replay sped up; anomaly up turns it off); off, a reading stamped more than the idle timeout "
                              "ahead of the clock and of its partition's newest, which the partition's next readings do not "
                              "follow, is still a dead letter (one that ends its poll waits, its commit held, for the "
                              "partition's next readings)", 600.0)
    max_entities: int = doc("most entities whose windows one worker holds (about 2-3 KB each at the default shapes); past "
                            "it those not active (an id heard from once, two slots or more ago; one silent for a "
                            "window) are evicted, down to 90 %, as silent ones are (counted in "
                            "anomaly_entities_evicted_total, logged once a minute): a producer that sends a new entity "
                            "id with every reading would otherwise grow the worker without bound for an hour of stream "
                            "time. Active entities are never evicted: a fleet bigger than the cap is still scored, with "
                            "a warning to raise it", 100_000)
    min_duration_windows: int = doc("consecutive windows above threshold before an event opens", 3)
    recovery_windows: int = doc("consecutive windows at or below threshold before an event closes", 3)
    cooldown_s: float = doc("a new crossing within this many seconds of a close re-opens the same event", 60.0)
    top_sensors: int = doc("sensors listed in an event, ranked by share of reconstruction error", 3)
    max_event_s: float = doc("period of the stream-time grid alert state never spans (epoch-aligned: 3600 = the top of "
                             "every hour; at least 60 of an entity's window spacings): at each boundary an open event "
                             "is closed (continued: true while the anomaly goes on, which then opens a new event with "
                             "its own id). Bounds how far back a restart re-reads to re-derive every open event's id, "
                             "so every event gets its closed", 3600.0)
    poll_timeout_s: float = doc("longest wait for records per poll (short, so signals are noticed)", 1.0)
    stall_s: float = doc("a loop round (poll, score, deliver, commit) still unfinished after this many seconds is a "
                         "stuck worker: /healthz answers 503 with status stalled, and `anomaly worker` kills its "
                         "scoring child and exits with code 70 for its supervisor to restart it (nothing of the "
                         "batch in hand is committed). At least 120: a producer waits up to 60 s for the broker's "
                         "metadata, and a batch's outputs get the producer's delivery_timeout_ms (120 s unless "
                         "kafka.client_options sets it) + 5 s but at most stall_s - 15, each failing with its own "
                         "error first; 0 = never", 300.0)
    max_poll_records: int = doc("most records per micro-batch (a caught-up worker gets what arrived; a backlog is worked through in batches this big)", 5000)
    input_partitions: int = doc("partitions for the input topic when the worker creates it", 4)
    create_topics: bool = doc("create missing input/events/dead-letter/scores topics at start (needs Create permission); "
                              "false = only check that they exist and exit with an error naming the missing ones "
                              "(clusters where an operator owns the topics)", True)
    model_alias: str = doc("registry alias the worker serves and follows", "champion")
    model_check_interval_s: float = doc("how often the registry alias is checked for a new version", 15.0)
    maintenance_poll_s: float = doc("how often the worker re-reads kafka.feedback_topic for maintenance periods "
                                    "(`anomaly feedback maintenance`): an event that starts in its entity's period is "
                                    "not raised (its readings are still scored). 0 = off", 60.0)
    wait_for_model_s: float = doc("at start, when the alias points to no loadable version yet, keep retrying this long "
                                  "(health: starting) instead of exiting; -1 = forever (e.g. on Kubernetes before "
                                  "the first training job)", 0.0)
    device: str = doc("scoring device: auto (CUDA when present), cpu, cuda", "auto")
    precision: str = doc("forward-pass precision: auto (bf16 on CUDA and on CPUs with native bf16, e.g. AVX512-BF16; "
                         "float32 elsewhere), fp32, bf16. bf16 moves scores by about 0.01-0.05 % of their value (median), up to about "
                         "2 % for single windows. bf16 on a CPU without AVX-512 (no oneDNN bf16 LSTM there) scores in float32, "
                         "with a warning", "auto")
    torch_threads: int = doc("CPU threads for scoring; 0 = torch's default (one per core). 1 is fastest when the broker and Kafka clients share the cores", 1)
    trace_model: bool = doc("on CPU, score through a TorchScript trace of the model (one call per forward pass "
                            "instead of one per torch operation), used only if it reproduces the model exactly on "
                            "test batches at load; measured +7 to +24 % msg/s", True)
    switch_interval_ms: float = doc("the interpreter's thread switch interval while the worker runs (sys.setswitchinterval): "
                                    "after each torch call the scoring thread waits at most this long for Python's lock "
                                    "while the main thread decodes. 0 = leave it (Python's default is 5 ms); 0.5 measured "
                                    "+6 to +17 % throughput on 2 cores", 0.5)
    gc_freeze: bool = doc("once started (and again after each model swap), move every object built so far (imports, "
                          "model, clients) out of reach of Python's cyclic garbage collector (gc.freeze), so the "
                          "collections that per-record allocations trigger do not walk them again and again; "
                          "measured +12 to +50 % msg/s over 10 paired runs on 2 cores", True)
    scoring_process: bool = doc("run the scoring step (decoding, windows, forward pass, alerts) in a child process forked "
                                "at start, beside the process that polls, follows the registry, produces and commits, "
                                "so the two do not share one interpreter lock; measured on 2 cores at stride 4 with the default "
                                "network 0.97 of a bare consumer against 0.61 in-process (with W 32 / hidden 64: level to "
                                "+11 % in paired rounds), for ≈ 260 MB more resident memory. Scores "
                                "in-process anyway on CUDA (a forked child cannot use it) and with less than 2 CPUs "
                                "to use (affinity or cgroup quota, e.g. a Kubernetes CPU limit of 1)", True)
    metrics_host: str = doc("address of the Prometheus /metrics and /healthz endpoint", "127.0.0.1")
    metrics_port: int = doc("port of the metrics endpoint; 0 = any free port; -1 = off", 9108)

    def check(self) -> None:
        _at_least("worker", self, ("stride", "max_poll_records", "input_partitions", "min_duration_windows", "max_entities",
                                   "recovery_windows", "top_sensors"), 1)
        _at_least("worker", self, ("grace_slots", "max_fill_steps", "torch_threads"), 0)
        if self.poll_timeout_s <= 0 or self.poll_timeout_s > 30:
            raise ConfigError("worker.poll_timeout_s", f"must be in (0, 30], got {self.poll_timeout_s}")
        if self.stall_s != 0 and not (math.isfinite(self.stall_s) and self.stall_s >= 120):
            raise ConfigError("worker.stall_s", f"must be >= 120 seconds or 0 (never), got {self.stall_s}")
        if self.cooldown_s < 0:
            raise ConfigError("worker.cooldown_s", f"must be >= 0, got {self.cooldown_s}")
        if not (math.isfinite(self.max_event_s) and self.max_event_s > 0):
            raise ConfigError("worker.max_event_s", f"must be a finite number > 0, got {self.max_event_s}")
        if not (math.isfinite(self.maintenance_poll_s) and self.maintenance_poll_s >= 0):
            raise ConfigError("worker.maintenance_poll_s", f"must be >= 0 seconds (0 = off), got {self.maintenance_poll_s}")
        if self.model_check_interval_s <= 0:
            raise ConfigError("worker.model_check_interval_s", f"must be > 0, got {self.model_check_interval_s}")
        if self.max_future_s != -1 and not 0 < self.max_future_s <= 3600:
            raise ConfigError("worker.max_future_s", f"must be in (0, 3600] or -1 (off), got {self.max_future_s}")
        if not 0 <= self.switch_interval_ms <= 100:
            raise ConfigError("worker.switch_interval_ms", f"must be in [0, 100], got {self.switch_interval_ms}")
        if not -1 <= self.metrics_port <= 65535:
            raise ConfigError("worker.metrics_port", f"must be -1..65535, got {self.metrics_port}")
        if self.wait_for_model_s < 0 and self.wait_for_model_s != -1:
            raise ConfigError("worker.wait_for_model_s", f"must be >= 0 or -1 (forever), got {self.wait_for_model_s}")
        _check_device("worker.device", self.device)
        _check_alias("worker.model_alias", self.model_alias)
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError("worker.precision", f"must be auto, fp32 or bf16; got {self.precision!r}")


@dataclass(frozen=True)
class RetrainSettings:
    """Scheduled retraining: which history, how anomalies are kept out, and the promotion gate."""

    entities: list[str] | None = doc("entities whose history trains the challenger; empty = every entity whose readings carry the model's sensors", None)
    max_readings: int = doc("most recent readings kept per entity while reading the input topic (bounds memory: about 40 bytes per reading of 3 sensors held, 95 at the peak as the cycle lays them out as tables; 100 and 210 of 10 sensors: 2,000 entities of 3 sensors at 50,000 readings need about 9 GiB at the peak)", 50000)
    max_entities: int = doc("most entities whose readings the read of the input topic holds, with retrain.entities empty (a producer sending a new entity id with every reading made it grow without end: 413 MiB for 300,000 ids measured); past it those with the fewest readings go first, and the cycle is a skip if one of them held a window's worth", 100000)
    lookback_s: float = doc("history window in seconds, measured on the readings' own ts back from the newest one (readings stamped more than worker.max_future_s ahead of the clock are left out; with it off, a lone reading stamped far ahead of its partition, which goes on from before it, as the worker dead-letters it)", 7 * 86400.0)
    min_rows: int = doc("fewest clean rows (after anomaly exclusion) needed to retrain; fewer, or fewer than 4 gap-free windows of model.window_size to train on, or no hold-out window = a logged skip", 500)
    read_idle_s: float = doc("stop reading the input topic after this many seconds without a new record (before the first: at least 10 s, for the first fetch), unless a partition is known to hold more (then it reads on until read_timeout_s); a partition written to while it is read ends at its first record written after the read began", 2.0)
    read_timeout_s: float = doc("longest time spent reading the input topic; a read it stops short of a partition's end holds the topic's oldest part, and the cycle is skipped (raise it, or shorten the topic's retention)", 300.0)
    exclude_margin_rows: int = doc("rows dropped on each side of a window the champion flags, besides the window itself, and on each side of a labelled row (retrain, and train --data on a labelled file)", 32)
    holdout_fraction: float = doc("most recent fraction of the clean history held out to compare challenger and champion", 0.2)
    min_improvement: float = doc("promote only if the challenger's mean hold-out error is lower by at least this fraction", 0.05)
    max_false_alarm_increase: float = doc("promote only if the challenger's hold-out false-alarm rate exceeds the champion's by at most this", 0.005)
    label_field: str = doc("field of an input reading (or column of a --data file, else its anomaly or label column) holding ground truth, 1/true = anomalous; when present, labelled rows are kept out of training (retrain and train --data) and event F1 enters the gate", "anomaly")
    min_event_f1_improvement: float = doc("with labels: a challenger whose hold-out event F1 is higher by at least this also counts as better", 0.05)
    max_event_f1_decrease: float = doc("with labels: promote only if the challenger's hold-out event F1 is lower than the champion's by at most this", 0.0)
    min_false_alarm_reduction: float = doc("with readings labelled normal (operators' verdicts, label_field) in the hold-out's stretch and periods labelled an anomaly in the history: a challenger alarming on fewer of the windows labelled normal, by at least this fraction of the champion's rate, also counts as better", 0.5)
    max_found_decrease: float = doc("with periods labelled an anomaly (operators' verdicts, label_field) in the history: promote only if the share of them the challenger alarms on is lower than the champion's by at most this", 0.0)
    keep_challengers: int = doc("versions a retrain made that stay registered though nothing needs them, the newest; after each cycle that registers one, older ones are deleted from the registry with the logged models no live version uses (`mlflow gc` frees the files; their runs stay). Never deleted: a version holding an alias, pinned by the version tag keep=true, not made by a retrain, that served (held an alias but the challenger's, or named in its history), or copied into another model (README, Old challengers). `anomaly models prune` does the same by hand. -1 = keep every one", 20)

    def check(self) -> None:
        _at_least("retrain", self, ("max_readings", "max_entities", "min_rows"), 1)
        _positive("retrain", self, ("lookback_s", "read_idle_s", "read_timeout_s"))
        if self.exclude_margin_rows < 0:
            raise ConfigError("retrain.exclude_margin_rows", f"must be >= 0, got {self.exclude_margin_rows}")
        if not 0 < self.holdout_fraction < 1:
            raise ConfigError("retrain.holdout_fraction", f"must be in (0, 1), got {self.holdout_fraction}")
        if not -1 < self.min_improvement < 1:
            raise ConfigError("retrain.min_improvement", f"must be in (-1, 1), got {self.min_improvement}")
        if not 0 <= self.max_false_alarm_increase <= 1:
            raise ConfigError("retrain.max_false_alarm_increase",
                              f"must be in [0, 1], got {self.max_false_alarm_increase}")
        if not self.label_field.strip():  # "  " names no field a reading or a file would have
            raise ConfigError("retrain.label_field", "must not be empty")
        if not 0 < self.min_event_f1_improvement <= 1:
            raise ConfigError("retrain.min_event_f1_improvement", f"must be in (0, 1], got {self.min_event_f1_improvement}")
        if not 0 <= self.max_event_f1_decrease <= 1:
            raise ConfigError("retrain.max_event_f1_decrease", f"must be in [0, 1], got {self.max_event_f1_decrease}")
        if not 0 < self.min_false_alarm_reduction <= 1:
            raise ConfigError("retrain.min_false_alarm_reduction",
                              f"must be in (0, 1], got {self.min_false_alarm_reduction}")
        if not 0 <= self.max_found_decrease <= 1:
            raise ConfigError("retrain.max_found_decrease", f"must be in [0, 1], got {self.max_found_decrease}")
        if self.keep_challengers < -1:
            raise ConfigError("retrain.keep_challengers", f"must be >= 0, or -1 (keep every one); got {self.keep_challengers}")


@dataclass(frozen=True)
class SchedulerSettings:
    """The retraining scheduler: when it runs, where its schedule persists, its metrics endpoint."""

    trigger: str = doc("interval (every interval_s seconds) or cron (the cron expression)", "interval")
    interval_s: float = doc("seconds between retraining runs (trigger = interval)", 86400.0)
    cron: str = doc("crontab expression, minute hour day month weekday, weekdays as crontab counts them (0 or 7 = Sunday, 1-5 = Monday to Friday); a day of the month and a weekday both given mean either, as in crontab (0 3 1 * mon: every 1st and every Monday); with a day field starting with * (*/2) it is not either but both, as in crontab (0 3 */2 * mon: Mondays that fall on odd days); month names take steps (jan/3: every third month) and a step wider than its range is its first value (30/3 of the days: the 30th); a fixed time the clocks pass twice when daylight saving ends runs once, while a job whose minute or hour starts with * runs in both passes, and a time the clocks skip when it begins runs just after the change (no day is lost), as crontab does (trigger = cron)", "0 3 * * *")
    timezone: str = doc("time zone of the cron expression", "UTC")
    job_store: str = doc("SQLite file of the persistent job store; its lock file sits beside it", "mlruns/scheduler.db")
    misfire_grace_s: int = doc("a run missed by at most this many seconds (e.g. while stopped) still runs, once; at most 366 days", 3600)
    metrics_host: str = doc("address of the scheduler's Prometheus /metrics and /healthz endpoint", "127.0.0.1")
    metrics_port: int = doc("port of the scheduler's metrics endpoint; 0 = any free port; -1 = off", 9109)

    def check(self) -> None:
        if self.trigger not in ("interval", "cron"):
            raise ConfigError("scheduler.trigger", f"must be interval or cron, got {self.trigger!r}")
        if not (math.isfinite(self.interval_s) and 0 < self.interval_s <= MAX_INTERVAL_S):
            raise ConfigError("scheduler.interval_s", f"must be a number > 0 and at most {MAX_INTERVAL_S:g} "
                                                      f"(a year), got {self.interval_s}")
        try:
            zone = zoneinfo.ZoneInfo(self.timezone)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ConfigError("scheduler.timezone", f"is not an IANA time zone name (e.g. UTC, Europe/Berlin): "
                                                    f"{self.timezone!r}") from None
        try:
            from apscheduler.triggers.cron import CronTrigger

            triggers = [CronTrigger(**fields, timezone=zone) for fields in cron_field_sets(self.cron)]
        except ValueError as exc:
            raise ConfigError("scheduler.cron", f"is not a crontab expression (minute hour day month weekday): "
                                                f"{self.cron!r}: {exc}") from None
        if self.trigger == "cron":  # a date that never comes (0 0 31 2 *): the scheduler would idle for ever
            now = datetime.now(zone)
            if all(t.get_next_fire_time(None, now) is None for t in triggers):
                raise ConfigError("scheduler.cron", f"{self.cron!r} never fires (no such date)")
        if not 1 <= self.misfire_grace_s <= MAX_INTERVAL_S:
            raise ConfigError("scheduler.misfire_grace_s", f"must be >= 1 and at most {MAX_INTERVAL_S:g} (366 days), "
                                                           f"got {self.misfire_grace_s}")
        if not -1 <= self.metrics_port <= 65535:
            raise ConfigError("scheduler.metrics_port", f"must be -1..65535, got {self.metrics_port}")


@dataclass(frozen=True)
class DriftSettings:
    """Early retraining on score drift: the scheduler compares the champion's recent live scores (the worker's scores topic, kafka.scores_topic) with its validation scores and retrains early when they move beyond the bounds."""

    enabled: bool = doc("run the drift check in the scheduler; needs kafka.scores_topic set here and in the workers (off by default: the scheduler then reads every per-window score)", False)
    check_interval_s: float = doc("seconds between drift checks; at most 366 days", 300.0)
    window: int = doc("most recent live scores of the champion compared with its validation scores", 5000)
    min_samples: int = doc("fewest live scores of the champion needed for a verdict; fewer = no verdict", 1000)
    psi_threshold: float = doc("drift when the population stability index of live vs validation scores reaches this (0.1 small, 0.25 large shift)", 0.25)
    max_alarm_rate: float = doc("drift when the fraction of live scores above the threshold exceeds this (1 = never), or the model's own validation rate plus 3 standard errors where that is higher", 0.05)
    cooldown_s: float = doc("no drift-triggered retrain within this many seconds of the last retrain or trigger", 21600.0)
    group_id: str = doc("consumer group whose committed offsets on the scores topic mark what the check has read; not kafka.group_id", "anomaly-drift")
    max_records_per_check: int = doc("most score records read per check (bounds the time and memory of a check)", 200000)
    read_idle_s: float = doc("a check stops reading after this many seconds without a new score record", 1.0)

    def check(self) -> None:
        _at_least("drift", self, ("window", "min_samples", "max_records_per_check"), 1)
        _positive("drift", self, ("check_interval_s", "psi_threshold", "read_idle_s"))
        if self.check_interval_s > MAX_INTERVAL_S:
            raise ConfigError("drift.check_interval_s", f"must be at most {MAX_INTERVAL_S:g} (366 days), "
                                                        f"got {self.check_interval_s:g}")
        if self.min_samples > self.window:
            raise ConfigError("drift.min_samples", f"must be <= drift.window ({self.window}), got {self.min_samples}")
        if not 0 < self.max_alarm_rate <= 1:
            raise ConfigError("drift.max_alarm_rate", f"must be in (0, 1], got {self.max_alarm_rate}")
        if self.cooldown_s < 0:
            raise ConfigError("drift.cooldown_s", f"must be >= 0, got {self.cooldown_s}")
        if not self.group_id:
            raise ConfigError("drift.group_id", "must not be empty")


_INT64_MAX = 2**63 - 1  # the largest integer a setting may hold: numpy, torch and the clock take int64
_OUT_OF_RANGE = f"out of range: must fit in 64 bits (|value| <= {_INT64_MAX})"

# Names that must not be empty strings (a field that may be empty says so and is typed ``str | None``).
_NON_EMPTY = {"kafka": ("bootstrap_servers", "input_topic", "events_topic", "dlq_topic", "group_id"),
              "worker": ("metrics_host",), "scheduler": ("metrics_host",),  # "" would bind every address
              "drift": ("group_id",),
              "mlflow": ("tracking_uri", "artifact_location", "experiment", "model_name", "champion_alias",
                         "challenger_alias")}


@dataclass(frozen=True)
class Settings:
    """The whole configuration."""

    data: DataSettings = field(default_factory=DataSettings)
    model: ModelSettings = field(default_factory=ModelSettings)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    threshold: ThresholdSettings = field(default_factory=ThresholdSettings)
    mlflow: MlflowSettings = field(default_factory=MlflowSettings)
    kafka: KafkaSettings = field(default_factory=KafkaSettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    retrain: RetrainSettings = field(default_factory=RetrainSettings)
    scheduler: SchedulerSettings = field(default_factory=SchedulerSettings)
    drift: DriftSettings = field(default_factory=DriftSettings)

    @property
    def stream_max_fill_steps(self) -> int:
        """The fill limit for data read as the worker reads it (``anomaly score`` on a file, retraining on
        the stream's history): ``data.max_fill_steps`` when set, else ``worker.max_fill_steps``."""
        steps = self.data.max_fill_steps
        return self.worker.max_fill_steps if steps is None else steps

    def check(self) -> None:
        """Rules every field obeys (numbers finite, names not empty), per-section rules, then the rules
        that span sections."""
        for section in dataclasses.fields(self):
            value = getattr(self, section.name)
            for f in dataclasses.fields(value):
                item = getattr(value, f.name)
                if isinstance(item, float) and not math.isfinite(item):
                    raise ConfigError(f"{section.name}.{f.name}", f"must be a finite number, got {item}")
                if isinstance(item, int) and abs(item) > _INT64_MAX:  # numpy, torch and time calls overflow
                    raise ConfigError(f"{section.name}.{f.name}",
                                      f"{_OUT_OF_RANGE}, got an integer of {item.bit_length()} bits")
                if f.name in _NON_EMPTY.get(section.name, ()) and not item.strip():
                    raise ConfigError(f"{section.name}.{f.name}", "must not be empty")
                if isinstance(item, list) and any(isinstance(x, str) and not x.strip() for x in item):
                    raise ConfigError(f"{section.name}.{f.name}", f"holds a blank name: {item!r}")
        for section in dataclasses.fields(self):
            value = getattr(self, section.name)
            if hasattr(value, "check"):
                value.check()
        k = self.kafka
        topics = [("kafka.input_topic", k.input_topic), ("kafka.events_topic", k.events_topic),
                  ("kafka.dlq_topic", k.dlq_topic), ("kafka.scores_topic", k.scores_topic),
                  ("kafka.feedback_topic", k.feedback_topic)]
        seen: dict[str, str] = {}
        for name, topic in topics:
            if topic and (not _TOPIC_NAME.fullmatch(topic) or topic in (".", "..")):
                raise ConfigError(name, f"{topic!r} is not a Kafka topic name (letters, digits, '.', '_' and '-'; at "
                                        f"most 249 characters; not '.' or '..')")
            if topic and topic in seen:  # e.g. dead letters into the input topic would come back as bad readings for ever
                raise ConfigError(name, f"must differ from {seen[topic]} (both {topic!r})")
            if topic:
                seen[topic] = name
        if self.training.stride > self.model.window_size:
            raise ConfigError("training.stride", f"must be <= model.window_size ({self.model.window_size}), "
                              f"got {self.training.stride}: rows would be skipped")
        if self.mlflow.champion_alias == self.mlflow.challenger_alias:
            raise ConfigError("mlflow.challenger_alias", "must differ from mlflow.champion_alias")
        _check_bootstrap("kafka.bootstrap_servers", k.bootstrap_servers)
        if self.data.sensors and self.retrain.label_field in self.data.sensors:
            raise ConfigError("retrain.label_field", f"{self.retrain.label_field!r} is also in data.sensors: a "
                                                     "ground-truth column is never a sensor")
        from anomaly.tables import LABEL_COLUMNS

        labels = {name.lower() for name in (*LABEL_COLUMNS, self.retrain.label_field)}
        named = [s for s in self.data.sensors or () if s.lower() in labels]
        if named:  # tables read those columns (any case) as ground truth, never as readings
            raise ConfigError("data.sensors", f"{', '.join(map(repr, named))}: a column of that name is read as "
                                              f"ground truth ({', '.join(sorted(labels))}, any case), never as a sensor")
        if self.drift.enabled and not self.kafka.scores_topic:
            raise ConfigError("drift.enabled", "needs kafka.scores_topic: the drift check reads the worker's "
                              "per-window scores (set it for the workers too)")
        if self.drift.enabled and self.drift.group_id == self.kafka.group_id:
            raise ConfigError("drift.group_id", f"must differ from kafka.group_id (both {self.kafka.group_id!r}): "
                                                "the drift check commits its place on the scores topic in its own "
                                                "group, which the workers' group would refuse while they run")


# --- loading -------------------------------------------------------------------------------------

def read_toml(path: str | Path) -> dict[str, Any]:
    """A TOML file's tables; a UTF-8 byte-order mark first (Windows editors write one) is skipped, where
    ``tomllib`` called the file invalid at line 1, column 1."""
    return tomllib.loads(Path(path).read_bytes().decode("utf-8-sig"))


def load_config(path: str | Path | None = None, env: Mapping[str, str] | None = None,
                overrides: Mapping[str, Mapping[str, Any]] | None = None,
                base: Mapping[str, Mapping[str, Any]] | None = None) -> Settings:
    """Defaults ← ``base`` (e.g. a dataset profile) ← TOML file ← ``ANOMALY_*`` environment ←
    ``overrides`` (from the command line). A later layer that names another ``threshold.method`` than
    ``base`` drops ``base``'s whole ``[threshold]``: its scale and parameters were chosen for its method."""
    raw: dict[str, dict[str, Any]] = {section: dict(values) for section, values in (base or {}).items()}
    base_method = (base or {}).get("threshold", {}).get("method")
    later_threshold: set[str] = set()  # [threshold] fields set above the base
    if path is not None:
        path = Path(path)
        try:
            loaded = read_toml(path)
        except FileNotFoundError:
            raise ConfigError("config", f"file not found: {path}") from None
        except IsADirectoryError:
            raise ConfigError("config", f"{path} is a directory, not a TOML file") from None
        except UnicodeDecodeError as exc:
            raise ConfigError("config", f"{path} is not UTF-8 text: {exc}") from None
        except ValueError as exc:  # TOMLDecodeError, and int()'s digit limit on a number of over 4300 digits
            raise ConfigError("config", f"{path} is not valid TOML: {exc}") from None
        for section, values in loaded.items():
            if isinstance(values, list) and values and all(isinstance(v, dict) for v in values):
                raise ConfigError(section, f"[[{section}]] is an array of tables; a section is written "
                                           f"[{section}], once")
            if not isinstance(values, dict):
                raise ConfigError(section, f"top-level key: every setting belongs under its [section] (e.g. "
                                           f"[model] window_size = 10); known sections: "
                                           f"{', '.join(f.name for f in dataclasses.fields(Settings))}")
            raw.setdefault(section, {}).update(values)
            if section == "threshold":
                later_threshold |= set(values)
    from_env: dict[str, str] = {}  # field -> the variable that set it, so an error can name it
    for key, value in (os.environ if env is None else env).items():
        if not key.startswith(ENV_PREFIX):
            continue
        if "__" not in key:  # e.g. ANOMALY_MODEL_WINDOW_SIZE: one underscore where two were meant
            if key not in PLAIN_ENV:
                logging.getLogger(__name__).warning(
                    "%s is not read: configuration variables are %s<SECTION>__<FIELD> (two underscores), "
                    "e.g. ANOMALY_MODEL__WINDOW_SIZE", key, ENV_PREFIX)
            continue
        section, _, name = key[len(ENV_PREFIX):].lower().partition("__")
        raw.setdefault(section, {})[name] = _EnvString(value)
        if section == "threshold":
            later_threshold.add(name)
        from_env[f"{section}.{name}"] = key
        from_env.setdefault(section, key)  # an unknown section names a variable that brought it
    overridden = set()
    for section, values in (overrides or {}).items():
        given = {k: v for k, v in values.items() if v is not None}
        raw.setdefault(section, {}).update(given)
        overridden |= {f"{section}.{k}" for k in given}
        if section == "threshold":
            later_threshold |= set(given)
    method = raw.get("threshold", {}).get("method")
    if base_method is not None and method is not None and str(method) != str(base_method):
        raw["threshold"] = {k: v for k, v in raw["threshold"].items() if k in later_threshold}
    try:
        return build_settings(raw)
    except ConfigError as exc:
        variable = from_env.get(exc.field)
        if variable is None or exc.field in overridden:
            raise
        raise ConfigError(exc.field, f"{exc.message} (set by {variable})") from None


def build_settings(raw: Mapping[str, Mapping[str, Any]]) -> Settings:
    sections = {f.name: f for f in dataclasses.fields(Settings)}
    built = {}
    for name, values in raw.items():
        if name not in sections:
            raise ConfigError(name, f"unknown section; known: {', '.join(sections)}")
        built[name] = _build_section(name, sections[name].default_factory, values)  # type: ignore[misc]
    settings = Settings(**built)
    settings.check()
    return settings


class _EnvString(str):
    """A value that came from the environment: parsed by the field's type, not taken as a string."""


def _build_section(section: str, cls: type, values: Mapping[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"{section}.{key}", f"unknown field; known: {', '.join(sorted(known))}")
        kwargs[key] = _coerce(f"{section}.{key}", hints[key], value)
    return cls(**kwargs)


def _coerce(name: str, hint: Any, value: Any) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        non_none = [a for a in args if a is not type(None)]
        # unset: "" anywhere; also "none"/"null" from the environment (a TOML string "none" is a name, not unset)
        unset = ("", "none", "null") if isinstance(value, _EnvString) else ("",)
        if value is None or (isinstance(value, str) and value.strip().lower() in unset):
            return None
        return _coerce(name, non_none[0], value)
    from_env = isinstance(value, _EnvString)
    if hint is bool:
        if isinstance(value, bool):
            return value
        if from_env and value.strip().lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.strip().lower() in ("1", "true", "yes", "on")
        raise ConfigError(name, f"must be true or false, got {value!r}")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if from_env:
            try:
                return int(value)
            except ValueError:
                if value.strip().lstrip("+-").isdigit():  # over int()'s 4300-digit limit
                    raise ConfigError(name, f"{_OUT_OF_RANGE}, got {len(value.strip())} characters of digits"
                                      ) from None
        raise ConfigError(name, f"must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if isinstance(value, int) and abs(value) > _INT64_MAX:  # float() of a 400-digit int: OverflowError
                raise ConfigError(name, f"must be a finite number, got an integer of {value.bit_length()} bits")
            return float(value)
        if from_env:
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(name, f"must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            if value != value.strip():  # "sqlite:///mlruns/mlflow.db " made a second store, named like the first
                raise ConfigError(name, f"starts or ends with a space or line break: {value!r} (a trailing "
                                        "newline of a file or secret?)")
            return str(value)
        raise ConfigError(name, f"must be a string, got {value!r}")
    if origin is list:
        if from_env and value.strip().startswith("["):  # a JSON list: names may hold commas
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise ConfigError(name, f"starts with '[' but is not a JSON list of strings: {value!r}") from None
        elif from_env:  # comma-separated
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(name, f"must be a list of strings, got {value!r}")
        return list(value)
    if origin is dict:
        if from_env and not value.strip():
            return {}
        if from_env:
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise ConfigError(name, "must be a JSON object when set from the environment") from None
        if not isinstance(value, dict):  # its type only: client_options hold passwords
            twice = isinstance(value, str) and value.lstrip().startswith("{")
            raise ConfigError(name, f"must be a table/object, got a {type(value).__name__}"
                                    + (" (a JSON object encoded twice?)" if twice else ""))
        return dict(value)
    raise ConfigError(name, f"unsupported type {hint}")  # pragma: no cover - a programming error


def reference_markdown() -> str:
    """The configuration reference as Markdown tables, generated from the dataclasses above."""
    lines: list[str] = []
    for section in dataclasses.fields(Settings):
        cls = section.default_factory  # type: ignore[attr-defined]
        hints = typing.get_type_hints(cls)
        lines += [f"### `[{section.name}]`", "", (cls.__doc__ or "").strip(), "",
                  "| field | type | default | env | meaning |", "| --- | --- | --- | --- | --- |"]
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            shown = "" if default is None else json.dumps(default)
            type_name = str(hints[f.name]).replace("typing.", "").replace("<class '", "").replace("'>", "")
            env = f"`{ENV_PREFIX}{section.name.upper()}__{f.name.upper()}`"
            lines.append(f"| `{f.name}` | `{type_name}` | `{shown}` | {env} | {f.metadata.get('doc', '')} |")
        lines.append("")
    return "\n".join(lines)


def example_toml() -> str:
    """An example configuration file with every field at its default, each with its doc line."""
    out = ["# anomaly configuration: every field at its default. Environment variables",
           "# ANOMALY_<SECTION>__<FIELD> override this file.", ""]
    for section in dataclasses.fields(Settings):
        cls = section.default_factory  # type: ignore[attr-defined]
        out.append(f"[{section.name}]")
        for f in dataclasses.fields(cls):
            out.append(f"# {f.metadata.get('doc', '')}")
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            if default is None:
                out.append(f"# {f.name} =")
            elif isinstance(default, dict):
                out.append(f"{f.name} = {{}}" if not default else f"{f.name} = {json.dumps(default)}")
            else:
                out.append(f"{f.name} = {json.dumps(default)}")
        out.append("")
    return "\n".join(out)


def to_toml(settings: Settings) -> str:
    """``settings`` as a TOML file that ``load_config`` reads back to equal settings (``None`` fields
    are left out: they are their defaults; so are ``None`` entries of a table such as
    ``kafka.client_options``). ``anomaly up`` hands its effective settings to its child processes this
    way. A value TOML cannot hold is a ``ConfigError`` naming the field."""
    out = ["# effective anomaly configuration (generated)", ""]
    for section in dataclasses.fields(Settings):
        values = getattr(settings, section.name)
        out.append(f"[{section.name}]")
        for f in dataclasses.fields(values):
            value = getattr(values, f.name)
            if value is not None:
                try:
                    out.append(f"{f.name} = {_toml_value(value)}")
                except TypeError as exc:
                    raise ConfigError(f"{section.name}.{f.name}", f"cannot be written to a TOML file: {exc}") from None
        out.append("")
    return "\n".join(out)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):  # TOML's own spelling (JSON's Infinity is not TOML)
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (int, float)):
        return json.dumps(value)  # floats keep their repr (1e-05, 0.25); top-level inf/nan are refused by checks
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an entry set to null (TOML has none) is left out: the client's default
        return "{" + ", ".join(f"{_toml_string(str(k))} = {_toml_value(v)}" for k, v in value.items()
                               if v is not None) + "}"
    raise TypeError(f"cannot write {type(value).__name__} as TOML")


def _toml_string(text: str) -> str:
    """A TOML basic string: JSON's escapes (quote, backslash, control characters as \\uXXXX) are TOML's,
    but characters beyond the BMP stay themselves (JSON's surrogate pairs are not TOML) and DEL is escaped."""
    if any("\ud800" <= c <= "\udfff" for c in text):
        raise TypeError(f"{text!r} is not valid Unicode (a lone surrogate)")
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")
