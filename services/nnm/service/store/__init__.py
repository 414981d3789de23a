"""Persistence: the job store (SQLAlchemy models, repository, migrations) and artifact storage."""
