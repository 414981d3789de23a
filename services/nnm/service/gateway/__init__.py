"""The REST gateway (FastAPI): validates requests, records jobs, queues them, serves results."""

from .app import create_app

__all__ = ["create_app"]
