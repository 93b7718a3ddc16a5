"""Named intermediates (traces): how a block reports what it computed without knowing the model.

Every block function takes `record(name, value)`; it calls it with its own short names
(`q_nope`, `router_scores`, ...) in dataflow order and knows nothing else.  The caller decides
where the values go: `recorder(trace, "layers.3.")` stores them in a dict under the full trace
name (README lists the names), as host numpy arrays; `ignore` (the default) drops them.
"""

from __future__ import annotations

from .backend import to_numpy


def ignore(name: str, value) -> None:
    """The recorder that keeps nothing (no copy to the host)."""


def recorder(trace: dict | None, prefix: str = ""):
    """record(name, value) storing trace[prefix + name] = value on the host; `ignore` when
    trace is None."""
    if trace is None:
        return ignore

    def record(name: str, value) -> None:
        trace[prefix + name] = to_numpy(value)
    return record
