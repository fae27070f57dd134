"""The storage worker a syncing worker starts beside itself (``python -m workers --storage``).

Compactions must not take the threads that sync: beat's level-1 plan sends a compaction for
every tenant synced in the last minute, thousands at once on a busy host, and in a worker's
own pool they would fill every thread while each commit's sync waited for one to end. So a
``--storage`` worker never consumes the storage queue itself: it starts ``python -m workers
-Q storage`` as a niced child process when that queue has messages, with its own few
threads, and the child exits after STORAGE_IDLE_CLOSE seconds without a job, by the same
clock as the embedded mode's storage child (scheduler/idle.py). The child is a Celery worker
like any other: its jobs are acked when they end, so a child killed mid-job has them
redelivered, and Flower shows it by name.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading

import redis
from celery.signals import task_postrun, task_prerun, worker_ready

from scheduler.idle import STORAGE_IDLE_CLOSE, STORAGE_NICE, IdleClock, watch_idle
from scheduler.routing import STORAGE_QUEUE

from .app import app

log = logging.getLogger("workers")

STORAGE_POLL = 2.0
STORAGE_THREADS = 2
STOP_TIMEOUT = 60.0


class StorageChild:
    """Polls the storage queue's length (one Redis call per STORAGE_POLL) and keeps a child
    worker running while it has messages."""

    def __init__(self, hostname: str, loglevel: str, threads: int = STORAGE_THREADS):
        # nice(1) rather than os.nice in a preexec_fn, which is unsafe in a process with threads.
        self.command = ["nice", "-n", str(STORAGE_NICE), sys.executable, "-m", "workers", "-Q", STORAGE_QUEUE,
                        "-c", str(threads), "-n", f"storage-{hostname}", "-l", loglevel,
                        "--exit-when-idle", str(STORAGE_IDLE_CLOSE)]
        self.process: subprocess.Popen | None = None
        self.redis = redis.Redis.from_url(app.conf.broker_url, socket_timeout=5, socket_connect_timeout=5)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._supervise, name="tenantsync-storage-child", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _supervise(self) -> None:
        while not self._stop.wait(STORAGE_POLL):
            if self.process is not None and self.process.poll() is None:
                continue
            if self.process is not None:
                log.info("the storage worker exited (%s)", self.process.returncode)
                self.process = None
            try:
                waiting = self.redis.llen(STORAGE_QUEUE)  # the Redis transport's queue is a list
            except redis.RedisError as e:  # the broker restarts: ask again at the next poll
                log.warning("storage queue length: %s", e)
                continue
            if not waiting or self._stop.is_set():
                continue
            try:
                self.process = subprocess.Popen(self.command, stdin=subprocess.DEVNULL)
            except OSError as e:  # e.g. no nice(1) on this host: said at every poll, not a traceback
                log.error("cannot start the storage worker (%s): %s", self.command[0], e.strerror)
            else:
                log.info("%d storage messages waiting: started a storage worker (pid %d)", waiting, self.process.pid)

    def stop(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop polling and let the child finish its running jobs (warm shutdown)."""
        self._stop.set()
        self._thread.join(STORAGE_POLL + 5)
        self.redis.close()
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            log.error("the storage worker did not stop in %.0f s; killing it", timeout)
            process.kill()
            process.wait(5)


def exit_when_idle(idle: float) -> None:
    """In the child: SIGTERM itself (Celery's warm shutdown) after ``idle`` seconds without a
    running job, or as soon as the worker that started it is gone (SIGKILLed)."""
    parent = os.getppid()
    clock = IdleClock()

    def stop_if_idle() -> bool:
        if clock.idle_for(idle) or os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)
            return True
        return False

    task_prerun.connect(lambda **_: clock.begin(), weak=False)
    task_postrun.connect(lambda **_: clock.end(), weak=False)
    worker_ready.connect(lambda **_: watch_idle(idle, stop_if_idle, threading.Event(), "tenantsync-idle-exit"),
                         weak=False)
