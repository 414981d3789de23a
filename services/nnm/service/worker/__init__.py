"""Celery worker side: the app, job runner and child process, execution, reconciler, liveness."""
