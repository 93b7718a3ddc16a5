"""What a routing difference can change: the dataflow of a case, read from its output names.

A candidate that resolves a forgiven near-tie the other way (token at index p of a sequence,
routing block B) legitimately changes some of its later outputs; without a conditioned golden
(authoring/conditioned.py) those are left out of the comparison. This module says exactly which: the
outputs downstream of B's routing, at p alone where no attention lies between them (B's own
topk_weight, ffn_out and hidden; final_hidden and logits after the last layer; an MTP module's
h_prev, eh_proj and per-token projections after the layer before it; the module's own head after
its layer), and at p and every later index of the same sequence where an attention (a later
decoder layer or MTP module) lies between, since attention is causal. Nothing upstream of the
routing (earlier layers, B's attention, ffn_norm and router scores, the embeddings), nothing in
another batch row, and nothing in another request of a schedule unless that request reads the
changed cache entries (`share_prefix` of a prefix longer than p, followed transitively), where it
is all of the request's positions after the next attention.

The model of a case, by output name (request.<r>. prefixes name the requests of a schedule):

    embed, mtp.k.embed                          sources: the token embeddings, never changed
    layers.N.<x>                                decoder layer N, phase of <x> (PHASES)
    final_hidden, logits                        after the last decoder layer, per token
    mtp.k.h_prev, mtp.k.eh_proj                 MTP module k before its layer, per token
    mtp.k.layer.<x>                             module k's decoder layer
    mtp.k.head_norm, mtp.k.logits, mtp.k.hidden module k after its layer, per token

Index i of module k continues position i of the main model and of module k-1 (the same index
space, shorter). Component kinds (gate, moe) have no attention: a token changes only itself.
A name this model does not know is taken as reached from p on (more left out, never less).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from .. import OraclesError
from .metrics import compare, forgiven, tokens
from .schema import CAUSAL_KINDS, output_type

# phase of a decoder layer's outputs: 0 per token before the attention mixes positions, 1 after
# it up to the router, 2 the routing decision, 3 what follows the routing
PHASES = {"attn_norm": 0, "c_q": 0, "q_nope": 0, "q_rope": 0, "c_kv": 0, "k_rope": 0,
          "attn_out": 1, "h_attn": 1, "ffn_norm": 1, "router_scores": 1,
          "topk_idx": 2, "topk_margin": 2, "topk_weight": 3, "ffn_out": 3, "hidden": 3}
MAIN, FINAL, MTP, UNKNOWN = 0, 1, 2, 9  # block order: main layers, the head, MTP modules
PRE_LAYER, HEAD = -1, 4  # an MTP module's phases before / after its decoder layer
COMPONENT_NAMES = {"router_scores": 1, "topk_idx": 2, "topk_margin": 2, "topk_weight": 3, "out": 3}


@dataclass(frozen=True)
class Node:
    """Where an output sits in the dataflow: the request (sequence) it belongs to, its block
    ((MAIN, layer), (FINAL, 0), (MTP, k)) and its phase in the block."""

    chain: int
    block: tuple
    phase: int

    @property
    def unknown(self) -> bool:
        return self.block[0] == UNKNOWN


def node(name: str, causal: bool = True) -> Node | None:
    """An output name -> its Node; None for the sources (embeddings) and token streams."""
    chain = 0
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "request" and parts[1].isdigit():
        chain, parts = int(parts[1]), parts[2:]
    if not causal:
        ph = COMPONENT_NAMES.get(".".join(parts))
        return Node(chain, (MAIN, 0), ph) if ph is not None else Node(chain, (UNKNOWN, 0), 0)
    if parts in (["embed"], ["tokens"]) or (len(parts) == 3 and parts[0] == "mtp" and parts[2] == "embed"):
        return None
    if len(parts) == 3 and parts[0] == "layers" and parts[1].isdigit() and parts[2] in PHASES:
        return Node(chain, (MAIN, int(parts[1])), PHASES[parts[2]])
    if parts in (["final_hidden"], ["logits"]):
        return Node(chain, (FINAL, 0), 0)
    if len(parts) >= 3 and parts[0] == "mtp" and parts[1].isdigit():
        k, rest = int(parts[1]), parts[2:]
        if rest in (["h_prev"], ["eh_proj"]):
            return Node(chain, (MTP, k), PRE_LAYER)
        if rest in (["head_norm"], ["logits"], ["hidden"]):
            return Node(chain, (MTP, k), HEAD)
        if len(rest) == 2 and rest[0] == "layer" and rest[1] in PHASES:
            return Node(chain, (MTP, k), PHASES[rest[1]])
    return Node(chain, (UNKNOWN, 0), 0)


AT, FROM = "at", "from"


class Layout:
    """The dataflow of one case: which outputs a routing difference reaches, and how.
    names: the case's output names; params: its params (a schedule's shared prefixes)."""

    def __init__(self, kind: str, names, params: dict | None = None):
        self.kind = kind
        self.causal = kind in CAUSAL_KINDS
        self.nodes = {n: node(n, self.causal) for n in names}
        # decoder blocks (each holds an attention): main layers 0..max, and the MTP modules
        main = [b[1] for v in self.nodes.values() if v for b in [v.block] if b[0] == MAIN]
        mods = {v.block[1] for v in self.nodes.values() if v and v.block[0] == MTP}
        self.decoders = sorted([(MAIN, i) for i in range(max(main) + 1)] if main and self.causal else []) \
            + sorted((MTP, k) for k in mods)
        self.shared = shared_prefixes(params or {}, kind)
        self._thr = {}

    def reach(self, routing: str, output: str) -> str | None:
        """How a difference at routing output `routing` (a topk_idx, index p) reaches `output`
        of the same sequence: None (not at all), AT (index p only) or FROM (p and after)."""
        e, o = self.nodes.get(routing), self.nodes.get(output)
        if e is None or o is None:
            return None
        if o.unknown:
            return FROM if self.causal else AT
        if (o.block, o.phase) <= (e.block, PHASES["topk_idx"]):
            return None
        attention = any(e.block < x and (x < o.block or (x == o.block and o.phase >= 1))
                        for x in self.decoders)
        return FROM if attention and self.causal else AT

    def threshold(self, q: int, r: int) -> int:
        """Request r reads request q's cache entries at positions below this (0: none), through
        shared prefixes followed transitively: the widest path's narrowest share."""
        if not self.shared:
            return 0
        if not self._thr:
            reqs = {x for s in self.shared for x in s[:2]}
            for a in reqs:
                thr = {a: np.inf}
                for _ in range(len(self.shared) + 1):  # a fixpoint: paths of any length
                    for r_, s_, length in self.shared:
                        if s_ in thr:
                            thr[r_] = max(thr.get(r_, 0), min(thr[s_], length))
                self._thr[a] = thr
        return int(self._thr.get(q, {}).get(r, 0)) if r != q else 0

    def offset(self, r: int) -> int:
        """The position of request r's first output index (its shared prefix length)."""
        return max((length for r_, _, length in self.shared if r_ == r), default=0)


