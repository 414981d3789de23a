"""Waiting out short outages of the job store (Postgres restarts, failovers)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.exc import DBAPIError, OperationalError
from tenacity import Retrying, retry_if_exception, stop_before_delay, wait_exponential

log = logging.getLogger("nnm.retry")
T = TypeVar("T")

#: Errors that mean "the database is unreachable right now", as opposed to a bad query.
TRANSIENT = (OperationalError,)


def is_transient(exc: BaseException) -> bool:
    return isinstance(exc, TRANSIENT) or (isinstance(exc, DBAPIError) and bool(exc.connection_invalidated))


def retry_db(fn: Callable[[], T], what: str, timeout_s: float = 600.0, first_delay_s: float = 0.5) -> T:
    """Call `fn`, retrying with exponential backoff (from `first_delay_s`, at most 5 s apart) while the
    database is unreachable, for up to `timeout_s`; any other error, or the last one, is raised."""
    retrying = Retrying(
        retry=retry_if_exception(lambda exc: isinstance(exc, DBAPIError) and is_transient(exc)),
        wait=wait_exponential(multiplier=first_delay_s, max=5.0),
        stop=stop_before_delay(timeout_s),  # no attempt would start past the deadline
        before_sleep=lambda state: log.warning(
            "%s: database unreachable (%s); retrying in %.1f s", what,
            state.outcome.exception().__class__.__name__ if state.outcome else "?",
            state.next_action.sleep if state.next_action else 0.0),
        reraise=True,
    )
    return retrying(fn)
