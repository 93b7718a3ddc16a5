"""The serving schedule of a `schedule` case (oracles/authoring/scenarios.py), as the reading side sees it:
checked before anything runs it (a suite is untrusted input), unrolled step by step, and
cross-checked against the case's inputs and expected outputs. Nothing here computes an output
(no refimpl forward pass): the checker, the suite reader and the engine adapters use it.

    {"format": 1, "requests": R, "prompt_lengths": [P_0, ...], "steps": [...]}

Steps (docs/conformance.md section 9):
    {"op": "forward", "batch": [[r, n], ...], "repeat": k}   ONE forward: the next n tokens of
        each request r at its next positions (k times: a decode loop).
    {"op": "share_prefix", "request": r, "from": q, "length": L}   request r (empty) starts from
        the first L cache entries request q computed (prefix caching).
    {"op": "preempt", "request": r}   request r's cache entries are freed (an engine preempting it
        under memory pressure); its next forward recomputes every token it holds, positions
        0..h-1, in that same forward before its n next tokens (the recompute policy); the
        outputs are those of its n next tokens (the others were reported when first computed).

`prompt_lengths` (optional, added after the first suites: absent means every token is a prompt
token): request r's first P_r tokens are its prompt, the rest are decode tokens, which an engine
that samples produces one per forward. A prefill chunk therefore holds prompt tokens only, a
decode step of request r holds exactly one token, and a shared prefix lies inside the receiving
request's prompt; a final prompt chunk of one token is then a prefill chunk, not a decode step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import OraclesError

SCHEDULE_FORMAT = 1
OPS = ("forward", "share_prefix", "preempt")


def request_name(r: int, name: str) -> str:
    return f"request.{r}.{name}"


def _int(v, where: str, low: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise OraclesError(f"{where}: expected an integer >= {low}, got {v!r}")
    return v


@dataclass(frozen=True)
class Chunk:
    """What one request does in one forward."""

    request: int
    start: int  # position of its first new token
    n: int  # new tokens (their outputs are the request's outputs at start..start+n-1)
    recompute: int = 0  # tokens recomputed first, positions 0..recompute-1 (after a preemption)
    prompt: bool = True  # the new tokens are prompt tokens (a prefill chunk); else one decode token

    @property
    def positions(self) -> range:
        """Every position this forward computes for the request (recomputed ones included)."""
        return range(self.start - self.recompute, self.start + self.n)


@dataclass(frozen=True)
class Forward:
    chunks: tuple  # of Chunk, in the batch's order


@dataclass(frozen=True)
class Share:
    request: int
    donor: int
    length: int


@dataclass(frozen=True)
class Preempt:
    request: int


def prompt_lengths(schedule, lengths: list[int], where: str = "params.schedule") -> list[int]:
    """P_r per request (every token when the schedule does not mark them)."""
    p = schedule.get("prompt_lengths")
    if p is None:
        return list(lengths)
    if not isinstance(p, list) or len(p) != len(lengths):
        raise OraclesError(f"{where}.prompt_lengths: expected a list of {len(lengths)} integers")
    for r, (v, n) in enumerate(zip(p, lengths)):
        _int(v, f"{where}.prompt_lengths[{r}]", 1)
        if v > n:
            raise OraclesError(f"{where}.prompt_lengths[{r}]: {v}, but request {r} has only {n} tokens")
    return list(p)


def plan(schedule, lengths: list[int], where: str = "params.schedule") -> list:
    """A schedule -> its steps one by one (Forward, Share, Preempt; repeats unrolled). Refused
    with one line naming the step when it is malformed, breaks a rule of its prompt marking, or
    does not end with every request holding all of its tokens."""
    if not isinstance(schedule, dict) or schedule.get("format") != SCHEDULE_FORMAT:
        raise OraclesError(f"{where}: not a format-{SCHEDULE_FORMAT} schedule")
    n_req = len(lengths)
    if schedule.get("requests") != n_req:
        raise OraclesError(f"{where}.requests: {schedule.get('requests')!r}, but the inputs hold "
                           f"{n_req} request(s)")
    prompts = prompt_lengths(schedule, lengths, where)
    steps = schedule.get("steps")
    if not isinstance(steps, list) or not steps:
        raise OraclesError(f"{where}.steps: expected a non-empty list")
    held, out = [0] * n_req, []
    preempted = [False] * n_req
    for j, st in enumerate(steps):
        w = f"{where}.steps[{j}]"
        if not isinstance(st, dict):
            raise OraclesError(f"{w}: expected an object")
        op = st.get("op")
        if op == "share_prefix":
            r = _int(st.get("request"), w + ".request")
            q = _int(st.get("from"), w + ".from")
            length = _int(st.get("length"), w + ".length", 1)
            if r >= n_req or q >= n_req or r == q:
                raise OraclesError(f"{w}: requests {r} and {q} must be two of 0..{n_req - 1}")
            if held[r] != 0:
                raise OraclesError(f"{w}: request {r} already holds {held[r]} token(s)")
            if preempted[q]:
                raise OraclesError(f"{w}: request {q} was preempted: it holds no cache entries to share")
            if length > held[q]:
                raise OraclesError(f"{w}: request {q} holds only {held[q]} token(s), not {length}")
            if length > prompts[r]:
                raise OraclesError(f"{w}: a shared prefix of {length} tokens is longer than request "
                                   f"{r}'s prompt ({prompts[r]} tokens)")
            held[r] = length
            out.append(Share(r, q, length))
        elif op == "preempt":
            r = _int(st.get("request"), w + ".request")
            if r >= n_req:
                raise OraclesError(f"{w}: request {r} is not one of 0..{n_req - 1}")
            if held[r] == 0 or preempted[r]:
                raise OraclesError(f"{w}: request {r} holds no cache entries to free")
            preempted[r] = True
            out.append(Preempt(r))
        elif op == "forward":
            batch = st.get("batch")
            if not isinstance(batch, list) or not batch:
                raise OraclesError(f"{w}.batch: expected a non-empty list of [request, tokens]")
            pairs = []
            for item in batch:
                if not (isinstance(item, list) and len(item) == 2):
                    raise OraclesError(f"{w}.batch: {item!r} is not [request, tokens]")
                r, n = _int(item[0], w + ".batch request"), _int(item[1], w + ".batch tokens", 1)
                if r >= n_req:
                    raise OraclesError(f"{w}.batch: request {r} is not one of 0..{n_req - 1}")
                pairs.append((r, n))
            if len({r for r, _ in pairs}) != len(pairs):
                raise OraclesError(f"{w}.batch: a request appears twice in one forward")
            for _ in range(_int(st.get("repeat", 1), w + ".repeat", 1)):
                chunks = []
                for r, n in pairs:
                    if held[r] + n > lengths[r]:
                        raise OraclesError(f"{w}: request {r} would hold {held[r] + n} tokens, "
                                           f"but has only {lengths[r]}")
                    prompt = held[r] < prompts[r]
                    if prompt and held[r] + n > prompts[r]:
                        raise OraclesError(f"{w}: request {r}'s chunk of {n} tokens from position "
                                           f"{held[r]} runs past its prompt of {prompts[r]} "
                                           "tokens: a prefill chunk holds prompt tokens only")
                    if not prompt and n != 1:
                        raise OraclesError(f"{w}: request {r} is past its prompt of {prompts[r]} "
                                           f"tokens: a decode step holds one token, not {n}")
                    chunks.append(Chunk(r, held[r], n, held[r] if preempted[r] else 0, prompt))
                    held[r] += n
                    preempted[r] = False
                out.append(Forward(tuple(chunks)))
        else:
            raise OraclesError(f"{w}.op: {op!r} is not one of {', '.join(OPS)}")
    short = [r for r in range(n_req) if held[r] != lengths[r]]
    if short:
        r = short[0]
        raise OraclesError(f"{where}: request {r} ends holding {held[r]} of its {lengths[r]} tokens")
    return out


def expand(schedule, lengths: list[int], where: str = "params.schedule") -> list[tuple]:
    """plan() as tuples: ("forward", [(r, n), ...]), ("share", r, q, L) or ("preempt", r)."""
    out = []
    for st in plan(schedule, lengths, where):
        if isinstance(st, Forward):
            out.append(("forward", [(c.request, c.n) for c in st.chunks]))
        elif isinstance(st, Share):
            out.append(("share", st.request, st.donor, st.length))
        else:
            out.append(("preempt", st.request))
    return out


def request_tokens(case) -> list:
    """request.<r>.input_ids [1, n_r] -> [n_r] int64 each, r = 0, 1, ..."""
    out = []
    while f"request.{len(out)}.input_ids" in case.inputs:
        out.append(np.asarray(case.inputs[f"request.{len(out)}.input_ids"]).reshape(-1).astype(np.int64))
    if not out:
        raise OraclesError(f"case {case.id}: no request.0.input_ids among its inputs")
    return out


def shared_lengths(schedule, n_req: int) -> list[int]:
    """Per request, how many of its first positions another request computed (0 when none)."""
    out = [0] * n_req
    for st in schedule["steps"]:
        if st.get("op") == "share_prefix":
            out[st["request"]] = st["length"]
    return out


def check_entry(entry: dict, input_shapes: dict, where: str) -> None:
    """The reading side's cross-check of a `schedule` case: its schedule is well formed for the
    request lengths its inputs hold (plan), and each request's expected outputs span exactly the
    positions the schedule computes for it (n_r - L_r). One line naming the case, exit 2."""
    n_req = 0
    lengths = []
    while f"request.{n_req}.input_ids" in input_shapes:
        shape = input_shapes[f"request.{n_req}.input_ids"]
        if len(shape) != 2 or shape[0] != 1:
            raise OraclesError(f"{where}: input request.{n_req}.input_ids has shape {list(shape)}, "
                               "not [1, n]")
        lengths.append(int(shape[1]))
        n_req += 1
    plan(entry["params"].get("schedule"), lengths, f"{where}: params.schedule")
    shared = shared_lengths(entry["params"]["schedule"], n_req)
    for o in entry["outputs"]:
        name = o["name"]
        if not name.startswith("request."):
            continue
        r = name.split(".")[1]
        if not r.isdigit() or int(r) >= n_req:
            raise OraclesError(f"{where}: output {name!r} names no request of this case")
        r = int(r)
        want = lengths[r] - shared[r]
        if len(o["shape"]) < 2 or o["shape"][1] != want:
            raise OraclesError(f"{where}: output {name!r} has shape {o['shape']}, but the schedule "
                               f"computes {want} position(s) for request {r}")
