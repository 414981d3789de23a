"""The service's wiring: settings, job store and artifact store, built once per process."""

from __future__ import annotations

from dataclasses import dataclass

from .settings import Settings, load_settings
from .store.repository import JobStore
from .store.storage import ArtifactStore, make_store


@dataclass
class ServiceContext:
    settings: Settings
    jobs: JobStore
    store: ArtifactStore

    @classmethod
    def from_settings(cls, settings: Settings | None = None, migrate: bool = False) -> ServiceContext:
        settings = settings or load_settings()
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        if migrate:
            from .store.migrations import upgrade

            upgrade(settings.resolved_database_url)
        return cls(settings, JobStore(settings.resolved_database_url), make_store(settings))

    def close(self) -> None:
        self.jobs.dispose()
