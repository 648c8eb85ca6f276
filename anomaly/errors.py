"""The exception tree of the package. No I/O.

    AnomalyError                  base of everything raised on purpose by this package
    ├── ConfigError               a bad configuration value; ``field`` names it (e.g. ``model.window_size``)
    ├── DataError                 input data that cannot be used (unreadable file, no usable sensor, ...)
    ├── ModelError                a model that cannot be built, trained, saved or loaded
    ├── RegistryError             the MLflow tracking store / model registry refused or is unreachable
    ├── BrokerError               the local Kafka-protocol broker could not be started or stopped
    └── TopicError                a Kafka topic could not be created or described
"""

from __future__ import annotations

from anomaly.redaction import masked


class AnomalyError(Exception):
    """Base class of every error this package raises on purpose. Its text has the passwords of the
    URIs it quotes masked (``redaction.masked``): it is printed, logged and shown on ``/healthz``."""

    def __str__(self) -> str:
        return masked(super().__str__())


class ConfigError(AnomalyError):
    """A configuration value is missing, of the wrong type, or out of range.

    ``field`` is the dotted path of the offending field, so the message can name it.
    """

    def __init__(self, field: str, message: str) -> None:
        self.field = field
        self.message = masked(message)
        super().__init__(f"{field}: {message}")


class DataError(AnomalyError):
    """Input data that cannot be used as asked."""


class ModelError(AnomalyError):
    """A model that cannot be built, trained, saved or loaded."""


class RegistryError(AnomalyError):
    """The MLflow tracking store or model registry failed or is unreachable."""


class BrokerError(AnomalyError):
    """The local Kafka-protocol broker could not be found, started or stopped."""


class TopicError(AnomalyError):
    """A Kafka topic could not be created or described."""


class DeliveryError(AnomalyError):
    """Outputs (events, dead letters, scores) the broker did not take in time: nothing of their batch is
    committed, and the worker exits for a restart to read the batch again."""


class TrainingAbandoned(KeyboardInterrupt):
    """Training stopped at its next batch because the process is stopping now
    (``training.abandon_training``: a scheduler told twice to stop). A ``KeyboardInterrupt``, not an
    ``AnomalyError``: the MLflow run ends KILLED, not FAILED, and no ``except Exception`` takes it for a
    failure of the data or the model."""
