"""tapio: a Kubernetes node agent for observability, shaped like the OpenTelemetry Collector."""

__version__ = "0.1.0"
