"""Nothing half written: every output is built under a temporary name beside its destination and
renamed into place only when complete (docs/validation.md, "Writes").

    check_destination(path, "file" | "directory")   before the work: a usable destination?
    atomic_file(path)        -> an open file; on success it replaces `path` by rename
    atomic_directory(path)   -> a fresh directory; on success it becomes `path` by rename

Rules shared by both:
- the destination's parent must exist and be a directory; the destination must not be a symbolic
  link (a rename would replace the link, not what it points to); a file destination must not be a
  directory; a directory destination must not exist or be an empty directory (never merged into);
- temporaries are named `.NAME.<tag>-tmp-<host>-<pid>-<random>` beside NAME; those made on this
  machine by a process no longer alive (a killed earlier run) are removed before a new one is made;
- permissions follow the umask (files 0666 & ~umask, directories 0777 & ~umask), as any new file;
- losing a race (another writer created or replaced the destination meanwhile) is an error, and
  the loser's temporary is removed;
- every failure is `error` (a RefimplError subclass: one line, exit 2 in the command lines).
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import socket
import stat

from .errors import RefimplError, printable

# This machine's name in temporaries: a process id is only meaningful on the machine (or in the
# container) that made it, and a shared directory may be written from several.
HOST = re.sub(r"[^A-Za-z0-9]", "", socket.gethostname())[:32] or "host"
_STALE = r"^\..+\.{tag}-tmp-{host}-(\d+)-[0-9a-f]+$"


def _tmp_name(dest: str, tag: str) -> str:
    parent, base = os.path.split(dest)
    return os.path.join(parent, f".{base}.{tag}-tmp-{HOST}-{os.getpid()}-{secrets.token_hex(4)}")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True  # exists under another user, or not a pid we can judge: leave it
    return True


def remove_stale(parent: str, tag: str = "refimpl") -> list[str]:
    """Remove temporaries of kind `tag` in `parent` made on this machine by a process that is no
    longer alive -> their paths."""
    pattern = re.compile(_STALE.format(tag=re.escape(tag), host=re.escape(HOST)))
    removed = []
    try:
        names = os.listdir(parent)
    except OSError:
        return removed
    for name in names:
        m = pattern.match(name)
        if not m or _alive(int(m.group(1))):
            continue
        p = os.path.join(parent, name)
        try:
            if os.path.isdir(p) and not os.path.islink(p):
                shutil.rmtree(p)
            else:
                os.unlink(p)
            removed.append(p)
        except OSError:
            pass  # someone else removed it, or it is not ours to remove
    return removed


def _identity(st: os.stat_result | None):
    return None if st is None else (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def distinct_destinations(paths: dict, error=RefimplError) -> None:
    """Refuse, before any work, two destinations ({flag: path}, None for an unused flag) that
    name the same file: the same path, different spellings of it (`./x`, `d/../x`), a directory
    reached through a symbolic link, or two hard links of one existing file. The second write
    would replace the first (or lose a race with it)."""
    seen = []
    for flag, path in paths.items():
        if not path:
            continue
        path = os.fspath(path)
        parent = os.path.realpath(os.path.dirname(os.path.abspath(path)))
        key = os.path.join(parent, os.path.basename(os.path.abspath(path)))
        for other_flag, other_path, other_key in seen:
            same = key == other_key
            if not same and os.path.exists(key) and os.path.exists(other_key):
                same = os.path.samefile(key, other_key)
            if same:
                raise error(f"{flag} {printable(path)} and {other_flag} {printable(other_path)} "
                            "name the same file; give each output its own path")
        seen.append((flag, path, key))


def check_destination(path: str | os.PathLike, kind: str = "file", error=RefimplError):
    """Refuse an unusable destination before any work is done -> a token for `atomic_file`
    (what the destination was, so that a concurrent writer is noticed at the rename)."""
    path = os.fspath(path)
    shown = printable(path)
    if not path:
        raise error("the output path is empty")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        what = "does not exist" if not os.path.lexists(parent) else "is not a directory"
        raise error(f"{shown}: cannot write there: the directory {printable(parent)} {what}")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        raise error(f"{shown}: cannot write there ({e.strerror})") from None
    if st is not None and stat.S_ISLNK(st.st_mode):
        target = "a missing file" if not os.path.exists(path) else printable(os.path.realpath(path))
        raise error(f"{shown}: is a symbolic link (to {target}); give the real path to write")
    if kind == "file":
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise error(f"{shown}: is a directory; expected a file name to write")
        if st is not None and not stat.S_ISREG(st.st_mode):
            raise error(f"{shown}: exists and is not a regular file; refusing to replace it")
    elif kind == "directory":
        if st is not None and not stat.S_ISDIR(st.st_mode):
            raise error(f"{shown}: is a file; expected a directory to create (or an empty one)")
        try:
            full = st is not None and bool(os.listdir(path))
        except OSError as e:
            raise error(f"{shown}: cannot list it ({e.strerror})") from None
        if full:
            raise error(f"{shown}: already exists and is not an empty directory; refusing to "
                        "merge into it")
    else:
        raise ValueError(kind)
    if not os.access(parent, os.W_OK):
        raise error(f"{shown}: cannot write in {printable(parent)} (permission denied)")
    return _identity(st)


def _failed(path: str, e: OSError, error):
    return error(f"{printable(path)}: cannot write ({e.strerror or e})")


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike, error=RefimplError, tag: str = "refimpl",
                text: bool = False, expect=...):
    """Yield an open file (binary, or UTF-8 text) under a temporary name beside `path`; when the
    block ends without error it is flushed, synced and renamed to `path`, else removed.

    `expect`: the token `check_destination` returned at the start of the work; by default the
    destination as it is now.  If the destination changed since (another writer), the write is
    refused as a lost race."""
    path = os.fspath(path)
    before = check_destination(path, "file", error) if expect is ... else expect
    parent = os.path.dirname(os.path.abspath(path))
    remove_stale(parent, tag)
    tmp = _tmp_name(os.path.abspath(path), tag)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies
    except OSError as e:
        raise _failed(path, e, error) from None
    try:
        f = os.fdopen(fd, "w", encoding="utf-8", newline="\n") if text else os.fdopen(fd, "wb")
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _publish_file(tmp, path, before, error)
    except OSError as e:
        _remove(tmp)
        raise _failed(path, e, error) from None
    except BaseException:
        _remove(tmp)
        raise


def _publish_file(tmp: str, path: str, before, error) -> None:
    shown = printable(path)
    lost = error(f"{shown}: another writer created or replaced it while this one ran; "
                 "not overwriting its result")
    if before is None:
        try:
            os.link(tmp, path)  # create-if-absent, atomically
        except FileExistsError:
            raise lost from None
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV, errno.EMLINK):
                raise
            if os.path.lexists(path):  # a file system without hard links
                raise lost from None
            os.replace(tmp, path)
            return
        os.unlink(tmp)
        return
    try:
        now = os.lstat(path)
    except FileNotFoundError:
        now = None
    if _identity(now) != before:
        raise lost
    os.replace(tmp, path)


def _remove(p: str) -> None:
    try:
        if os.path.isdir(p) and not os.path.islink(p):
            shutil.rmtree(p, ignore_errors=True)
        else:
            os.unlink(p)
    except OSError:
        pass


def write_text(path: str | os.PathLike, text: str, error=RefimplError, tag: str = "refimpl",
               expect=...) -> None:
    """Write a small text file atomically (config.json, an index, a JSON report)."""
    with atomic_file(path, error, tag, text=True, expect=expect) as f:
        f.write(text)


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike, error=RefimplError, tag: str = "refimpl"):
    """Yield a fresh temporary directory beside `out`; on success it becomes `out` (which must
    not exist or be an empty directory), on any failure it is removed."""
    out = os.fspath(out)
    check_destination(out, "directory", error)
    parent = os.path.dirname(os.path.abspath(out))
    remove_stale(parent, tag)
    tmp = _tmp_name(os.path.abspath(out), tag)
    try:
        os.mkdir(tmp, 0o777)  # the umask applies
    except OSError as e:
        raise _failed(out, e, error) from None
    try:
        yield tmp
        try:
            os.replace(tmp, out)  # replaces an empty directory; refuses a non-empty one
        except OSError as e:
            if e.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
                raise error(f"{printable(out)}: another writer created it while this one ran; "
                            "not merging into its result") from None
            raise
    except OSError as e:
        _remove(tmp)
        raise _failed(out, e, error) from None
    except BaseException:
        _remove(tmp)
        raise
