"""Worker liveness does not depend on the broker: a real Celery worker keeps its heartbeat file fresh
while its Redis is down, so the liveness probe keeps passing (and nothing restarts the worker)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from .servers import own_redis, start_worker, stop

pytestmark = pytest.mark.slow


def probe(env: dict[str, str], max_age: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "nnm.service.worker.liveness", "--max-age", str(max_age)], env=env,
                          capture_output=True, text=True, timeout=60)


def test_liveness_survives_a_broker_outage(tmp_path, service_env, migrated):
    with own_redis(tmp_path / "redis") as (broker, redis):
        env = {**service_env, "NNM_BROKER_URL": broker, "NNM_DATA_DIR": str(tmp_path / "data")}
        before = probe(env, 30)
        assert before.returncode == 1 and "no heartbeat file" in before.stderr  # no worker yet: not alive
        worker = start_worker(env, tmp_path / "worker.log", name="live")
        try:
            assert probe(env, 30).returncode == 0
            redis.stop()
            time.sleep(25)  # longer than the probe's limit below: only fresh beats keep it passing
            during = probe(env, 15)
            assert during.returncode == 0, during.stderr
            assert worker.poll() is None
        finally:
            stop(worker, timeout=60)
        os.utime(tmp_path / "data" / "work" / ".worker-alive", (0, 0))  # as a hung worker leaves it
        stale = probe(env, 15)
        assert stale.returncode == 1 and "old" in stale.stderr
