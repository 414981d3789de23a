"""The service: REST gateway, job store, artifact store, queue and workers around the engine.

Everything here adapts `nnm.engine` to HTTP, Postgres/SQLite, S3/local files and Celery/threads.
"""