def shared_prefixes(params: dict, kind: str) -> list[tuple[int, int, int]]:
    """A schedule's share_prefix steps -> [(request, from, length)], refused (one line) when
    malformed: a suite is untrusted input."""
    if kind != "schedule":
        return []
    sched = params.get("schedule")
    steps = sched.get("steps") if isinstance(sched, dict) else None
    if not isinstance(steps, list):
        raise OraclesError("params.schedule.steps: expected a list of steps")
    out = []
    for j, st in enumerate(steps):
        if isinstance(st, dict) and st.get("op") == "share_prefix":
            vals = [st.get(k) for k in ("request", "from", "length")]
            if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in vals):
                raise OraclesError(f"params.schedule.steps[{j}]: request, from and length must be "
                                   "integers >= 0")
            out.append(tuple(vals))
    return out


@dataclass
class Flips:
    """The tokens of one routing output that went another way: [*lead] bool masks."""

    routing: str
    flipped: np.ndarray
    near: np.ndarray  # margin > 0 (a rounding question), not an exact tie decided otherwise
    reported: bool  # from the candidate's own topk_idx (False: assumed, logits only)


ALL, REPORTED = "all", "reported"


class Taint:
    """Tokens whose routing legitimately differs (a forgiven near-tie that the candidate resolved
    the other way, reported; or, for a candidate that does not report its routing, might have,
    assumed: see collect) and what they reach (Layout): those positions are left out of the
    comparison of each output. `mask(name, lead)` is exact per output.

    A generated stream that legitimately went another way (a forgiven near-tie) n steps before
    its end: the sequence outputs compared after it drop their last n positions (they belong to
    another sequence); see stream()."""

    def __init__(self, kind: str, names, params: dict | None = None):
        self.layout = Layout(kind, names, params)
        self.causal = self.layout.causal
        self.flips: list[Flips] = []
        self.stream_cut = 0
        # routing output -> [*lead] bool: near-ties the candidate resolved in a way its own
        # router input does not explain (routing.explained): failures, not flips
        self.unexplained: dict = {}

    def stream(self, c, e, compared: int) -> None:
        """After a `tokens` comparison: when the candidate's stream differs from the expected
        one at or after the forgiven step `compared`, outputs that follow it in a causal kind
        (the main and MTP logits of a speculation case) are compared only over the positions
        whose inputs precede that step: the last len(e) - first difference positions go."""
        c, e = np.asarray(c).reshape(-1), np.asarray(e).reshape(-1)
        n = min(len(c), len(e))
        differ = np.nonzero(c[:n] != e[:n])[0]
        first = int(differ[0]) if len(differ) else (n if len(c) != len(e) else len(e))
        if self.causal and first < len(e):
            self.stream_cut = max(self.stream_cut, len(e) - first)

    def cut(self, a):
        """A sequence output cut to the positions before the stream went another way."""
        return taint_cut(self, a)

    def add(self, routing: str, flipped, near, reported: bool = True) -> None:
        flipped = np.asarray(flipped, bool)
        if flipped.any():
            self.flips.append(Flips(routing, flipped, np.asarray(near, bool) & flipped, reported))

    def lead(self, name: str, shape) -> int:
        """How many leading axes of an output are token axes: [b, s] in a causal kind, the
        routing outputs' token axes otherwise."""
        if self.causal:
            return min(2, len(shape))
        f = next(iter(self.flips), None)
        return f.flipped.ndim if f is not None else len(shape)

    def mask(self, name: str, lead_shape, which: str = ALL, near_only: bool = False):
        """The positions of output `name` (token axes `lead_shape`) left out, or None."""
        lead_shape = tuple(lead_shape)
        m = None
        lay = self.layout
        out_node = lay.nodes.get(name)
        for f in self.flips:
            if which == REPORTED and not f.reported:
                continue
            src = f.near if near_only else f.flipped
            if not src.any():
                continue
            how = lay.reach(f.routing, name)
            fn = lay.nodes.get(f.routing)
            if fn is None or out_node is None:
                continue
            add = None
            if fn.chain == out_node.chain:
                if how is not None:
                    add = self._spread(src, lead_shape, how)
            elif how == FROM:  # another request: through the cache entries it reads
                thr = lay.threshold(fn.chain, out_node.chain)
                pos = np.flatnonzero(src.reshape(-1)) + lay.offset(fn.chain)  # batch 1
                if len(pos) and pos.min() < thr:
                    add = np.ones(lead_shape, bool)
            if add is not None:
                m = add if m is None else (m | add)
        return m

    def _spread(self, src, lead_shape, how):
        if not self.causal or len(lead_shape) != 2 or src.ndim != 2:
            if src.shape != lead_shape:
                return np.ones(lead_shape, bool) if src.any() else None  # cannot align: all
            return src.copy()
        b, s = lead_shape
        a = np.zeros(lead_shape, bool)
        rows, cols = min(b, src.shape[0]), min(s, src.shape[1])
        part = src[:rows, :cols]
        if how == FROM:
            part = np.maximum.accumulate(part, axis=1)
            # a flip beyond this output's length (an MTP module is shorter) reaches nothing here
        a[:rows, :cols] = part
        return a

    def cover(self, name: str, lead_shape, which: str = ALL) -> tuple[int, int, int]:
        """-> (positions compared, positions, positions left out only because of exact ties
        decided the other way) for output `name`."""
        n = int(np.prod(lead_shape))
        m = self.mask(name, lead_shape, which)
        if m is None:
            return n, n, 0
        near = self.mask(name, lead_shape, which, near_only=True)
        exact = int((m & ~near).sum()) if near is not None else int(m.sum())
        return n - int(m.sum()), n, exact

    def select(self, a, name: str, lead: int, which: str = ALL):
        """a [*token_axes, ...] -> the rows of the positions compared, [n, ...] (or `a`)."""
        a = np.asarray(a)
        m = self.mask(name, a.shape[:lead], which)
        return a if m is None else a[~m]

    def any_for(self, name: str, lead_shape) -> bool:
        m = self.mask(name, lead_shape)
        return m is not None and bool(m.any())


