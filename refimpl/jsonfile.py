"""JSON from files we did not write (config.json, an index, a safetensors header): parsed
exactly as JSON says, and nothing more.

Python's json module accepts NaN, Infinity and -Infinity (not JSON) and keeps the last of
duplicate keys (so two readers can disagree on a file); both are refused here. A file is read
only if it is a regular file of bounded size (a FIFO or /dev/zero would hang a reader)."""

from __future__ import annotations

import json
import math
import os
import re
import stat
import sys

from .errors import RefimplError, printable

MAX_JSON_FILE = 64 * 1024 * 1024  # far above any config.json or index (V3's index: 9 MB)


class _Refused(ValueError):
    pass


def _no_constant(name):
    raise _Refused(f"{name} is not a JSON number")


def _no_duplicates(pairs):
    d = dict(pairs)
    if len(d) != len(pairs):
        seen = set()
        for k, _ in pairs:
            if k in seen:
                raise _Refused(f"duplicate key {printable(k)[:80]!r}")
            seen.add(k)
    return d


def loads(text: str | bytes, where: str, error=RefimplError, allow_nonfinite: bool = False):
    """Parse strict JSON -> the value; `error(f"{where}: ...")` on anything else.
    allow_nonfinite: read NaN/Infinity as floats, for a caller that refuses them itself naming
    the field (see `nonfinite_path`)."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return json.loads(text, parse_constant=float if allow_nonfinite else _no_constant,
                          object_pairs_hook=_no_duplicates)
    except _Refused as e:
        raise error(f"{where}: not valid JSON: {e}") from None
    except UnicodeDecodeError as e:
        raise error(f"{where}: not valid UTF-8 ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise error(f"{where}: not valid JSON ({e.msg}: line {e.lineno} column {e.colno})") from None
    except RecursionError:
        raise error(f"{where}: JSON nested too deeply") from None
    except ValueError as e:  # Python's limit on the digits of an integer (int-str conversion)
        raise error(f"{where}: {_too_many_digits(text) or f'not valid JSON ({printable(e)})'}") from None


def _too_many_digits(text) -> str | None:
    """Where `text` holds an integer longer than Python converts (sys.get_int_max_str_digits,
    4300 by default), in words: its digits, line, column and the key before it."""
    limit = sys.get_int_max_str_digits() if hasattr(sys, "get_int_max_str_digits") else 0
    if not limit or not isinstance(text, str):
        return None
    m = re.search(r"[:\[,]\s*-?(\d{%d,})" % (limit + 1), text)
    if m is None:
        return None
    start = m.start(1)
    line = text.count("\n", 0, start) + 1
    col = start - (text.rfind("\n", 0, start) + 1) + 1
    key = re.search(r'"((?:[^"\\]|\\.){0,80})"\s*:\s*-?$', text[max(0, start - 200):start])
    field = f" (field {printable(key.group(1))!r})" if key else ""
    return (f"an integer of {len(m.group(1)):,} digits at line {line} column {col}{field}; "
            f"integers of more than {limit:,} digits are not read")


def open_regular(path: str, error=RefimplError):
    """-> (an open descriptor, its stat) of `path`, which must be a regular file: opened without
    blocking (a FIFO does not hang) and checked on the descriptor, so nothing swaps it between
    the check and the read.  The caller closes the descriptor."""
    shown = printable(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise error(f"{shown}: file not found") from None
    except OSError as e:
        raise error(f"{shown}: cannot read ({e.strerror})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise error(f"{shown}: not a regular file")
    return fd, st


def read_regular(path: str, error=RefimplError, limit: int = MAX_JSON_FILE) -> bytes:
    """The bytes of `path`, which must be a regular file of at most `limit` bytes."""
    shown = printable(path)
    fd, st = open_regular(path, error)
    with os.fdopen(fd, "rb") as f:
        if st.st_size > limit:
            raise error(f"{shown}: {st.st_size:,} bytes, more than the {limit:,} allowed for it")
        try:
            data = f.read(limit + 1)
        except OSError as e:
            raise error(f"{shown}: cannot read ({e.strerror})") from None
    if len(data) > limit:
        raise error(f"{shown}: more than the {limit:,} bytes allowed for it")
    return data


def load(path: str | os.PathLike, error=RefimplError, limit: int = MAX_JSON_FILE,
         allow_nonfinite: bool = False):
    """A strict JSON file -> its value."""
    path = os.fspath(path)
    return loads(read_regular(path, error, limit), printable(path), error, allow_nonfinite)


def nonfinite_path(value, path: str = "") -> str | None:
    """The dotted path of the first NaN or infinite float inside a parsed JSON value, or None."""
    stack = [(value, path)]
    while stack:
        v, p = stack.pop()
        if isinstance(v, float) and not math.isfinite(v):
            return p or "(the value)"
        if isinstance(v, dict):
            stack.extend((x, f"{p}.{k}" if p else str(k)) for k, x in reversed(v.items()))
        elif isinstance(v, list):
            stack.extend((x, f"{p}[{i}]") for i, x in reversed(list(enumerate(v))))
    return None
