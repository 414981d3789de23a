"""How much memory this process has held at its peak: the figure a "fits in N GB" bar is judged by."""

from __future__ import annotations

import sys


def peak_rss_bytes() -> int | None:
    """The largest resident set this process has had so far, in bytes (None where the OS won't say).

    The kernel keeps the figure (`ru_maxrss`), so no sampling can miss a short peak. It only rises:
    read after each stage, the stage that raised it is the one that set the run's peak.
    """
    try:
        import resource
    except ImportError:  # Windows
        return None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB on Linux
