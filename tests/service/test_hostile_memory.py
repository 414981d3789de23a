"""The gateway under hostile input at its DEFAULT limits: a few kilobytes must not take it down.

A real gateway process (uvicorn, Postgres, Redis, S3) runs with none of the NNM_MAX_* variables the
other service tests tighten, and with its address space limited to what it holds once started plus
2 GiB (RLIMIT_AS, set with prlimit once it is ready: this PyTorch build maps about 4 GiB of
libraries on import, so a flat 2 GiB limit cannot even start it). Then it gets:

- 100 blank 4000x4000 PNGs, zipped (36 KB), to POST /v1/datasets: 4000x4000 is under the
  4096x4096 pixel limit, so the dataset is legitimately accepted (201), with bounded memory;
- 512 blank 4000x4000 PNGs to POST /v1/models/{id}/assign: 8.2 billion pixels to decode while the
  caller waits, over the default budget of one assign request (2**30), so refused from their headers
  (413); 32 of them, within the budget, are assigned (200) with bounded memory;
- a zip with one 4 GiB zero-filled member, declared honestly, and the same member declaring 1 MiB:
  refused, 422;
- an anonymous 300 MB JSON array to POST /v1/jobs: refused, 4xx, before the body is read.

Each answer is checked, `/healthz` is polled from a thread throughout and must answer 200 every time,
and the gateway's peak RSS during each attack (VmHWM, reset before it) is asserted under a bound and
appended as a JSON line to $NNM_RELIABILITY_FIGURES.
"""

from __future__ import annotations

import json
import resource
import select
import socket
import subprocess
import threading
import time
import zipfile
from collections.abc import Callable
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from hostile_inputs import GiB, MiB, blank_png, can_measure_peak_rss, peak_rss_bytes, reset_peak_rss, zeros_zip
from nnm.service.client import Client

from .conftest import digits_zip, figure
from .servers import start_gateway, stop

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not can_measure_peak_rss(), reason="needs /proc/<pid>/status and clear_refs (Linux)"),
]

#: A model in about 15 s on 2 cores: assign needs one, not a good one.
TINY_PIPELINE = {
    "preset": "quick",
    "pretext": {"epochs": 2, "batch_size": 64},
    "cluster": {"epochs": 1},
    "selflabel": {"epochs": 1},
}
#: Address space the gateway may add to what it maps once started.
HEADROOM = 2 * GiB
#: Peak RSS an attack may add to the gateway's RSS before it. Decoding all 100 images at full size,
#: as the gateway once did, needs 4.8 GB; a few decode slots of about 70 MB each need far less.
ATTACK_BOUND = 768 * MiB


@dataclass
class HealthWatch:
    """Polls GET /healthz from a thread while an attack runs; every answer must be a quick 200."""

    base: str
    interval_s: float = 0.2
    timeout_s: float = 10.0
    answers: list[tuple[int | str, float]] = field(default_factory=list)

    def __enter__(self) -> HealthWatch:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _poll(self) -> None:
        with httpx.Client(base_url=self.base, timeout=self.timeout_s) as http:
            while True:
                started = time.monotonic()
                try:
                    status: int | str = http.get("/healthz").status_code
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                self.answers.append((status, time.monotonic() - started))
                if self._stop.wait(self.interval_s):
                    return

    @property
    def failures(self) -> list[tuple[int | str, float]]:
        return [a for a in self.answers if a[0] != 200]

    @property
    def slowest_s(self) -> float:
        return max((s for _, s in self.answers), default=0.0)


@dataclass
class HostileGateway:
    proc: subprocess.Popen
    base: str
    client: Client
    training_job: str
    address_limit: int
    log: Path


