"""ASGI entry point for uvicorn: `uvicorn --factory nnm.service.gateway.main:app`."""

from __future__ import annotations

from fastapi import FastAPI

from ..logs import configure_logging
from ..settings import load_settings
from .app import create_app


def app() -> FastAPI:
    settings = load_settings()
    configure_logging(settings.log_level, settings.log_format, "gateway")
    return create_app()
