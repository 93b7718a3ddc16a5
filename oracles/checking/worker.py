"""Calls into a Python adapter, made safe to wait for: one worker thread that makes every call
(so that the checker can stop waiting for one that never returns), and the one-line reason a
case gets when a call raises, exits or times out; the case timeout's bounds, shared with the
adapter process (isolated.py).
"""

from __future__ import annotations

import queue
import threading

from .. import OraclesError
from ..format.untrusted import escape

DEFAULT_CASE_TIMEOUT = 600.0  # seconds per call into an adapter (supports, run); --case-timeout
MAX_CASE_TIMEOUT = 1e6  # seconds (11.6 days): --case-timeout is 0 (no limit) or up to this


class CaseError(Exception):
    """What went wrong running one case in a candidate (it raised, exited, crashed, returned
    something that is not outputs, or did not return in time): the case's one-line ERROR reason."""


def check_timeout(timeout) -> float:
    """--case-timeout: a number of seconds, 0 (no limit) or from 0 to MAX_CASE_TIMEOUT (a larger
    one overflows the interpreter's waits)."""
    try:
        t = float(timeout)
    except (TypeError, ValueError, OverflowError):
        t = float("nan")
    if isinstance(timeout, bool) or not (0 <= t <= MAX_CASE_TIMEOUT):
        raise OraclesError(f"--case-timeout {escape(repr(timeout))[:60]}: must be a number of seconds "
                           f"from 0 (no limit) to {MAX_CASE_TIMEOUT:g}")
    return t


def split_spec(spec: str) -> tuple[str, str]:
    """--adapter 'pkg.mod:factory' -> ('pkg.mod', 'factory'); anything else is one line."""
    mod_name, sep, attr = str(spec).partition(":")
    if not sep or not mod_name or not attr:
        raise OraclesError(f"--adapter {escape(repr(spec))} must look like pkg.module:factory")
    return mod_name, attr


class AdapterTimeout(Exception):
    """A call into an adapter did not return in time (the worker thread is abandoned)."""


class Worker:
    """One daemon thread that makes every call into an adapter (import, factory, supports, run),
    so that the checker can stop waiting for one that never returns. All calls run on this same
    thread, in order: engines that keep per-thread state (CUDA contexts, MLX streams) see one
    thread. A Python thread cannot be killed: after a timeout the worker is abandoned (`stuck`)
    and no further call is made; the process exits without waiting for it."""

    def __init__(self):
        self.jobs = queue.Queue()
        self.stuck = None
        self.thread = threading.Thread(target=self._loop, name="oracles-adapter", daemon=True)
        self.thread.start()

    def _loop(self):
        while True:
            job = self.jobs.get()
            if job is None:  # close(): the candidate is gone
                return
            fn, box, done = job
            try:
                box["value"] = fn()
            except BaseException as e:  # noqa: BLE001 - SystemExit included; handed to the caller
                box["error"] = e
            done.set()
            del job, fn, box, done  # hold nothing of the candidate between calls

    def close(self, wait: float = 0) -> None:
        """End the thread (after the calls already queued); wait up to `wait` seconds for it."""
        self.jobs.put(None)
        if wait and not self.stuck and self.thread is not threading.current_thread():
            self.thread.join(wait)

    def call(self, fn, timeout: float, what: str):
        """fn() on the worker -> its value; its exception re-raised here; AdapterTimeout when it
        does not return within `timeout` seconds."""
        if self.stuck:
            raise AdapterTimeout(f"not run: {self.stuck}")
        box, done = {}, threading.Event()
        self.jobs.put((fn, box, done))
        if not done.wait(timeout):
            self.stuck = f"{what} did not return within {timeout:g} s"
            raise AdapterTimeout(self.stuck)
        if "error" in box:
            raise box["error"]
        return box["value"]


def call_adapter(worker, fn, timeout, what):
    """fn() with the timeout (worker None or timeout 0: inline, no timeout). KeyboardInterrupt
    (the user's) propagates; everything else, SystemExit included, becomes a CaseError."""
    try:
        return worker.call(fn, timeout, what) if worker is not None else fn()
    except KeyboardInterrupt:
        raise
    except AdapterTimeout as e:
        raise CaseError(f"timed out: {e}") from None
    except SystemExit as e:
        raise CaseError(f"{what} called sys.exit({text(e.code)}): an adapter must return or raise") from None
    except BaseException as e:  # noqa: BLE001 - an engine crashing on a case fails that case
        raise CaseError(f"{what} raised {type(e).__name__}: {text(e)}") from None


def text(x, limit: int = 2000) -> str:
    """str(x) from an adapter, whatever its __str__ does, cut to `limit` characters."""
    try:
        t = str(x)
    except Exception:  # noqa: BLE001
        t = f"<{type(x).__name__} whose str() raised>"
    return t if len(t) <= limit else t[:limit] + f"... ({len(t) - limit} more characters)"
