"""Prometheus metrics of one sidecar process, served at ``/metrics``."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

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

        self.active_streams = Gauge(
            "tts_active_streams",
            "Streams in progress: open contexts of every connection plus HTTP syntheses",
            registry=r,
        )
        self.capacity = Gauge(
            "tts_capacity",
            "Streams the server accepts at once; past it new ones get busy and readiness is 503",
            registry=r,
        )
        self.underruns = Counter(
            "tts_underruns_total",
            "Times a listener's playback ran dry: audio sent over 50 ms after playback reached it",
            registry=r,
        )
        self.underrun_seconds = Counter(
            "tts_underrun_seconds_total",
            "Seconds listeners waited with playback run dry, all contexts",
            registry=r,
        )
        self.gap_free = Counter(
            "tts_contexts_gap_free_total",
            "Finished contexts whose audio was sent without an underrun",
            registry=r,
        )
        self.last_engine_error = Info(
            "tts_engine_last_error", "The most recent engine failure's message", registry=r
        )
        self.device_fault = Gauge(
            "tts_device_fault",
            "1 once the engine's device failed (the process must be restarted; live is 503)",
            registry=r,
        )

    def add_engine_counters(self, read: Callable[[], dict[str, int]]) -> None:
        """Export an engine's own counters (worker crashes, restarts) as ``tts_engine_*_total``.

        Args:
            read: Returns the counters' current values by name.
        """
        self.registry.register(_EngineCounters(read))

    def render(self) -> bytes:
        """Returns: the metrics in Prometheus' text format."""
        return generate_latest(self.registry)


class _EngineCounters(Collector):
    """Reads an engine's counters at scrape time."""

    def __init__(self, read: Callable[[], dict[str, int]]):
        self._read = read

    def describe(self) -> list:
        return []  # names depend on the engine; collected at scrape time only

    def collect(self) -> Iterator[CounterMetricFamily]:
        for name, value in sorted(self._read().items()):
            yield CounterMetricFamily(
                f"tts_engine_{name}", f"Engine counter: {name.replace('_', ' ')}", value=value
            )
