"""ASGI entry point for uvicorn: `uvicorn --factory nnm.service.gateway.main:app`."""

from __future__ import annotations

import logging

from fastapi import FastAPI

from ..settings import load_settings
from .app import create_app


def app() -> FastAPI:
    settings = load_settings()
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    return create_app()