def _sets_differ(c, e):
    k = e.shape[-1]
    return (np.sort(np.asarray(c).reshape(-1, k), -1) != np.sort(np.asarray(e).reshape(-1, k), -1)).any(-1)


def collect(taint: Taint, outputs, expected: dict, cand: dict, tols_all: dict, explain=None,
            assume=None) -> None:
    """Fill `taint` before any output is compared: the stream (a `tokens` output that went
    another way at a forgiven step), then every routing output in the model's dataflow order.
    A token whose expert set differs from the expected one and whose margin is within the
    profile's rounding is a flip (reported: the candidate's own topk_idx); a routing output the
    candidate does not give (logits only) counts every such near-tie as flipped (assumed).
    outputs: [(name, type)]; expected: the golden's tensors (with the topk_margin aux).
    explain(name, c_idx, flipped) -> [*lead] bool or None: which flips the candidate's own
    router input explains (routing.explainer); the others go to taint.unexplained.
    assume: None (every near-tie of a routing output the candidate does not give), or
    {routing name: [*lead] bool}: only those tokens (the others were conditioned on)."""
    names = dict(outputs)
    if names.get("tokens") == "tokens" and "tokens" in cand and "tokens_margin" in expected:
        c, e = np.asarray(cand["tokens"]), expected["tokens"]
        if np.issubdtype(c.dtype, np.integer) and c.shape == e.shape:
            t = tols_all.get("tokens", {})
            if "logit_eps" in t:
                vals = tokens(c, e, expected["tokens_margin"], t["logit_eps"])
                if vals["mismatch"] == 0:
                    taint.stream(c, e, vals["compared"])
    routing = [n for n, kind in outputs if kind == "indices"]
    lay = taint.layout

    def order(n):
        v = lay.nodes.get(n)
        return (v.block, v.chain) if v is not None else ((UNKNOWN, 0), 0)
    for name in sorted(routing, key=order):
        margin = expected.get(name[: -len("topk_idx")] + "topk_margin")
        tol = tols_all.get(name, {})
        if margin is None or "margin_eps" not in tol:
            continue
        e, m = taint_cut(taint, expected[name]), taint_cut(taint, margin)
        lead = e.shape[:-1]
        ties = tol.get("exact_ties", "forgiven") == "forgiven"
        ok = forgiven(m, tol["margin_eps"], ties)
        positive = np.asarray(m, np.float64).reshape(-1) > 0
        if name in cand:
            c = np.asarray(cand[name])
            if c.shape != expected[name].shape or not np.issubdtype(c.dtype, np.integer):
                continue  # judged (failed) as an output
            f = _sets_differ(taint_cut(taint, c), e) & ok
            if explain is not None and f.any():
                good = explain(name, taint_cut(taint, c), f.reshape(lead),
                               lambda a: taint_cut(taint, a))
                if good is not None:
                    bad = f.reshape(lead) & ~np.asarray(good, bool).reshape(lead)
                    if bad.any():
                        taint.unexplained[name] = bad
                    f = f & ~bad.reshape(-1)
            taint.add(name, f.reshape(lead), (f & positive).reshape(lead), reported=True)
        else:
            if assume is not None:
                may = assume.get(name)
                ok = ok & (np.zeros(ok.shape, bool) if may is None else np.asarray(may, bool).reshape(-1))
            taint.add(name, ok.reshape(lead), (ok & positive).reshape(lead), reported=False)


