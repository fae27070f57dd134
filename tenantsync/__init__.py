"""tenantsync: continuous replication of many SQLite databases to object storage.

The core package is plain Python with no Celery import, so the same calls serve the
single-database CLI, the embedded fleet mode and the Celery workers.
"""

__version__ = "0.1.0"
