"""Waiting out short outages of the job store (Postgres restarts, failovers)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError, OperationalError

log = logging.getLogger("nnm.retry")
T = TypeVar("T")

#: Errors that mean "the database is unreachable right now", as opposed to a bad query.
TRANSIENT = (OperationalError,)


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, TRANSIENT) or (isinstance(exc, DBAPIError) and bool(exc.connection_invalidated))


def retry_db(fn: Callable[[], T], what: str, timeout_s: float = 600.0, first_delay_s: float = 0.5) -> T:
    """Call `fn`, retrying with backoff while the database is unreachable, for up to `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    delay = first_delay_s
    while True:
        try:
            return fn()
        except DBAPIError as exc:
            if not is_transient(exc) or time.monotonic() + delay > deadline:
                raise
            log.warning("%s: database unreachable (%s); retrying in %.1f s", what, exc.__class__.__name__, delay)
            time.sleep(delay)
            delay = min(delay * 2, 5.0)