def taint_cut(taint, a):
    """A sequence output cut to the positions before the stream went another way (stream())."""
    if a is None or not taint.stream_cut or np.ndim(a) < 2:
        return a
    a = np.asarray(a)
    return a[:, :max(a.shape[1] - taint.stream_cut, 0)]


# ---------------------------------------------------------------------------------------------
# Conditioning: the golden recomputed with the candidate's routing (authoring/conditioned.py)
# ---------------------------------------------------------------------------------------------

MAX_RECOMPUTATIONS = 32  # per case: a bound on the reference forwards conditioning may run


@dataclass
class Settled:
    """What a case is compared against: the expected values (conditioned on the candidate's
    routing where a conditioner was given) and the taint that remains (flips beyond the
    bound, routing a logits-only candidate might have taken)."""

    taint: Taint
    expected: dict
    forced: int = 0  # tokens whose routing the expected values follow from the candidate
    recomputations: int = 0
    source: str | None = None  # "reported topk_idx" or "inferred from the logits"
    note: str | None = None  # what could not be conditioned, and why


def substitute(kind, params, expected: dict, new: dict, forced: dict) -> dict:
    """The golden with the recomputed values at the positions the forced tokens reach (and the
    forced tokens' own routing outputs); every other value exactly as the golden has it."""
    t = Taint(kind, list(expected), params)
    for name, (mask, _) in forced.items():
        t.add(name, mask, mask)
    out = dict(expected)
    for k, e in expected.items():
        v = new.get(k)
        if v is None or k in ("tokens", "tokens_margin") or np.shape(v) != np.shape(e):
            continue
        lead = t.lead(k, np.shape(e))
        m = t.mask(k, np.shape(e)[:lead])
        stem = k.rsplit(".", 1)[0] + "." if "." in k else ""
        own = forced.get(stem + "topk_idx") if k.endswith(("topk_idx", "topk_margin")) else None
        if own is not None:
            o = np.zeros(np.shape(e)[:lead], bool)
            src = np.asarray(own[0], bool)
            o[tuple(slice(0, n) for n in src.shape)] = src
            m = o if m is None else (m | o)
        if m is None or not m.any():
            continue
        out[k] = np.array(e, copy=True)
        out[k][m] = np.asarray(v)[m]
    return out


