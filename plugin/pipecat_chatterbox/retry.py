"""Retrying ``busy``: which refusals are worth retrying, and how long to wait between tries.

A sidecar at capacity, or a load balancer with no sidecar ready, refuses with the protocol's
``busy``; that passes as soon as a turn ends somewhere, so a client tries again a little later.
This module needs no Pipecat.
"""

from __future__ import annotations

import json
import random
import time

from websockets.exceptions import InvalidStatus

from pipecat_chatterbox.client import ChatterboxError, error_for, error_from_message


class BusyBackoff:
    """Exponential backoff with jitter, bounded in retries and in total time.

    The n-th wait is drawn between half and all of ``min_wait * 2**(n-1)`` (at most
    ``max_wait``), so that calls refused together do not all come back at once.

    Args:
        attempts: Retries allowed.
        timeout: Seconds from now after which no retry is allowed.
        min_wait: The first wait's upper bound, in seconds.
        max_wait: The longest wait, in seconds.
    """

    def __init__(self, attempts: int, timeout: float, min_wait: float, max_wait: float):
        self._attempts = attempts
        self._deadline = time.monotonic() + timeout
        self._min_wait = min_wait
        self._max_wait = max_wait
        self.retries = 0

    def next_wait(self) -> float | None:
        """Count one more retry.

        Returns:
            Seconds to wait before it (never past the deadline), or None once the budget is
            spent.
        """
        remaining = self._deadline - time.monotonic()
        if self.retries >= self._attempts or remaining <= 0:
            return None
        self.retries += 1
        cap = min(self._max_wait, self._min_wait * 2 ** (self.retries - 1))
        return min(remaining, random.uniform(cap / 2, cap))


def retryable_refusal(error: InvalidStatus) -> ChatterboxError | None:
    """Tell whether a refused websocket upgrade is worth retrying later.

    The sidecar and the load balancer answer 503 with the protocol's ``busy`` (at capacity,
    connection limit, draining, no sidecar ready) or ``not_ready`` (loading). A 503 with
    ``engine_error`` (the GPU failed; the sidecar must be restarted) is not retried; a 503
    with another body (a proxy's own page) is.

    Args:
        error: The refusal.

    Returns:
        The refusal as an error to retry (``BusyError``, ``NotReadyError``), or None.
    """
    if error.response.status_code != 503:
        return None
    try:
        body = json.loads(error.response.body or b"{}")
    except ValueError:
        body = None
    if isinstance(body, dict) and body.get("type") == "error":
        refusal = error_from_message(body)
        return None if refusal.code == "engine_error" else refusal
    return error_for("busy", "HTTP 503 (service unavailable)")
