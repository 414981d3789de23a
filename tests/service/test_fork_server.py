"""The fork server (worker/forkserver.py): job children forked from a process that imported torch once."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
import uuid

import pytest
from nnm.service.context import ServiceContext
from nnm.service.settings import load_settings
from nnm.service.worker.child import EXIT_LOST
from nnm.service.worker.forkserver import ForkedChild, ForkServers


@pytest.fixture
def job_env(tmp_path, monkeypatch):
    """The environment a worker gives its children, over an embedded job store with no jobs in it:
    a child handed an unknown job logs its start, looks the job up and exits with EXIT_LOST."""
    for name in [k for k in os.environ if k.startswith("NNM_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("NNM_DATA_DIR", str(tmp_path / "data"))
    ServiceContext.from_settings(load_settings(), migrate=True).close()
    return {**os.environ, "NNM_PARENT_PID": str(os.getpid())}


def _job(tmp_path) -> tuple[list[str], os.PathLike]:
    job_id = uuid.uuid4().hex
    (tmp_path / job_id).mkdir()
    return [job_id, "1", str(tmp_path / job_id)], tmp_path / job_id / "child.log"


def _started(log, proc, args) -> bool:
    return f"child {proc.pid} starts attempt 1 of job {args[0]}" in log.read_text()


def test_jobs_are_forked_from_one_server_each_into_its_own_session_and_log(tmp_path, job_env):
    servers = ForkServers()
    try:
        args0, log0 = _job(tmp_path)
        cold = servers.start_job(args0, job_env, log0, use_server=True)  # does not wait for the imports
        assert not isinstance(cold, ForkedChild) and cold.wait(300) == EXIT_LOST and _started(log0, cold, args0)
        assert servers.wait_ready(300)  # the server it started has imported

        args, log = _job(tmp_path)
        first = servers.start_job(args, job_env, log, use_server=True)
        assert isinstance(first, ForkedChild)
        assert first.wait(60) == EXIT_LOST and _started(log, first, args), log.read_text()

        args2, log2 = _job(tmp_path)
        second = servers.start_job(args2, job_env, log2, use_server=True)
        assert second.args[1] == first.args[1] and second.pid != first.pid  # the same server, a new child
        assert second.wait(60) == EXIT_LOST and _started(log2, second, args2)
        assert str(first.pid) not in log2.read_text()

        # The runner stops a child by signalling its process group: the child leads its own. (Its log is
        # a FIFO nobody reads, so the child waits in opening it, after leaving the server's session.)
        args3, log3 = _job(tmp_path)
        other_env = {**job_env, "NNM_LOG_LEVEL": "DEBUG"}
        assert not isinstance(servers.start_job(args3, other_env, log3, use_server=True), ForkedChild)
        assert servers.wait_ready(300)  # other settings: a new server, ready for the next job
        args3, log3 = _job(tmp_path)
        os.mkfifo(log3)
        third = servers.start_job(args3, other_env, log3, use_server=True)
        assert isinstance(third, ForkedChild) and third.args[1] != second.args[1]
        deadline = time.monotonic() + 60
        while os.getsid(third.pid) != third.pid and time.monotonic() < deadline:
            time.sleep(0.05)
        assert os.getsid(third.pid) == third.pid and third.poll() is None
        with pytest.raises(subprocess.TimeoutExpired):
            third.wait(0.2)
        os.killpg(third.pid, signal.SIGKILL)
        assert third.wait(60) == -signal.SIGKILL and third.poll() == -signal.SIGKILL
    finally:
        servers.close()
    assert not servers._servers


def test_without_a_server_or_with_a_dead_one_the_child_is_a_fresh_process(tmp_path, job_env):
    servers = ForkServers()
    try:
        args, log = _job(tmp_path)
        assert servers.start_job(args, job_env, log, use_server=True).wait(300) == EXIT_LOST
        assert servers.wait_ready(300)
        server = servers._servers[(os.getpid(), threading.get_ident())]
        server.proc.kill()
        server.proc.wait()
        args2, log2 = _job(tmp_path)
        proc = servers.start_job(args2, job_env, log2, use_server=True)  # fresh, and a new server started
        assert not isinstance(proc, ForkedChild) and proc.wait(300) == EXIT_LOST and _started(log2, proc, args2)
        assert servers.wait_ready(300)
        assert servers._servers[(os.getpid(), threading.get_ident())].proc.pid != server.proc.pid
        args3, log3 = _job(tmp_path)
        cold = servers.start_job(args3, job_env, log3, use_server=False)
        assert not isinstance(cold, ForkedChild) and cold.wait(300) == EXIT_LOST and _started(log3, cold, args3)
        assert not servers._servers  # turned off: the server was stopped
    finally:
        servers.close()
