"""Small files that ask for a lot of memory: blank large PNGs and zips of zeros, made cheaply.

Shared by the loader's unit tests (tests/test_data.py) and the gateway's memory test
(tests/service/test_hostile_memory.py).
"""

from __future__ import annotations

import functools
import io
import os
import struct
import zlib
from pathlib import Path

from PIL import Image

MiB = 1024**2
GiB = 1024**3


@functools.lru_cache(maxsize=8)
def blank_png(side: int = 4000, mode: str = "RGB") -> bytes:
    """A black `side` x `side` PNG: about 47 KB for 4000 x 4000 RGB, 48 MB once decoded."""
    buf = io.BytesIO()
    Image.new(mode, (side, side)).save(buf, format="PNG")
    return buf.getvalue()


def _crc_of_zeros(n: int) -> int:
    crc, block = 0, bytes(MiB)
    for _ in range(n // MiB):
        crc = zlib.crc32(block, crc)
    return zlib.crc32(bytes(n % MiB), crc)


def zeros_zip(path: Path, size: int, name: str = "zeros/0.png", declared: int | None = None, crc: bool = True) -> Path:
    """A zip holding one deflated member of `size` zero bytes, written in well under a second.

    `declared` is the uncompressed size the headers state (default: `size`, honestly); a smaller one
    makes a member that lies, with the CRC of its first `declared` bytes, so a reader that trusts the
    header sees a valid member. `crc=False` writes 0 instead of computing the CRC (about 0.3 s per GiB).
    `size` must be a multiple of 1 MiB. The deflate stream is one compressed MiB of zeros repeated: after
    a full flush a deflate stream does not refer back, so the copies concatenate into a valid stream.
    """
    if size % MiB:
        raise ValueError("size must be a multiple of 1 MiB")
    declared = size if declared is None else declared
    co = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = co.compress(bytes(MiB)) + co.flush(zlib.Z_FULL_FLUSH)
    tail = co.flush()
    csize = len(block) * (size // MiB) + len(tail)
    checksum = _crc_of_zeros(declared) if crc else 0
    zip64 = declared >= 0xFFFFFFFF or csize >= 0xFFFFFFFF
    raw_name = name.encode()
    extra = struct.pack("<2H2Q", 1, 16, declared, csize) if zip64 else b""
    sizes = (0xFFFFFFFF, 0xFFFFFFFF) if zip64 else (csize, declared)
    version = 45 if zip64 else 20
    date = (1 << 5) | 1  # 1980-01-01
    local = struct.pack("<4s5H3L2H", b"PK\x03\x04", version, 0, 8, 0, date, checksum, *sizes, len(raw_name), len(extra))
    central = struct.pack(
        "<4s6H3L5H2L", b"PK\x01\x02", version, version, 0, 8, 0, date, checksum, *sizes, len(raw_name), len(extra),
        0, 0, 0, 0o100644 << 16, 0,
    )
    with open(path, "wb") as f:
        f.write(local + raw_name + extra)
        for _ in range(size // MiB):
            f.write(block)
        f.write(tail)
        cd_offset = f.tell()
        f.write(central + raw_name + extra)
        cd_size = f.tell() - cd_offset
        f.write(struct.pack("<4s4H2LH", b"PK\x05\x06", 0, 0, 1, 1, cd_size, cd_offset, 0))
    return path


def peak_rss_bytes(pid: int | str = "self") -> tuple[int, int]:
    """(current RSS, peak RSS since start or the last `reset_peak_rss`) of a process, in bytes."""
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024
    return values["VmRSS"], values["VmHWM"]


def reset_peak_rss(pid: int | str = "self") -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of a process to its current RSS; False where not allowed."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def can_measure_peak_rss() -> bool:
    return os.path.exists("/proc/self/status") and reset_peak_rss()
