"""Reading a golden suite (or a candidate directory) that someone else made: names that stay
inside it, files that are regular files, reads that end, and text that prints as one line.

Every name taken from a manifest is checked as text BEFORE any path is built from it
(`check_name`), and every path is checked on disk before it is opened (`inside`): resolved with
its symlinks, it must stay under the directory's own resolved path, and it must be a regular
file (or a directory where one is expected), never a FIFO, a device or a socket. Files are then
opened with O_NOFOLLOW | O_NONBLOCK on the resolved path and checked again on the open
descriptor, so a FIFO swapped in after the check does not block and a symlink swapped in is not
followed. A reader that takes a path (refimpl's safetensors and config readers) gets the resolved,
checked path.
"""

from __future__ import annotations

import hashlib
import os
import stat

from refimpl.errors import printable

from .. import OraclesError

MAX_COMPONENT = 255  # bytes, as most file systems allow
MAX_NAME = 1024
MAX_MANIFEST = 64 << 20  # bytes: the full-width suite's manifest is ~0.2 MB


def escape(text) -> str:
    """`text` with every character that is not printable (control characters, line and
    paragraph separators, bidi overrides) written as a Python escape: it prints as what it is,
    on one line, and cannot forge report lines or move the cursor (refimpl.errors.printable,
    the one escaper of both command lines)."""
    return printable(text)


def check_name(name, what: str, nested: bool = True) -> str:
    """A plain relative name: a non-empty string of printable characters, no NUL, no backslash,
    not absolute, no empty, '.' or '..' component (`nested` False: a single component) -> name."""
    if not isinstance(name, str):
        raise OraclesError(f"{what}: a name must be a string, not {type(name).__name__}")
    bad = None
    if not name:
        bad = "is empty"
    elif len(name.encode("utf-8", "surrogatepass")) > MAX_NAME:
        bad = f"is longer than {MAX_NAME} bytes"
    elif not name.isprintable():
        bad = "holds control or non-printable characters"
    elif "\\" in name:
        bad = "holds a backslash"
    elif name.startswith("/"):
        bad = "is an absolute path"
    elif not nested and "/" in name:
        bad = "holds a '/'"
    else:
        for part in name.split("/"):
            if part in ("", ".", ".."):
                bad = f"has a {part!r} path component" if part else "has an empty path component"
                break
            if len(part.encode("utf-8", "surrogatepass")) > MAX_COMPONENT:
                bad = f"has a path component longer than {MAX_COMPONENT} bytes"
                break
    if bad:
        raise OraclesError(f"{what} {name!r} {bad}: names must be plain relative names inside the suite")
    return name


def inside(root: str, rel: str, what: str, kind: str = "file", missing_ok: bool = False):
    """The resolved path of root/rel, checked: it stays inside root (after following symlinks)
    and is a regular file (kind 'file') or a directory (kind 'dir'). `rel` must have passed
    check_name. -> the path, or None when it does not exist and missing_ok."""
    base = os.path.realpath(root)
    path = os.path.join(root, rel)
    real = os.path.realpath(path)
    if os.path.commonpath([base, real]) != base:
        raise OraclesError(f"{path}: {what} leads outside {root} (to {real}); refusing to read it")
    try:
        st = os.stat(real)
    except FileNotFoundError:
        if missing_ok:
            return None
        raise OraclesError(f"{path}: {what} is missing") from None
    except OSError as e:
        raise OraclesError(f"{path}: {what} cannot be read ({e.strerror})") from None
    if kind == "dir":
        if not stat.S_ISDIR(st.st_mode):
            raise OraclesError(f"{path}: {what} is not a directory")
    elif not stat.S_ISREG(st.st_mode):
        raise OraclesError(f"{path}: {what} is {_describe(st.st_mode)}, not a regular file")
    return real


def _describe(mode: int) -> str:
    for test, words in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
                        (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                        (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return words
    return "a special file"


def open_regular(real: str, what: str) -> int:
    """Open a path that `inside` returned -> a descriptor of a regular file (checked on the
    descriptor itself: a FIFO or symlink swapped in since is refused without blocking)."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) \
        | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(real, flags)
    except OSError as e:
        raise OraclesError(f"{real}: {what} cannot be opened ({e.strerror})") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OraclesError(f"{real}: {what} is not a regular file")
    return fd


def read_bytes(real: str, what: str, limit: int) -> bytes:
    """The whole of a checked regular file, refusing one larger than `limit` bytes."""
    fd = open_regular(real, what)
    with os.fdopen(fd, "rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise OraclesError(f"{real}: {what} is larger than {limit} bytes")
    return data


def sha256_file(real: str, what: str) -> str:
    """sha256 of a checked regular file; reads stop at its end (a regular file ends)."""
    h = hashlib.sha256()
    fd = open_regular(real, what)
    try:
        with os.fdopen(fd, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError as e:
        raise OraclesError(f"{real}: {what} cannot be read ({e.strerror})") from None
    return h.hexdigest()


def listed_tree(root: str) -> list[str]:
    """Every entry under `root` as relative names with '/', not following symlinks: files,
    symlinks and special files (directories themselves are not listed)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        rel = os.path.relpath(dirpath, root)
        for n in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            out.append(n if rel == "." else f"{rel.replace(os.sep, '/')}/{n}")
    return sorted(out)