def _vm_size(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize")


@pytest.fixture(scope="module")
def hostile(service_env, migrated, worker, infra, tmp_path_factory):
    """A gateway at the default limits, its address space capped, and a tiny model training meanwhile."""
    root = tmp_path_factory.mktemp("hostile")
    env = {k: v for k, v in service_env.items() if not k.startswith("NNM_MAX_")}
    # glibc reserves 64 MiB of address space per malloc arena (up to 8 per core): that is not memory,
    # but it counts against RLIMIT_AS, so keep the arenas few.
    env["MALLOC_ARENA_MAX"] = "2"
    log = root / "gateway.log"
    proc, base = start_gateway(env, log)
    limit = _vm_size(proc.pid) + HEADROOM
    resource.prlimit(proc.pid, resource.RLIMIT_AS, (limit, limit))
    client = Client(base, timeout=300)
    try:
        (root / "digits.zip").write_bytes(digits_zip())
        dataset = client.upload_dataset(root / "digits.zip")
        job = client.submit("pipeline", dataset["id"], TINY_PIPELINE)
        yield HostileGateway(proc, base, client, job["id"], limit, log)
    finally:
        client.close()
        stop(proc)


def attack(gw: HostileGateway, name: str, send: Callable[[], tuple[int, dict, object]]) -> tuple[int, dict, object]:
    """Run `send` (-> status, headers, body) while watching /healthz and the gateway's peak RSS."""
    assert gw.proc.poll() is None, "the gateway is not running"
    reset_peak_rss(gw.proc.pid)
    before, _ = peak_rss_bytes(gw.proc.pid)
    started = time.monotonic()
    with HealthWatch(gw.base) as watch:
        status, headers, body = send()
    seconds = time.monotonic() - started
    _, peak = peak_rss_bytes(gw.proc.pid)
    figure(
        "hostile_memory",
        attack=name,
        status=status,
        seconds=round(seconds, 1),
        rss_before_mib=round(before / MiB),
        peak_rss_mib=round(peak / MiB),
        added_mib=round((peak - before) / MiB),
        address_limit_mib=round(gw.address_limit / MiB),
        healthz_answers=len(watch.answers),
        healthz_failures=len(watch.failures),
        healthz_slowest_s=round(watch.slowest_s, 2),
    )
    assert gw.proc.poll() is None, "the gateway died"
    assert watch.answers and not watch.failures, f"/healthz failed during '{name}': {watch.failures[:5]}"
    assert peak - before < ATTACK_BOUND, f"'{name}' raised the gateway's peak RSS by {(peak - before) / MiB:.0f} MiB"
    return status, headers, body


def _problem(status: int, headers: dict, body: object) -> dict:
    assert 400 <= status < 500, f"expected a 4xx, got {status}: {str(body)[:300]}"
    assert headers.get("content-type", "").startswith("application/problem+json"), headers
    assert isinstance(body, dict) and body.get("status") == status, body
    return body


def _answer(r: httpx.Response) -> tuple[int, dict, object]:
    try:
        body: object = r.json()
    except ValueError:
        body = r.text
    return r.status_code, dict(r.headers), body


def test_hundred_blank_4000px_pngs_are_accepted_with_bounded_memory(hostile, tmp_path):
    path = tmp_path / "blank.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for i in range(100):
            z.writestr(f"blank/{i:03d}.png", blank_png(4000))
    assert path.stat().st_size < 50_000

    def send():
        with open(path, "rb") as f:
            files = {"file": ("blank.zip", f, "application/zip")}
            return _answer(hostile.client.http.post("/v1/datasets", files=files))

    status, _, body = attack(hostile, "100 blank 4000x4000 PNGs to /v1/datasets", send)
    assert status == 201, body
    assert (body["image_count"], body["image_size"], body["channels"]) == (100, 96, 1)


def test_upload_declaring_more_pixels_than_the_budget_is_refused_from_its_headers(hostile, tmp_path):
    """1,100 blank 4000x4000 PNGs (a zip of a few hundred KB) declare 17.6 billion pixels, over the
    default 2**34: refused before one is decoded, instead of costing the gateway many minutes of CPU."""
    path = tmp_path / "many.zip"
    png = blank_png(4000)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for i in range(1100):
            z.writestr(f"blank/{i:04d}.png", png)
    assert path.stat().st_size < 2 * MiB

    def send():
        with open(path, "rb") as f:
            return _answer(hostile.client.http.post("/v1/datasets", files={"file": ("many.zip", f, "application/zip")}))

    status, headers, body = attack(hostile, "1,100 blank 4000x4000 PNGs to /v1/datasets (pixel budget)", send)
    problem = _problem(status, headers, body)
    assert status == 422 and "pixels to decode" in problem["detail"], problem


@pytest.mark.parametrize("declared", [4 * GiB, MiB], ids=["declared-honestly", "declared-as-1MiB"])
def test_zip_with_a_4gib_zero_member_is_refused_cheaply(hostile, tmp_path, declared):
    path = zeros_zip(tmp_path / "zeros.zip", 4 * GiB, declared=declared)
    assert path.stat().st_size < 5 * MiB

    def send():
        with open(path, "rb") as f:
            files = {"file": ("zeros.zip", f, "application/zip")}
            return _answer(hostile.client.http.post("/v1/datasets", files=files))

    label = "honestly" if declared == 4 * GiB else "as 1 MiB"
    status, headers, body = attack(hostile, f"zip of one 4 GiB zero member declared {label}", send)
    problem = _problem(status, headers, body)
    assert status == 422 and "zeros/0.png" in problem["detail"], problem
    if declared == 4 * GiB:
        assert "expands to 4294967296 bytes, more than the limit of" in problem["detail"], problem


def _trained_model(hostile) -> str:
    job = hostile.client.wait(hostile.training_job, timeout=600, poll_s=0.5)
    assert job["status"] == "succeeded", job.get("error")
    return job["model_id"]


def _pngs(count: int) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (f"{i:03d}.png", blank_png(4000), "image/png")) for i in range(count)]


