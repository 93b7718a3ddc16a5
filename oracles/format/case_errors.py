"""A case an engine refused or crashed on, recorded on the file route (docs/conformance.md
section 5, route 2): `oracles run` writes CANDIDATE/cases/<id>/error.txt (one line: the reason)
instead of outputs.safetensors, and `oracles check GOLDEN CANDIDATE` reports the case as ERROR
with that reason, never as missing. The file is read as untrusted input: a regular file inside
the candidate (symlinks leading out, FIFOs and devices refused), at most MAX_ERROR_BYTES, its
first line only; the report escapes it when printing.
"""

from __future__ import annotations

import os

from .. import OraclesError
from . import untrusted

ERROR_FILE = "error.txt"
MAX_ERROR_BYTES = 4096
MAX_REASON = 2000  # characters kept of the first line


def one_line(reason) -> str:
    """A reason as one line (newlines folded, nothing empty)."""
    text = " ".join(str(reason).split()) or "the engine failed (no message)"
    return text[:MAX_REASON]


def write_error(case_dir: str, reason) -> None:
    """CANDIDATE/cases/<id>/error.txt: the reason, one line."""
    os.makedirs(case_dir, exist_ok=True)
    with open(os.path.join(case_dir, ERROR_FILE), "w", encoding="utf-8") as f:
        f.write(one_line(reason) + "\n")


def read_error(candidate: str, case_id: str) -> str | None:
    """The recorded reason of case `case_id` in a candidate directory, or None when it has no
    error.txt. Refused (one line, exit 2) when the file is not a regular file inside the
    candidate or is larger than MAX_ERROR_BYTES."""
    what = f"candidate error file of case {case_id!r}"
    real = untrusted.inside(candidate, f"cases/{case_id}/{ERROR_FILE}", what, missing_ok=True)
    if real is None:
        return None
    data = untrusted.read_bytes(real, what, MAX_ERROR_BYTES)
    lines = data.decode("utf-8", "replace").splitlines()
    line = lines[0].strip() if lines else ""
    if not line:
        raise OraclesError(f"{real}: {what} is empty: it must say why the case failed")
    return line[:MAX_REASON]
