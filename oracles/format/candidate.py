"""A candidate directory, read as untrusted input like a golden suite (untrusted.py):

    CANDIDATE/engine.json                      what `oracles run --engine` recorded (ENGINE_SCHEMA)
    CANDIDATE/cases/<id>/outputs.safetensors   the candidate's outputs (`Outputs`, read lazily)
    CANDIDATE/cases/<id>/skip.txt              one line: why the engine cannot run the case (SKIP)
    CANDIDATE/cases/<id>/error.txt             one line: the engine refused or crashed (ERROR)

Every path is checked before it is opened (untrusted.inside: after following symlinks it stays
inside CANDIDATE, and it is a regular file: a FIFO, a device or a symlink leading out is refused
without being opened), every file is read through one descriptor opened with O_NOFOLLOW |
O_NONBLOCK, and every read is bounded. engine.json is strict JSON (refimpl.jsonfile: no duplicate
keys, NaN or Infinity, bounded nesting) checked against a schema. A candidate's outputs file is
opened header first (checked as strictly as a checkpoint's, at most MAX_OUTPUTS_HEADER bytes) and
a tensor's bytes are read only when the checker asks for it, which it does only after its shape
and dtype matched the expected output: a huge tensor the case does not need is never read, and
one it needs can be no larger than the golden's own.

The text of skip.txt and error.txt is kept to its first line, printable characters only; every
field is escaped again where it is printed (untrusted.escape).
"""

from __future__ import annotations

import os
import re
import struct
from collections.abc import Mapping

import numpy as np

from refimpl import jsonfile
from refimpl.checkpoint import parse_header
from refimpl.errors import RefimplError, printable
from refimpl.layout import DTYPES

from .. import OraclesError
from . import untrusted
from .tolerances import PROFILES

OUTPUTS_FILE = "outputs.safetensors"
SKIP_FILE, ERROR_FILE = "skip.txt", "error.txt"
ENGINE_FILE = "engine.json"
MAX_ENGINE_JSON = 16 << 20  # bytes; `oracles run` writes a few KB
MAX_OUTPUTS_HEADER = 16 << 20  # bytes of a candidate's safetensors header (the format allows 100 MB)
MAX_NOTE_READ = 4096  # bytes of skip.txt / error.txt read: the first line is what counts
SKIP_CHARS, ERROR_CHARS = 200, 2000


# ---------------------------------------------------------------------------------------------
# skip.txt and error.txt
# ---------------------------------------------------------------------------------------------

def note(root: str, case_id: str, name: str) -> str | None:
    """The first line of CANDIDATE/cases/<id>/<name> (printable characters, stripped), "" for an
    empty file, None when there is none. The file must be a regular file inside CANDIDATE."""
    untrusted.check_name(case_id, "case id", nested=False)
    what = f"candidate {name} of case {case_id!r}"
    real = untrusted.inside(root, f"cases/{case_id}/{name}", what, missing_ok=True)
    if real is None:
        return None
    fd = untrusted.open_regular(real, what)
    try:
        with os.fdopen(fd, "rb") as f:
            head = f.read(MAX_NOTE_READ)
    except OSError as e:
        raise OraclesError(f"{printable(real)}: {what} cannot be read ({e.strerror})") from None
    line = head.decode("utf-8", "replace").splitlines()[:1]
    return "".join(ch for ch in (line[0] if line else "") if ch.isprintable()).strip()


def one_line(reason) -> str:
    """A reason as the one line error.txt holds: whitespace and newlines folded, printable
    characters only, at most ERROR_CHARS, never empty."""
    text = " ".join("".join(ch if ch.isprintable() else " " for ch in str(reason)).split())
    return text[:ERROR_CHARS] or "the engine failed (no message)"


def write_error(case_dir: str, reason) -> None:
    """CANDIDATE/cases/<id>/error.txt (what `oracles run` writes when the engine refused or
    crashed on the case): the reason, one line (`one_line`), read back by error_reason."""
    os.makedirs(case_dir, exist_ok=True)
    with open(os.path.join(case_dir, ERROR_FILE), "w", encoding="utf-8") as f:
        f.write(one_line(reason) + "\n")


