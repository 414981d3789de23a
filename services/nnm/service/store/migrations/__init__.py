"""Alembic migrations of the job store; `upgrade(url)` brings a database to the newest schema."""

from __future__ import annotations

from pathlib import Path

#: Key of the Postgres advisory lock held while migrating (env.py): two migrators (the migrate Job run
#: twice, gateways started with auto-migration) take turns, and the second finds the schema current.
MIGRATION_LOCK = "nnm:schema-migration"


def alembic_config(url: str):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(Path(__file__).parent))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Apply migrations up to `revision` (idempotent)."""
    from alembic import command

    command.upgrade(alembic_config(url), revision)
