"""Running a `schedule` case (docs/conformance.md section 9) through an engine's own serving
machinery: what every built-in adapter shares. The adapter walks the schedule's steps
(oracles.schedule.plan: Forward, Share, Preempt), runs each Forward as ONE call of its engine
over the batch of chunks, and hands back, per chunk, its outputs over the chunk's n new tokens
(recomputed positions after a preemption are dropped: they were reported when first computed).
`Outputs` assembles them into request.<r>.<name> over the positions the schedule computes for
each request, keeping only the names every forward of that request reported.
"""

from __future__ import annotations

import numpy as np

from ..format.schedule import Forward, Preempt, Share, plan, request_name, request_tokens

__all__ = ["Forward", "Preempt", "Share", "Outputs", "steps_of"]


def steps_of(case):
    """-> (tokens per request, the schedule's steps)."""
    tokens = request_tokens(case)
    return tokens, plan(case.schedule, [len(t) for t in tokens])


class Outputs:
    """request.<r>.<name> assembled from each forward's per-request pieces."""

    def __init__(self, n_requests: int):
        self.parts = [[] for _ in range(n_requests)]

    def add(self, r: int, out: dict) -> None:
        """out: {name: array [1, n, ...]} over the request's n new tokens of one forward."""
        self.parts[r].append(out)

    def result(self) -> dict:
        res = {}
        for r, parts in enumerate(self.parts):
            if not parts:
                continue
            names = [k for k in parts[0] if all(k in p for p in parts)]
            for k in names:
                a = np.concatenate([np.asarray(p[k]) for p in parts], axis=1)
                res[request_name(r, k)] = a.astype(np.int64) if k.endswith("topk_idx") else a
        return res