def test_512_blank_4000px_pngs_to_assign_are_refused_from_their_headers(hostile):
    """8.2 billion pixels (24 MB of PNGs): over the default budget of 2**30 per assign request, so
    refused from the headers alone, before any decoding (the gateway once held them all at full size)."""
    model_id = _trained_model(hostile)

    def send():
        return _answer(hostile.client.http.post(f"/v1/models/{model_id}/assign", files=_pngs(512)))

    status, headers, body = attack(hostile, "512 blank 4000x4000 PNGs to assign", send)
    problem = _problem(status, headers, body)
    assert status == 413 and problem["type"] == "urn:nnm:problem:too-large", problem
    assert "the 512 images declare 8192000000 pixels to decode, more than the limit of 1073741824" in problem["detail"]


def test_assign_within_the_budget_decodes_with_bounded_memory(hostile):
    """32 blank 4000x4000 PNGs (512 million pixels, under the budget) are assigned, a few at a time."""
    model_id = _trained_model(hostile)

    def send():
        return _answer(hostile.client.http.post(f"/v1/models/{model_id}/assign", files=_pngs(32)))

    status, _, body = attack(hostile, "32 blank 4000x4000 PNGs to assign", send)
    assert status == 200, body
    assert [r["filename"] for r in body] == [f"{i:03d}.png" for i in range(32)]
    assert len({r["cluster"] for r in body}) == 1  # identical images, identical answers
    bad = [*_pngs(3), ("files", ("broken.png", blank_png(4000)[:20_000], "image/png"))]
    status, headers, body = _answer(hostile.client.http.post(f"/v1/models/{model_id}/assign", files=bad))
    problem = _problem(status, headers, body)
    assert status == 422 and "broken.png" in problem["detail"], problem


def post_huge_json(base: str, path: str, size: int, timeout: float = 120) -> tuple[int, dict, object]:
    """POST a JSON array of `size` bytes (odd) without a key, streamed; stop sending once an answer comes.

    A raw socket, because a server may rightly answer and close before the body is sent, which an
    HTTP client reports as a broken pipe instead of the answer.
    """
    url = urlsplit(base)
    middle = (size - 3) // 2  # "[" + "0," * middle + "0]"
    pattern = memoryview(b"0," * (MiB // 2))
    deadline = time.monotonic() + timeout
    with socket.create_connection((url.hostname, url.port), timeout=timeout) as sock:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {url.netloc}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {size}\r\nConnection: close\r\n\r\n["
        )
        sock.sendall(head.encode())
        sock.setblocking(False)
        sent, closed = 0, False
        while sent < 2 * middle and time.monotonic() < deadline:
            readable, writable, _ = select.select([sock], [sock], [], 1.0)
            if readable:
                break  # the server answered (or closed) before the whole body: stop sending
            if writable:
                piece = pattern[sent % 2 : sent % 2 + min(len(pattern) - 2, 2 * middle - sent)]
                try:
                    sent += sock.send(piece)
                except (BrokenPipeError, ConnectionResetError):
                    closed = True
                    break
        if sent >= 2 * middle and not closed:
            with suppress(OSError):
                sock.setblocking(True)
                sock.sendall(b"0]")
        sock.setblocking(True)
        sock.settimeout(max(1.0, deadline - time.monotonic()))
        raw = b""
        with suppress(OSError):
            while chunk := sock.recv(65536):
                raw += chunk
    head_bytes, _, body_bytes = raw.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    assert lines and lines[0].startswith("HTTP/1.1 "), f"no HTTP answer after sending {sent} bytes: {raw[:200]!r}"
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    try:
        body: object = json.loads(body_bytes)
    except ValueError:
        body = body_bytes[:300]
    return status, headers, body


def test_anonymous_300mb_json_body_is_refused_before_it_is_read(hostile):
    status, headers, body = attack(
        hostile, "anonymous 300 MB JSON to /v1/jobs", lambda: post_huge_json(hostile.base, "/v1/jobs", 300_000_001)
    )
    _problem(status, headers, body)
    assert status in (401, 413), body


def test_gateway_survived_and_its_limit_held(hostile):
    assert hostile.proc.poll() is None
    assert httpx.get(f"{hostile.base}/healthz", timeout=10).status_code == 200
    with open(f"/proc/{hostile.proc.pid}/limits") as f:
        limits = f.read()
    assert str(hostile.address_limit) in limits, limits
    assert "MemoryError" not in hostile.log.read_text(errors="replace")