def _restream(res, expected, cand, tols_all, conditioner, kind) -> dict:
    """A token stream that parts from the expected one at a forgiven near-tie of the logits is
    compared on against the reference continued from the candidate's own tokens (greedy from
    the prompt and them), parting after parting, until it parts where no rounding explains it
    or not at all (at most MAX_RECOMPUTATIONS). A speculation case's traces then follow the
    candidate's stream (recomputed teacher-forced over it)."""
    if "tokens" not in expected or "tokens_margin" not in expected or "tokens" not in cand:
        return expected
    c = np.asarray(cand["tokens"])
    eps = tols_all.get("tokens", {}).get("logit_eps")
    if eps is None or c.shape != expected["tokens"].shape or not np.issubdtype(c.dtype, np.integer):
        return expected
    e, m = expected["tokens"], expected["tokens_margin"]
    moved = False
    while res.recomputations < MAX_RECOMPUTATIONS:
        differ = np.flatnonzero(c.reshape(-1) != e.reshape(-1))
        if not len(differ) or not m.reshape(-1)[differ[0]] <= eps:
            break
        e, m = conditioner.restream(c.reshape(-1)[: differ[0] + 1])
        res.recomputations += 1
        moved = True
    if not moved:
        return expected
    res.source = "the candidate's token stream"
    out = {**expected, "tokens": e, "tokens_margin": m}
    if kind == "mtp_speculation":
        conditioner.tokens = e
        out.update({k: v for k, v in conditioner.recompute({}).items() if k in expected and k != "tokens"})
    return out


