"""Celery app and task wrappers; ``celery -A workers worker`` finds ``workers.app``."""

from .app import app

__all__ = ["app"]
