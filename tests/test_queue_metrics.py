"""Celery mode's queue metrics against a real Redis: messages waiting per queue and the age
of the oldest, read from the queue without consuming it."""

from __future__ import annotations

import time

from scheduler.queue_metrics import QueueCollector
from scheduler.routing import make_app
from tenantsync.config import Config


def samples(collector) -> dict[tuple[str, str], float]:
    return {(s.name, s.labels["queue"]): s.value for family in collector.collect() for s in family.samples}


def test_queue_depth_and_the_oldest_jobs_age(redis_server):
    app = make_app(Config(broker=redis_server.url, host="h1"))
    try:
        collector = QueueCollector(app, ["host.h1", "storage"])
        assert samples(collector)[("tenantsync_queue_messages", "host.h1")] == 0
        for name in ("a.db", "b.db", "c.db"):  # nobody consumes host.h1 here
            app.send_task("tenantsync.sync", args=[[name]], queue="host.h1", ignore_result=True)
            time.sleep(0.2)
        got = samples(collector)
        assert got[("tenantsync_queue_messages", "host.h1")] == 3
        assert 0.4 <= got[("tenantsync_queue_oldest_seconds", "host.h1")] < 10  # the first one's age
        assert got[("tenantsync_queue_messages", "storage")] == 0
        assert got[("tenantsync_queue_oldest_seconds", "storage")] == 0
    finally:
        with app.connection_for_write() as conn:
            conn.default_channel.client.delete("host.h1")
        app.close()


def test_a_broker_that_is_away_leaves_the_queue_metrics_out(redis_server):
    app = make_app(Config(broker=redis_server.url, host="h1"))
    redis_server.stop()
    try:
        app.conf.broker_connection_timeout = 1
        app.conf.broker_connection_max_retries = 0
        t0 = time.monotonic()
        assert samples(QueueCollector(app, ["host.h1"])) == {}
        assert time.monotonic() - t0 < 10
    finally:
        redis_server.start()
        app.close()