def _forced_add(forced, name, mask, experts):
    old = forced.get(name)
    if old is not None:
        mask = mask | old[0]
        experts = np.where(mask[..., None] & ~old[0][..., None], experts, old[1])
    forced[name] = (mask, np.asarray(experts))


def settle(kind, outputs, expected: dict, cand: dict, tols_all: dict, params=None, explain=None,
           conditioner=None, scored=()) -> Settled:
    """The expected values a candidate is compared against, and the taint left.

    Without a conditioner: the golden, and every forgiven flip's reach left out (collect).
    With one: repeatedly, the flips no other flip reaches (roots; unexplained ones too) are
    forced and the golden recomputed, until the candidate's routing differs nowhere within the
    profile's forgiveness (at most MAX_RECOMPUTATIONS): every position is then judged. A
    logits-only candidate's near-ties are decided position by position: each is forced when
    that brings the expected values at its position nearer to the candidate's (`scored`: the
    outputs to measure, e.g. the logits), and left as the golden has it otherwise."""
    names = [n for n, _ in outputs]

    def fresh(exp, assume=None):
        t = Taint(kind, names, params)
        collect(t, outputs, exp, cand, tols_all, explain, assume)
        return t

    res = Settled(None, expected)
    if conditioner is not None and hasattr(conditioner, "restream"):
        expected = _restream(res, expected, cand, tols_all, conditioner, kind)
    taint = fresh(expected)
    res.taint, res.expected = taint, expected
    if conditioner is None or not taint.flips and not taint.unexplained:
        return res
    forced, unexplained, cur = {}, {}, expected
    while True:
        for name, bad in taint.unexplained.items():
            unexplained[name] = bad | unexplained[name] if name in unexplained else bad
        roots = {}
        for f in taint.flips:
            if f.reported:
                up = taint.mask(f.routing, f.flipped.shape)
                roots[f.routing] = f.flipped & ~up if up is not None else f.flipped
        for name, bad in taint.unexplained.items():
            up = taint.mask(name, bad.shape)
            r = bad & ~up if up is not None else bad
            roots[name] = roots[name] | r if name in roots else r
        roots = {k: v for k, v in roots.items() if v.any()}
        if not roots:
            break
        if res.recomputations >= MAX_RECOMPUTATIONS:
            res.note = (f"routing still differs after {MAX_RECOMPUTATIONS} recomputations: "
                        "the rest is left out")
            break
        for name, m in roots.items():
            _forced_add(forced, name, m, taint_cut(taint, np.asarray(cand[name])))
        cur = substitute(kind, params, expected, conditioner.recompute(forced), forced)
        res.recomputations += 1
        res.source = "reported topk_idx"
        taint = fresh(cur)
    if not forced and any(not f.reported for f in taint.flips) and scored:
        taint, cur = _infer(res, kind, params, outputs, expected, cand, fresh, conditioner, scored,
                            forced, tols_all)
    taint.unexplained = {**taint.unexplained, **unexplained}
    res.taint, res.expected = taint, cur
    res.forced = int(sum(m.sum() for m, _ in forced.values()))
    return res


MAX_JOINT = 3  # near-ties of one position tried jointly (2^n - 1 recomputations)


def _passes(names, expected, cand, tols_all, taint) -> bool:
    """Every scored output within its tolerances at every position, against `expected`."""
    for n in names:
        kind = output_type(n)
        tols = tols_all.get(n, {})
        c = np.asarray(cand[n], np.float64)
        if c.shape != np.shape(expected[n]) or not np.isfinite(c).all():
            return False
        vals, judged = compare(n, kind, c, expected[n], expected, tols, None)
        if any(m in tols and not vals.get(m, 0.0) <= tols[m]["tol"] for m in judged):
            return False
    return True


