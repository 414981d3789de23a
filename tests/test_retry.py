"""retry_db against real database errors: a Postgres port nobody listens on (transient) and a bad query
(not transient)."""

from __future__ import annotations

import itertools
import time

import pytest
from nnm.service.retry import is_transient, retry_db
from sqlalchemy import create_engine, text
from sqlalchemy.exc import IntegrityError, OperationalError

from tests.service.servers import free_port


def unreachable():
    url = f"postgresql+psycopg://nobody@127.0.0.1:{free_port()}/none"
    return create_engine(url, connect_args={"connect_timeout": 2})


def test_waits_out_an_outage_then_returns():
    dead, calls = unreachable(), []

    def fn():
        calls.append(time.monotonic())
        if len(calls) < 3:
            with dead.connect():
                pass
        return "answer"

    assert retry_db(fn, "test", timeout_s=30, first_delay_s=0.1) == "answer"
    gaps = [b - a for a, b in itertools.pairwise(calls)]
    assert len(calls) == 3 and 0.1 <= gaps[0] < gaps[1]  # exponential backoff


def test_gives_up_at_the_deadline_with_the_real_error():
    dead, calls = unreachable(), []

    def fn():
        calls.append(1)
        with dead.connect():
            pass

    started = time.monotonic()
    with pytest.raises(OperationalError) as info:
        retry_db(fn, "test", timeout_s=1.0, first_delay_s=0.2)
    assert is_transient(info.value)
    assert len(calls) >= 3 and time.monotonic() - started < 2.5


def test_an_error_of_the_query_is_not_retried(tmp_path):
    engine, calls = create_engine(f"sqlite:///{tmp_path / 'x.db'}"), []
    with engine.begin() as c:
        c.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY)"))
        c.execute(text("INSERT INTO t VALUES (1)"))

    def fn():
        calls.append(1)
        with engine.begin() as c:
            c.execute(text("INSERT INTO t VALUES (1)"))

    with pytest.raises(IntegrityError) as info:
        retry_db(fn, "test", timeout_s=30)
    assert len(calls) == 1 and not is_transient(info.value)
