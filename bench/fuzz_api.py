"""Fuzz the API from its OpenAPI document with schemathesis, against a real gateway process.

    .venv/bin/pip install -e ".[bench]" && .venv/bin/python bench/fuzz_api.py [--examples 40] [--postgres]

Starts `nnm serve` (embedded; with `--postgres`, its job store is a fresh database on the local
Postgres at 127.0.0.1:5432, dropped afterwards, since SQLite forgives what Postgres refuses) on a
free port, runs `st run .../openapi.json` with the
`not_a_server_error` check, then reads the gateway's own Prometheus counters to report how many
requests were answered and how many with a 5xx status (target: none).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

VENV_BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status_counts(base: str) -> Counter:
    text = httpx.get(f"{base}/metrics", timeout=30).text
    counts: Counter = Counter()
    for m in re.finditer(r'^nnm_http_requests_total\{([^}]*)\} ([0-9.e+]+)$', text, re.M):
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(1)))
        if labels.get("route") != "/metrics":
            counts[labels["status"]] += int(float(m.group(2)))
    return counts


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--examples", type=int, default=40)
    ap.add_argument("--postgres", action="store_true", help="use a fresh database on the local Postgres")
    args = ap.parse_args()
    if args.postgres:
        import psycopg

        name = f"nnm_fuzz_{os.getpid()}"
        admin = "postgresql://postgres@127.0.0.1:5432/postgres"
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        try:
            return run(args, f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}")
        finally:
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
                conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
    return run(args, None)


def run(args: argparse.Namespace, database_url: str | None) -> int:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith("NNM_")}
        env["NNM_RECONCILE_INTERVAL_S"] = "0"
        if database_url:
            env["NNM_DATABASE_URL"] = database_url
        with open(Path(tmp) / "serve.log", "wb") as log:
            server = subprocess.Popen([sys.executable, "-m", "nnm.cli.main", "serve", "--port", str(port), "--data-dir",
                                       tmp], env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            for _ in range(300):
                try:
                    if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    time.sleep(0.3)
            started = time.perf_counter()
            st = subprocess.run([str(VENV_BIN / "st"), "run", f"{base}/openapi.json", "--checks", "not_a_server_error",
                                 "--max-examples", str(args.examples), "--request-timeout", "60",
                                 "--suppress-health-check", "all", "--seed", "1"],
                                capture_output=True, text=True)
            counts = status_counts(base)
        finally:
            server.terminate()
            server.wait(timeout=60)
        server_errors = sum(n for s, n in counts.items() if s.startswith("5"))
        result = {"requests": sum(counts.values()), "by_status": dict(sorted(counts.items())),
                  "server_errors_5xx": server_errors, "schemathesis_exit": st.returncode,
                  "job_store": "postgres" if database_url else "sqlite",
                  "seconds": round(time.perf_counter() - started, 1)}
        print(st.stdout[-3000:])
        print(json.dumps(result, indent=2))
        return 0 if server_errors == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
