"""The broker's side of /metrics in Celery mode: messages waiting per queue and the age of
the oldest, for this host's queues and the shared ones (``storage``, ``plans``).

A message carries the time it was sent (``SENT_AT``, set by ``stamp_sent_at`` on every
publish), so the oldest waiting job's age is read from the queue's tail without a consumer.
Redis only (the broker this project runs): Redis lists are pushed on the left and popped on
the right, so the tail is the oldest message. Labels are queue names, a handful per host.
"""

from __future__ import annotations

import json
import logging
import time

from celery.signals import before_task_publish

log = logging.getLogger(__name__)

SENT_AT = "tenantsync_sent_at"


@before_task_publish.connect
def stamp_sent_at(headers: dict | None = None, **_) -> None:
    """Every message this process publishes carries its send time (epoch seconds)."""
    if headers is not None:
        headers.setdefault(SENT_AT, time.time())


class QueueCollector:
    """Messages and the oldest message's age in ``queues`` of ``app``'s broker, at scrape time."""

    def __init__(self, app, queues: list[str]):  # noqa: ANN001 - the Celery app
        self.app, self.queues = app, queues

    def collect(self):  # noqa: ANN201 - prometheus_client's collector protocol
        from prometheus_client.core import GaugeMetricFamily

        depth = GaugeMetricFamily("tenantsync_queue_messages", "Jobs waiting in a broker queue.", labels=["queue"])
        oldest = GaugeMetricFamily("tenantsync_queue_oldest_seconds",
                                   "Age of the oldest job waiting in a broker queue (0: empty).", labels=["queue"])
        try:
            with self.app.connection_for_write() as conn:
                client = conn.default_channel.client
                for queue in self.queues:
                    depth.add_metric([queue], client.llen(queue))
                    oldest.add_metric([queue], _age(client.lindex(queue, -1)))
        except Exception as e:  # noqa: BLE001 - a broker away shows in /readyz; the rest still scrapes
            log.warning("metrics: broker queues not read: %s", e)
            return
        yield depth
        yield oldest


def _age(message: bytes | None) -> float:
    if not message:
        return 0.0
    try:
        sent = json.loads(message).get("headers", {}).get(SENT_AT)
        return max(0.0, time.time() - float(sent)) if sent is not None else 0.0
    except (ValueError, TypeError, AttributeError):
        return 0.0
