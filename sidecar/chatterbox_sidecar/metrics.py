"""Prometheus metrics of one sidecar process, served at ``/metrics``."""

from __future__ import annotations

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

TTFA_BUCKETS = (0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0)
RTF_BUCKETS = (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 5.0)


class Metrics:
    """The sidecar's counters, gauges and histograms, in a registry of their own."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        """Create the metrics."""
        self.registry = CollectorRegistry()
        r = self.registry
        self.connections_open = Gauge(
            "tts_connections_open", "Open websocket connections", registry=r
        )
        self.connections_rejected = Counter(
            "tts_connections_rejected_total",
            "Websocket upgrades refused",
            ["reason"],
            registry=r,
        )
        self.contexts_open = Gauge(
            "tts_contexts_open", "Contexts opened and not yet ended", registry=r
        )
        self.contexts = Counter(
            "tts_contexts_total",
            "Contexts ended, by outcome (done, cancelled, error)",
            ["outcome"],
            registry=r,
        )
        self.audio_seconds = Counter(
            "tts_audio_seconds_total", "Seconds of audio sent to clients", registry=r
        )
        self.characters = Counter(
            "tts_characters_total", "Characters of text received for synthesis", registry=r
        )
        self.ttfa = Histogram(
            "tts_time_to_first_audio_seconds",
            "From a context's first text to its first audio byte",
            buckets=TTFA_BUCKETS,
            registry=r,
        )
        self.rtf = Histogram(
            "tts_real_time_factor",
            "Generation time over audio duration, per finished context",
            buckets=RTF_BUCKETS,
            registry=r,
        )
        self.errors = Counter(
            "tts_errors_total", "Error messages sent, by code", ["code"], registry=r
        )
        self.engine_errors = Counter(
            "tts_engine_errors_total", "Contexts the engine failed", registry=r
        )
        self.stalls = Counter(
            "tts_stalled_clients_total",
            "Connections closed because the client stopped reading audio",
            registry=r,
        )
        self.queued_chunks = Gauge(
            "tts_queued_audio_chunks",
            "Encoded audio chunks generated and waiting for delivery, all connections",
            registry=r,
        )
        self.voices = Counter(
            "tts_voice_operations_total",
            "Voice registrations and deletions, by operation",
            ["operation"],
            registry=r,
        )

    def render(self) -> bytes:
        """Returns: the metrics in Prometheus' text format."""
        return generate_latest(self.registry)