def _infer(res, kind, params, outputs, expected, cand, fresh, conditioner, scored, forced, tols_all=None):
    """Logits only: decide the near-ties position by position, since the outputs at a position
    depend on the routing at that and earlier positions only: the near-ties of one position
    (up to MAX_JOINT of them, across layers and MTP modules) are tried in every combination,
    and the one whose expected values at that position are nearest the candidate's is kept."""
    taint = fresh(expected)
    cur = expected
    lay = taint.layout
    scored = [n for n in scored if n in cand and n in expected]
    if tols_all is not None and _passes(scored, expected, cand, tols_all, taint):
        return fresh(expected, assume={}), expected  # nothing needed forgiving

    def at_error(exp, chain, row, pos):
        err = 0.0
        for n in scored:
            v = lay.nodes.get(n)
            if v is None or v.chain != chain:
                continue
            e = taint_cut(taint, np.asarray(exp[n], np.float64))
            c = taint_cut(taint, np.asarray(cand[n], np.float64))
            i = pos - lay.offset(chain)
            if c.shape != e.shape or e.ndim < 2 or not 0 <= i < e.shape[1]:
                continue
            scale = float(np.sum(np.asarray(expected[n], np.float64) ** 2)) or 1.0
            err += float(np.sum((c[row, i] - e[row, i]) ** 2)) / scale
        return err

    def near_ties(t):
        out = []
        for f in t.flips:
            if f.reported:
                continue
            v = lay.nodes.get(f.routing)
            chain, block = (v.chain, v.block) if v is not None else (0, (UNKNOWN, 0))
            for idx in np.argwhere(f.flipped):
                idx = tuple(int(i) for i in idx)
                row, i = (idx[0], idx[1]) if len(idx) == 2 else (0, idx[0])
                out.append((i + lay.offset(chain), chain, row, block, f.routing, idx))
        return sorted(out)
    done = set()  # (routing name, token, alternative) tried
    eps = {n: tols_all.get(n, {}).get("margin_eps", 0.0) for n, _ in outputs} if tols_all else {}

    def options_of(x):
        name, at = x[4], x[5]
        lead = np.shape(taint_cut(taint, expected[name]))[:-1]
        alts = conditioner.alternatives(cur, name, int(np.ravel_multi_index(at, lead)), eps.get(name, 0.0))
        return [(name, at, lead, tuple(a)) for a in alts if (name, at, tuple(a)) not in done]
    while True:
        todo = [(x, o) for x in near_ties(taint) for o in [options_of(x)] if o]
        if not todo:
            break
        pos, chain, row = todo[0][0][:3]
        group, combos = [], 1
        for x, opts in todo:
            if x[:3] != (pos, chain, row) or combos * (len(opts) + 1) > 2 ** MAX_JOINT:
                continue
            group.append(opts)
            combos *= len(opts) + 1
        if res.recomputations + combos - 1 > MAX_RECOMPUTATIONS:
            res.note = (f"{len(todo)} near-tie token(s) not tried within {MAX_RECOMPUTATIONS} "
                        "recomputations: left out")
            break
        for opts in group:
            done.update((n, at, a) for n, at, _, a in opts)
        best, best_err = None, at_error(cur, chain, row, pos)
        for pick in itertools.product(*[[None] + opts for opts in group]):
            if all(p is None for p in pick):
                continue
            trial = {k: (m.copy(), e.copy()) for k, (m, e) in forced.items()}
            for opt in pick:
                if opt is None:
                    continue
                name, at, lead, alt = opt
                m = np.zeros(lead, bool)
                m[at] = True
                ex = np.zeros(lead + (len(alt),), np.int64)
                ex[at] = alt
                _forced_add(trial, name, m, ex)
            new = substitute(kind, params, expected, conditioner.recompute(trial), trial)
            res.recomputations += 1
            err = at_error(new, chain, row, pos)
            if err < best_err:
                best, best_err = (trial, new), err
        if best is not None:
            forced.clear()
            forced.update(best[0])
            cur = best[1]
        res.source = "inferred from the logits"
        taint = fresh(cur, assume={n: _not_done(n, done, taint, cur) for n, _ in outputs
                                   if n.endswith("topk_idx")})
    return taint, cur


def _not_done(name, done, taint, exp):
    """The tokens of a routing output whose near-tie was not tried (still assumed)."""
    lead = np.shape(taint_cut(taint, exp[name]))[:-1]
    m = np.ones(lead, bool)
    for n, at, _ in done:
        if n == name:
            m[at] = False
    return m
