"""Alembic environment: migrations run online against the configured URL."""

from alembic import context
from sqlalchemy import text

from nnm.service.store.db import Base, make_engine
from nnm.service.store.migrations import MIGRATION_LOCK

config = context.config
target_metadata = Base.metadata


def run() -> None:
    engine = make_engine(config.get_main_option("sqlalchemy.url"))
    with engine.connect() as connection:
        context.configure(
            connection=connection, target_metadata=target_metadata, render_as_batch=connection.dialect.name == "sqlite"
        )
        with context.begin_transaction():
            if connection.dialect.name == "postgresql":
                # Taken inside the migration's transaction, before alembic reads the current revision,
                # and released when it commits.
                connection.execute(text("SELECT pg_advisory_xact_lock(hashtext(:k))"), {"k": MIGRATION_LOCK})
            context.run_migrations()
    engine.dispose()


run()
