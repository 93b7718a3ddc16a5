"""Memory sizes: the `--max-memory 8GB` parser and the process's resident set size."""

from __future__ import annotations

import os
import re
import resource
import sys

from .errors import InputError

UNITS = {"": 1, "b": 1,
         "k": 1024, "kb": 10**3, "kib": 2**10,
         "m": 1024**2, "mb": 10**6, "mib": 2**20,
         "g": 1024**3, "gb": 10**9, "gib": 2**30,
         "t": 1024**4, "tb": 10**12, "tib": 2**40}
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*$")


def parse_memory(text: str, what: str = "--max-memory") -> int:
    """'8GB' -> 8*10^9, '6GiB' -> 6*2^30, '512M' (binary) -> 512*2^20, '1000' -> 1000 bytes."""
    m = _SIZE.match(str(text))
    unit = m.group(2).lower() if m else None
    if m is None or unit not in UNITS:
        raise InputError(f"{what} {text!r} is not a size such as 8GB, 6GiB, 512MB or 1000000")
    n = int(float(m.group(1)) * UNITS[unit])
    if n <= 0:
        raise InputError(f"{what} {text!r} must be more than zero bytes")
    return n


def format_bytes(n: float) -> str:
    """1234567890 -> '1.23 GB' (decimal units, as --max-memory reads them)."""
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def current_rss() -> int:
    """Resident set size of this process now, in bytes (Linux /proc; else the peak)."""
    try:
        with open("/proc/self/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return peak_rss()


def peak_rss() -> int:
    """Peak resident set size of this process so far, in bytes (ru_maxrss)."""
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r if sys.platform == "darwin" else r * 1024
