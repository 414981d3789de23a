"""`nnm serve` may stay open for one person on 127.0.0.1, and warns when it listens beyond this
machine while anonymous callers get in (NNM_AUTH=off, or auto before any key was created)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from nnm.cli.main import _is_loopback, _open_to_anonymous, main

WARNING = "nnm: WARNING: listening on"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve_stderr(host: str, data_dir: Path, **env: str) -> str:
    """Start `nnm serve` and return its stderr up to the 'serving on' line; then stop it."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("NNM_")}
    full.update(env)
    cmd = [sys.executable, "-m", "nnm.cli.main", "serve", "--host", host, "--port", str(_free_port()),
           "--data-dir", str(data_dir)]
    proc = subprocess.Popen(cmd, env=full, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            line = proc.stderr.readline()
            if not line:
                break
            lines.append(line)
            if "nnm: serving on" in line:
                return "".join(lines)
        pytest.fail(f"nnm serve did not start (exit status {proc.poll()}):\n{''.join(lines)}")
    finally:
        proc.kill()
        proc.wait(timeout=30)
        proc.stderr.close()


def test_loopback_addresses() -> None:
    for host in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost"):
        assert _is_loopback(host), host
    for host in ("0.0.0.0", "::", "192.168.1.10", "10.0.0.1"):
        assert not _is_loopback(host), host


def test_open_on_loopback_without_warning(tmp_path: Path) -> None:
    err = _serve_stderr("127.0.0.1", tmp_path)
    assert WARNING not in err, err


def test_warns_beyond_loopback_without_keys(tmp_path: Path) -> None:
    err = _serve_stderr("0.0.0.0", tmp_path)
    assert WARNING in err, err
    assert "NNM_AUTH=auto and no API key exists yet" in err
    assert "NNM_AUTH=required" in err and "nnm keys create" in err  # says how to close it


def test_why_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reason the warning gives, per NNM_AUTH (in-process: starting a server per case is slow)."""
    for name in [k for k in os.environ if k.startswith("NNM_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("NNM_DATA_DIR", str(tmp_path))
    assert _open_to_anonymous() == "NNM_AUTH=auto and no API key exists yet"  # no job store yet either
    monkeypatch.setenv("NNM_AUTH", "off")
    assert _open_to_anonymous() == "NNM_AUTH=off"
    monkeypatch.setenv("NNM_AUTH", "required")
    assert _open_to_anonymous() is None


def test_no_warning_once_a_key_was_created(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """auto mode, once a key was created, is closed for good: revoking it does not open it again."""
    monkeypatch.setenv("NNM_DATA_DIR", str(tmp_path))  # `nnm keys` sets it; restored after the test
    monkeypatch.delenv("NNM_DATABASE_URL", raising=False)
    monkeypatch.delenv("NNM_AUTH", raising=False)
    assert main(["keys", "--data-dir", str(tmp_path), "create", "--name", "admin"]) == 0
    key_id = json.loads(capsys.readouterr().out)["id"]
    assert _open_to_anonymous() is None
    assert main(["keys", "--data-dir", str(tmp_path), "revoke", key_id]) == 0
    assert _open_to_anonymous() is None
    err = _serve_stderr("0.0.0.0", tmp_path)
    assert WARNING not in err, err
