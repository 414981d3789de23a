"""Worker liveness that does not depend on the broker.

`celery inspect ping` goes through Redis: during a Redis outage every worker would fail its liveness
probe and be restarted, each restart handing back (and burning an attempt of) the job it was running.
Instead the worker's main process touches a file every few seconds, and the probe
(`python -m nnm.service.worker.liveness`) checks only that file's age.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import threading
import time
from pathlib import Path

#: Seconds between touches of the heartbeat file.
BEAT_S = 10.0


def heartbeat_path(work_dir: Path) -> Path:
    return Path(work_dir) / ".worker-alive"


class LivenessBeat(threading.Thread):
    """Touches the heartbeat file every `BEAT_S` seconds while the worker process lives."""

    def __init__(self, path: Path, interval_s: float = BEAT_S):
        super().__init__(name="nnm-liveness", daemon=True)
        self.path, self.interval_s = path, interval_s
        self.stopped = threading.Event()

    def run(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            with contextlib.suppress(OSError):  # a disk that cannot be written shows up as a stale file
                self.path.touch()
            if self.stopped.wait(self.interval_s):
                return


def is_alive(path: Path, max_age_s: float) -> tuple[bool, str]:
    """Whether the heartbeat file was touched within `max_age_s` seconds, and why not."""
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return False, f"no heartbeat file at {path}"
    if age > max_age_s:
        return False, f"the worker's heartbeat is {age:.0f} s old (limit {max_age_s:.0f} s)"
    return True, f"heartbeat {age:.0f} s old"


def main(argv: list[str] | None = None) -> int:
    """Exit 0 when the worker on this host is alive (for liveness probes), 1 otherwise."""
    from ..settings import load_settings

    ap = argparse.ArgumentParser(prog="python -m nnm.service.worker.liveness", description=main.__doc__)
    ap.add_argument("--max-age", type=float, default=120.0, help="seconds (default 120)")
    args = ap.parse_args(argv)
    ok, why = is_alive(heartbeat_path(load_settings().work_dir), args.max_age)
    print(why, file=sys.stdout if ok else sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
