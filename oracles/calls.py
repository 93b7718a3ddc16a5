"""Calls into a candidate, as both routes make them (check.AdapterCandidate in this process,
isolated.ChildCandidate in a child process): the case timeout and its bounds, CaseError (what
went wrong running one case), and how text from an adapter is cut. Imports nothing heavy, so
that the command line can start an adapter's process before it imports numpy itself."""

from __future__ import annotations

from . import OraclesError
from .untrusted import escape

DEFAULT_CASE_TIMEOUT = 600.0  # seconds per call into an adapter (supports, run); --case-timeout
MAX_CASE_TIMEOUT = 1e6  # seconds (11.6 days): --case-timeout is 0 (no limit) or up to this


class CaseError(Exception):
    """What went wrong running one case in a candidate (it raised, exited, crashed, returned
    something that is not outputs, or did not return in time): the case's one-line ERROR reason."""


def check_timeout(timeout) -> float:
    """--case-timeout: a number of seconds, 0 (no limit) or from 0 to MAX_CASE_TIMEOUT."""
    try:
        t = float(timeout)
    except (TypeError, ValueError, OverflowError):
        t = float("nan")
    if isinstance(timeout, bool) or not (0 <= t <= MAX_CASE_TIMEOUT):
        raise OraclesError(f"--case-timeout {escape(repr(timeout))[:60]}: must be a number of seconds "
                           f"from 0 (no limit) to {MAX_CASE_TIMEOUT:g}")
    return t


def text(x, limit: int = 2000) -> str:
    """str(x) from an adapter, whatever its __str__ does, cut to `limit` characters."""
    try:
        t = str(x)
    except Exception:  # noqa: BLE001
        t = f"<{type(x).__name__} whose str() raised>"
    return t if len(t) <= limit else t[:limit] + f"... ({len(t) - limit} more characters)"


def split_spec(spec: str) -> tuple[str, str]:
    """--adapter 'pkg.mod:factory' -> ('pkg.mod', 'factory'); anything else is one line."""
    mod_name, sep, attr = str(spec).partition(":")
    if not sep or not mod_name or not attr:
        raise OraclesError(f"--adapter {escape(repr(spec))}: must look like pkg.module:factory")
    return mod_name, attr
