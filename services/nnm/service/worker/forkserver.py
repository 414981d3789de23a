"""A fork server for job children: torch and the engine imported once, each job's child forked from it.

Every job trains in a child process of its own (worker/child.py). Started fresh, that child first
imports torch, torchvision, scikit-learn and matplotlib: about 9 s of CPU on a 2-core machine, half
of a `quick` job, paid again by every job. Instead each watching thread (a Celery pool process, an
embedded queue slot) keeps one fork server (`python -m nnm.service.worker.forkserver`) that imports
all that once (started with the thread's first job, which runs fresh meanwhile) and, for each
later job, forks a child that runs `child.main` in a session of its own with
its output in the job's log. The server runs one job at a time, as its thread does: it answers the
child's pid, waits for it, and answers its exit status, which `ForkedChild` reads for the runner as
`subprocess.Popen` would give it. The server dies with its thread (parent-death signal) and the child
with the server.

The server never runs a torch operation, so no thread pool or device exists in it when it forks.
It is only given jobs whose environment is the one it was started with; otherwise it is replaced.
A forked child keeps the server's command line; `top` shows it as `nnm-job`, and its stdout is the
job's `child.log` (`ls -l /proc/PID/fd/1` names the job).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import select
import subprocess
import sys
import threading
import time
import traceback
from pathlib import Path

#: Seconds a ready server may take to answer a fork with the child's pid before the job starts fresh.
FORK_TIMEOUT_S = 30.0


class ForkedChild:
    """A job's child forked by a server, with the parts of `subprocess.Popen` the runner uses."""

    def __init__(self, server: _Server, pid: int):
        self.server, self.pid = server, pid
        self.args = ["forkserver", str(server.proc.pid), str(pid)]
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            self.returncode = self.server.exit_status(self.pid, timeout=0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise subprocess.TimeoutExpired(self.args, timeout)
            self.returncode = self.server.exit_status(self.pid, timeout=1.0 if left is None else min(left, 1.0))
        return self.returncode


class _Server:
    """One server process and the lines it has answered."""

    def __init__(self, env: dict[str, str]):
        self.env = dict(env)
        self.proc = subprocess.Popen([sys.executable, "-m", __name__], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
        self._buf = b""
        self._ready = False

    def alive(self) -> bool:
        return self.proc.poll() is None

    def ready(self, timeout: float = 0.0) -> bool:
        """Whether the server has finished importing (it says so once); waits up to `timeout`."""
        if not self._ready:
            try:
                self._ready = bool((self._line(timeout) or {}).get("ready"))
            except EOFError:
                return False
        return self._ready

    def _line(self, timeout: float) -> dict | None:
        """The next answer, None if none came within `timeout`; EOFError when the server is gone."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                return None
            chunk = os.read(fd, 4096)
            if not chunk:
                raise EOFError
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def fork(self, args: list[str], log_path: Path) -> ForkedChild | None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write((json.dumps({"args": args, "log": str(log_path)}) + "\n").encode())
            self.proc.stdin.flush()
            answer = self._line(FORK_TIMEOUT_S)
            while answer is not None and "exit" in answer:  # a child the runner gave up waiting for
                answer = self._line(FORK_TIMEOUT_S)
        except (OSError, EOFError):
            return None
        return ForkedChild(self, answer["pid"]) if answer else None

    def exit_status(self, pid: int, timeout: float) -> int | None:
        try:
            answer = self._line(timeout)
        except EOFError:  # the server died, and its child with it (parent-death signal)
            return -9
        if answer is None or answer.get("pid") != pid:
            return None
        return int(answer["exit"])

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()


def start_fresh(module: str, args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """`python -m module *args` as a new process in a session of its own, its output in `log_path`."""
    with open(log_path, "ab") as logf:
        return subprocess.Popen([sys.executable, "-m", module, *args], stdout=logf, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env)


def _cold(args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    return start_fresh("nnm.service.worker.child", args, env, log_path)


class ForkServers:
    """At most one server per (process, thread); thread-safe.

    Keyed by thread because Linux delivers the parent-death signal when the thread that started a
    process exits, and by process because Celery forks its pool processes after import.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._servers: dict[tuple[int, int], _Server] = {}

    def start_job(self, args: list[str], env: dict[str, str], log_path: Path,
                  use_server: bool) -> subprocess.Popen | ForkedChild:
        """Start the child running `args` (job id, attempt, work directory): with `use_server`, forked
        from this thread's server once it has imported; a fresh process while it imports, when it
        fails, and without `use_server`. Never waits for imports: the first job of a thread (or of
        new settings) starts fresh and starts the server for the jobs after it."""
        key = (os.getpid(), threading.get_ident())
        dead = []
        with self._lock:
            for other, server in list(self._servers.items()):
                if other[0] != os.getpid():  # inherited through a fork: another process's servers
                    del self._servers[other]
                elif not server.alive():  # its thread ended (parent-death signal) or it was killed
                    dead.append(self._servers.pop(other))
            server = self._servers.pop(key, None)
        for gone in dead:
            gone.stop()  # reap it and close its pipes
        if server is not None and (not use_server or server.env != env):
            server.stop()
            server = None
        if not use_server:
            return _cold(args, env, log_path)
        if server is None:  # the first job of this thread starts fresh while its server imports
            server = _Server(env)
            child = None
        elif server.ready():
            child = server.fork(args, log_path)
            if child is None:  # it died or hung: start over with a new server
                server.stop()
                server = _Server(env)
        else:  # still importing: this job does not wait for it (the runner must heartbeat meanwhile)
            child = None
        with self._lock:
            self._servers[key] = server
        return child or _cold(args, env, log_path)

    def wait_ready(self, timeout: float) -> bool:
        """Wait until this thread's server (if any) can fork; True when it can."""
        with self._lock:
            server = self._servers.get((os.getpid(), threading.get_ident()))
        return server is not None and server.ready(timeout)

    def close(self) -> None:
        """Stop every server this process holds (a dying worker takes them with it anyway)."""
        with self._lock:
            servers, self._servers = list(self._servers.values()), {}
        for server in servers:
            server.stop()


#: This process's servers (one per watching thread): a process-wide resource, like a process pool.
fork_servers = ForkServers()


def preload() -> None:
    """Import what a job's stages import, without running any of it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot
    import scipy.sparse.linalg  # noqa: F401
    import sklearn.cluster
    import sklearn.metrics  # noqa: F401

    from . import execution  # noqa: F401  (torch, torchvision, the engine's stages)


def _run_forked(request: dict, answers_fd: int) -> None:
    """In the forked child: become the job's child process (its own session, its log), then exit."""
    code = 1
    try:
        os.close(answers_fd)
        os.setsid()  # a process group of its own, which the runner signals as a whole
        with contextlib.suppress(OSError, AttributeError):  # `top` and `ps -o comm` show it as a job
            ctypes.CDLL(None).prctl(15, b"nnm-job", 0, 0, 0)  # PR_SET_NAME
        fd = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        sys.stdin = open(0, closefd=False)  # noqa: SIM115
        os.environ["NNM_PARENT_PID"] = str(os.getppid())
        import numpy as np
        import torch

        # A fresh process draws fresh default seeds; every child of one server would share them.
        np.random.seed()
        torch.seed()
        from .child import main

        code = main([str(a) for a in request["args"]])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        atexit._run_exitfuncs()  # what a process that returns from main does on its way out
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError):
                stream.flush()
        os._exit(code)


def serve() -> int:
    """The server's loop: a request per line on stdin, answers on stdout, one job at a time."""
    from .child import die_with_parent

    die_with_parent()
    answers = os.dup(1)
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)  # stray output of imported modules must not mix with the answers
    os.close(null)
    preload()
    out = os.fdopen(answers, "w", buffering=1)
    out.write(json.dumps({"ready": True}) + "\n")
    while line := sys.stdin.readline():
        if not line.strip():
            continue
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _run_forked(request, answers)
        out.write(json.dumps({"pid": pid}) + "\n")
        _, status = os.waitpid(pid, 0)
        out.write(json.dumps({"pid": pid, "exit": os.waitstatus_to_exitcode(status)}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(serve())
