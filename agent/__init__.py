"""edge-agent: TFLite inference over MQTT with signed answers and a durable cloud outbox."""

__version__ = "0.1.0"
