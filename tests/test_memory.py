"""The process's peak resident memory, as the pipeline records it after each stage."""

import json
import subprocess
import sys


def test_the_peak_counts_memory_that_was_touched_and_keeps_it_after_it_is_freed():
    # In a fresh process, so that no earlier test's peak hides the allocation.
    code = (
        "import json, numpy as np\n"
        "from nnm.engine.memory import peak_rss_bytes\n"
        "def rss():\n"
        "    line = next(x for x in open('/proc/self/status') if x.startswith('VmRSS:'))\n"
        "    return int(line.split()[1]) * 1024\n"
        "before, now = peak_rss_bytes(), rss()\n"
        "a = np.ones(300 * 2**20, dtype=np.uint8)\n"
        "during = peak_rss_bytes()\n"
        "del a\n"
        "print(json.dumps([before, now, during, peak_rss_bytes()]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    before, now, during, after = json.loads(out.stdout)
    assert 10 * 2**20 < now <= before < 2**31
    # The peak (it may already have been above the resident set) rises to hold the 300 MiB written.
    assert during >= now + 295 * 2**20 and during >= before
    assert after == during  # a peak, not the current size
