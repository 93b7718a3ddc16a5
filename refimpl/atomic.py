"""Nothing half written: outputs are built under a temporary name beside the target and renamed
into place only when complete."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile

from .errors import RefimplError


@contextlib.contextmanager
def atomic_directory(out: str | os.PathLike, error=RefimplError, prefix: str = ".refimpl-"):
    """Yield a fresh temporary directory beside `out`; on success it becomes `out`, on any
    failure it is removed.  `out` must not exist or be an empty directory (else `error`)."""
    out = os.fspath(out)
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise error(f"{out}: already exists and is not an empty directory")
    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        yield tmp
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the result is an ordinary directory
        if os.path.isdir(out):
            os.rmdir(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
