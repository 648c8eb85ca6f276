"""anomaly: Kafka-native anomaly detection for industrial sensor streams.

An LSTM autoencoder reconstructs sliding windows of multivariate sensor readings; a high
reconstruction error means an anomaly. See README.md for the layers and what each module owns.
"""

__version__ = "0.1.0"
