"""The reconciler thread's handling of a database that vanishes between its ping and its pass.

That window is milliseconds wide, so the outage is injected here; the real Postgres outage is in
test_faults.py::test_postgres_outage.
"""

from __future__ import annotations

import logging
import threading
from types import SimpleNamespace

from nnm.service.reconciler import Reconciler
from sqlalchemy.exc import OperationalError


class VanishingJobStore:
    """Answers the ping, then fails the pass as a dropped Postgres connection does."""

    def __init__(self) -> None:
        self.passes = 0
        self.two_passes = threading.Event()

    def ping(self) -> None:
        return None

    def stale_jobs(self, timeout_s: float) -> list:
        self.passes += 1
        if self.passes >= 2:
            self.two_passes.set()
        raise OperationalError("SELECT 1", {}, ConnectionRefusedError("connection refused"))


def test_database_lost_mid_pass_is_a_warning_and_the_thread_goes_on(caplog):
    jobs = VanishingJobStore()
    ctx = SimpleNamespace(jobs=jobs, settings=SimpleNamespace(heartbeat_timeout_s=0.0))
    reconciler = Reconciler(ctx, queue=None, interval_s=0.01)
    with caplog.at_level(logging.WARNING, logger="nnm.reconciler"):
        reconciler.start()
        try:
            assert jobs.two_passes.wait(5), "the reconciler stopped after the first failed pass"
        finally:
            reconciler.stop()
            reconciler.join(5)
    records = [r for r in caplog.records if r.name == "nnm.reconciler"]
    assert records and all(r.levelno == logging.WARNING for r in records)
    assert all(r.exc_info is None for r in records)
    assert "database unreachable" in records[0].getMessage()
    assert "ConnectionRefusedError" in records[0].getMessage()