def skip_reason(root: str, case_id: str):
    """True, or the reason in skip.txt (at most SKIP_CHARS characters)."""
    r = note(root, case_id, SKIP_FILE)
    if r is None:
        return True
    return r[:SKIP_CHARS] or "skipped (empty skip.txt)"


def error_reason(root: str, case_id: str) -> str | None:
    """The engine's refusal in error.txt (at most ERROR_CHARS characters), or None."""
    r = note(root, case_id, ERROR_FILE)
    if r is None:
        return None
    r = r[:ERROR_CHARS] or "(empty error.txt)"
    return f"the engine reported an error ({ERROR_FILE}): {r}"


# ---------------------------------------------------------------------------------------------
# outputs.safetensors, lazily
# ---------------------------------------------------------------------------------------------

class Tensor:
    """One tensor of an `Outputs` file: shape and dtype from the header; its bytes are read
    when it is converted to an array (np.asarray), once."""

    def __init__(self, outputs: Outputs, name: str):
        dtype, shape, _ = outputs.tensors[name]
        self._outputs, self.name = outputs, name
        self.shape, self.dtype = shape, DTYPES[dtype]
        self._array = None

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def __array__(self, dtype=None, copy=None):
        if self._array is None:
            self._array = self._outputs.read(self.name)
        a = self._array
        return a if dtype is None else a.astype(dtype)


class Outputs(Mapping):
    """A candidate's outputs.safetensors: {name: Tensor}. The header is read and checked on
    opening (through one descriptor: O_NOFOLLOW, regular file, at most MAX_OUTPUTS_HEADER bytes,
    refimpl.checkpoint.parse_header's checks: offsets inside the file, no overlap, no hole);
    a tensor's bytes are read with pread only when asked for (`Tensor`)."""

    def __init__(self, real: str, what: str, unlink: bool = False):
        self.path, self.what = real, what
        self.shown = printable(real)
        self._fd = untrusted.open_regular(real, what)
        if unlink:  # a file handed over by an adapter process: gone once opened
            try:
                os.unlink(real)
            except OSError:
                pass
        try:
            size = os.fstat(self._fd).st_size
            head = os.pread(self._fd, 8, 0)
            if len(head) < 8:
                raise OraclesError(f"{self.shown}: {what} is too short for a safetensors file "
                                   f"({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise OraclesError(f"{self.shown}: {what}: header length {n} is larger than the "
                                   f"file ({size} bytes): truncated or not safetensors")
            if n > MAX_OUTPUTS_HEADER:
                raise OraclesError(f"{self.shown}: {what}: a header of {n:,} bytes, more than the "
                                   f"{MAX_OUTPUTS_HEADER:,} a candidate's outputs may have")
            raw = self._pread(n, 8)
            try:
                self.tensors, self.data_start = parse_header(raw, size, self.shown)
            except RefimplError as e:
                raise OraclesError(f"{what}: {e}") from None
        except BaseException:
            self.close()
            raise

    def _pread(self, n: int, offset: int) -> bytes:
        parts, got = [], 0
        while got < n:
            try:
                b = os.pread(self._fd, min(n - got, 1 << 30), offset + got)
            except OSError as e:
                raise OraclesError(f"{self.shown}: {self.what} cannot be read ({e.strerror})") from None
            if not b:
                raise OraclesError(f"{self.shown}: {self.what} shrank while being read")
            parts.append(b)
            got += len(b)
        return b"".join(parts)

    def read(self, name: str) -> np.ndarray:
        """The tensor's values (read now, from the descriptor: nothing else of the file)."""
        dtype, shape, (begin, end) = self.tensors[name]
        raw = self._pread(end - begin, self.data_start + begin)
        return np.frombuffer(raw, dtype=DTYPES[dtype]).reshape(shape)

    def close(self) -> None:
        fd, self._fd = getattr(self, "_fd", None), None
        if fd is not None:
            os.close(fd)

    def __del__(self):
        self.close()

    def __getitem__(self, name):
        if name not in self.tensors:
            raise KeyError(name)
        return Tensor(self, name)

    def __contains__(self, name) -> bool:
        return name in self.tensors

    def __iter__(self):
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)


def outputs(root: str, case_id: str) -> Outputs | None:
    """CANDIDATE/cases/<id>/outputs.safetensors opened lazily (`Outputs`), or None."""
    untrusted.check_name(case_id, "case id", nested=False)
    what = f"candidate outputs of case {case_id!r}"
    real = untrusted.inside(root, f"cases/{case_id}/{OUTPUTS_FILE}", what, missing_ok=True)
    return None if real is None else Outputs(real, what)


# ---------------------------------------------------------------------------------------------
# engine.json
# ---------------------------------------------------------------------------------------------

# key -> (required, what its value must be)
ENGINE_SCHEMA = {
    "engine": (True, "a string"), "version": (True, "a string"),
    "options": (True, "an object of strings, numbers, booleans or null"),
    "serving": (False, "a string (how the engine runs serving schedules)"),
    "skipped": (False, "an object of case id -> reason (a string)"),
    "errors": (False, "an object of case id -> the engine's error (a string)"),
    "mode": (False, "the profile that emulates the run (" + ", ".join(PROFILES) + ") or null"),
    "question_digest": (False, "the question digest (64 hex digits) of the suite the outputs "
                               "were written for"),
    "inputs_digest": (False, "the inputs digest (64 hex digits) of the suite the outputs were "
                             "written for"),
}
MAX_FIELD_CHARS = 10_000


def _scalar(v) -> bool:
    return v is None or isinstance(v, (str, bool, int, float))


def read_engine_info(root: str) -> dict | None:
    """CANDIDATE/engine.json as `oracles run --engine` wrote it -> {engine, version, options,
    serving (when recorded), skipped, errors} (skipped and errors: {} when absent), or None when there is none. Refused
    with one line: a file that is not a regular file inside CANDIDATE, larger than
    MAX_ENGINE_JSON, not strict JSON, or not of ENGINE_SCHEMA (an unknown key included)."""
    real = untrusted.inside(root, ENGINE_FILE, "candidate engine.json", missing_ok=True)
    if real is None:
        return None
    path = os.path.join(root, ENGINE_FILE)
    info = jsonfile.loads(untrusted.read_bytes(real, "candidate engine.json", MAX_ENGINE_JSON),
                          printable(path), OraclesError)
    if not isinstance(info, dict):
        raise OraclesError(f"{printable(path)}: must be a JSON object with "
                           f"{', '.join(ENGINE_SCHEMA)}")
    for k in info:
        if k not in ENGINE_SCHEMA:
            raise OraclesError(f"{printable(path)}: unknown field {printable(k)[:80]!r} (an "
                               f"engine.json has {', '.join(ENGINE_SCHEMA)})")
    for k, (required, want) in ENGINE_SCHEMA.items():
        if k not in info and not required:
            continue
        v = info.get(k)
        if k in ("engine", "version", "serving"):
            ok = isinstance(v, str) and len(v) <= MAX_FIELD_CHARS
        elif k in ("question_digest", "inputs_digest"):
            ok = isinstance(v, str) and re.fullmatch(r"[0-9a-f]{64}", v) is not None
        elif k == "mode":
            ok = v is None or v in PROFILES
        elif k == "options":
            ok = isinstance(v, dict) and all(_scalar(x) and len(str(x)) <= MAX_FIELD_CHARS
                                             for x in v.values())
        else:
            ok = isinstance(v, dict) and all(isinstance(x, str) for x in v.values())
        if not ok:
            raise OraclesError(f"{printable(path)}: field {k!r} must be {want}"
                               + ("" if k in ("skipped", "errors", "mode", "question_digest", "inputs_digest") else
                                  f", of at most {MAX_FIELD_CHARS:,} characters"))
    out = {"engine": info["engine"], "version": info["version"], "options": info["options"],
           "skipped": info.get("skipped", {}), "errors": info.get("errors", {})}
    if "serving" in info:  # how the engine runs serving schedules (when recorded)
        out["serving"] = info["serving"]
    if "mode" in info:  # (absent in a file written before runs recorded their mode)
        out["mode"] = info["mode"]
    for k in ("question_digest", "inputs_digest"):  # the suite the outputs answer (when recorded)
        if k in info:
            out[k] = info[k]
    return out
