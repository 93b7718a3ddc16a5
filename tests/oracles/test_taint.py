"""The taint rule (oracles/taint.py) against a brute-force dataflow model written here
independently: a symbolic forward pass over small synthetic layouts (decoder layers with causal
attention, MoE routing, MTP modules, the requests of a schedule sharing cache entries, a single
MoE block) in which every value carries the set of routing differences it depends on. The
positions the rule leaves out of each output must be exactly those whose value depends on a
difference."""

from __future__ import annotations

import numpy as np
from hypothesis import example, given, settings
from hypothesis import strategies as st

from oracles.format.taint import Taint

PRE = ["attn_norm", "c_q", "q_nope", "q_rope", "c_kv", "k_rope"]
POST_ATTN = ["attn_out", "h_attn", "ffn_norm", "router_scores"]
POST_ROUTE = ["topk_weight", "ffn_out", "hidden"]


class Sim:
    """Dependency sets per output name and token: out[name][row][index] -> frozenset of event
    ids. Events: {(routing name, row, index): id}."""

    def __init__(self, events):
        self.events = events
        self.out = {}

    def put(self, name, row, i, deps):
        self.out.setdefault(name, {}).setdefault(row, {})[i] = frozenset(deps)

    def layer(self, prefix, moe, rows, own, h, kv_src):
        """One decoder layer over `rows`: own[row] = the indices it computes; h[row][i] its
        input; kv_src(row, j) -> the dependency of the cache entry j it reads (its own, or a
        shared one). Returns the layer's output h."""
        new = {}
        for r in rows:
            for i in own[r]:
                for n in PRE:
                    self.put(prefix + n, r, i, h[r][i])
        for r in rows:
            new[r] = {}
            for i in own[r]:
                a = set(h[r][i])
                for j in range(i + 1):
                    a |= kv_src(r, j)
                for n in POST_ATTN:
                    self.put(prefix + n, r, i, a)
                if moe:
                    ev = self.events.get((prefix + "topk_idx", r, i))
                    route = a | ({ev} if ev is not None else set())
                    self.put(prefix + "topk_idx", r, i, a)  # the routing's inputs
                else:
                    route = a
                for n in POST_ROUTE if moe else ["ffn_out", "hidden"]:
                    self.put(prefix + n, r, i, route)
                new[r][i] = frozenset(route)
        return new


def simulate_model(n_layers, moe_layers, depth, rows, length, events):
    """A prefill (or decode: the same dataflow) of `rows` sequences, then `depth` MTP modules."""
    sim = Sim(events)
    own = {r: range(length) for r in range(rows)}
    h = {r: {i: frozenset() for i in own[r]} for r in range(rows)}
    for r in range(rows):
        for i in own[r]:
            sim.put("embed", r, i, ())
    for layer in range(n_layers):
        cur = h
        h = sim.layer(f"layers.{layer}.", layer in moe_layers, range(rows), own, cur,
                      lambda r, j, cur=cur: cur[r][j])
    for r in range(rows):
        for i in own[r]:
            sim.put("final_hidden", r, i, h[r][i])
            sim.put("logits", r, i, h[r][i])
    prev = h
    for k in range(1, depth + 1):
        mown = {r: range(max(length - k, 0)) for r in range(rows)}
        x = {r: {} for r in range(rows)}
        for r in range(rows):
            for i in mown[r]:
                sim.put(f"mtp.{k}.embed", r, i, ())
                sim.put(f"mtp.{k}.h_prev", r, i, prev[r][i])
                sim.put(f"mtp.{k}.eh_proj", r, i, prev[r][i])
                x[r][i] = prev[r][i]
        out = sim.layer(f"mtp.{k}.layer.", True, range(rows), mown, x, lambda r, j, x=x: x[r][j])
        for r in range(rows):
            for i in mown[r]:
                for n in ("head_norm", "logits", "hidden"):
                    sim.put(f"mtp.{k}.{n}", r, i, out[r][i])
        prev = out
    return sim


def simulate_schedule(n_layers, moe_layers, lengths, shares, events):
    """Requests as chains request.<r>.: each computes its positions from its shared length on,
    reading the cache entries below it from the request it shares them with (which may itself
    have read them from another)."""
    sim = Sim(events)
    n_req = len(lengths)
    start = [0] * n_req
    src = {}
    for r, q, length in shares:
        start[r], src[r] = length, (q, length)
    own = {r: range(start[r], lengths[r]) for r in range(n_req)}
    h = {r: {p: frozenset() for p in own[r]} for r in range(n_req)}

    def entry(kv, r, j):  # the cache entry at position j that request r reads
        while j < start[r]:
            r = src[r][0]
        return kv[r][j]
    for layer in range(n_layers):
        cur = h
        kv = {r: {p: cur[r][p] for p in own[r]} for r in range(n_req)}
        p = f"layers.{layer}."
        sub = Sim(events)
        # events are named per request: request.<r>.layers.N.topk_idx at index p - start[r]
        sub.events = {(p + "topk_idx", req, start[req] + i): ev
                      for (name, _, i), ev in events.items() for req in [int(name.split(".")[1])]
                      if name == f"request.{req}.{p}topk_idx"}
        h = sub.layer(p, layer in moe_layers, range(n_req), own, cur,
                      lambda r, j, kv=kv: entry(kv, r, j))
        for name, per_row in sub.out.items():
            for r, vals in per_row.items():
                for pos, deps in vals.items():
                    sim.put(f"request.{r}.{name}", 0, pos - start[r], deps)
    for r in range(n_req):
        for pos in own[r]:
            sim.put(f"request.{r}.embed", 0, pos - start[r], ())
            sim.put(f"request.{r}.final_hidden", 0, pos - start[r], h[r][pos])
            sim.put(f"request.{r}.logits", 0, pos - start[r], h[r][pos])
    return sim


def _check(kind, sim, params=None, near_ids=frozenset()):
    names = list(sim.out)
    taint = Taint(kind, names, params)
    by_routing = {}
    for (name, row, i), ev in sim.events.items():
        by_routing.setdefault(name, []).append((row, i, ev))
    for name, evs in by_routing.items():
        rows = max(sim.out[name]) + 1
        n = max(max(v) for v in sim.out[name].values()) + 1
        f, near = np.zeros((rows, n), bool), np.zeros((rows, n), bool)
        for row, i, ev in evs:
            f[row, i] = True
            near[row, i] = ev in near_ids
        taint.add(name, f, near)
    for name, per_row in sim.out.items():
        rows = max(per_row) + 1
        n = max(max(v) for v in per_row.values()) + 1
        want = np.zeros((rows, n), bool)
        want_near = np.zeros((rows, n), bool)
        for row, vals in per_row.items():
            for i, deps in vals.items():
                want[row, i] = bool(deps)
                want_near[row, i] = bool(deps & near_ids)
        got = taint.mask(name, (rows, n))
        got = np.zeros((rows, n), bool) if got is None else got
        assert got.tolist() == want.tolist(), (name, got.astype(int), want.astype(int))
        compared, positions, exact = taint.cover(name, (rows, n))
        assert (compared, positions) == (int((~want).sum()), rows * n)
        assert exact == int((want & ~want_near).sum())


layouts = st.tuples(st.integers(1, 4), st.integers(0, 2**31))


def _events(rng, routing, shape_of, count):
    ev = {}
    for j in range(count):
        name = routing[rng.integers(len(routing))]
        rows, n = shape_of(name)
        if n:
            ev.setdefault((name, int(rng.integers(rows)), int(rng.integers(n))), len(ev))
    return ev


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 4), st.integers(0, 3), st.integers(1, 2), st.integers(1, 7),
       st.integers(0, 2**31))
@example(2, 0, 1, 10, 0)  # few layers, long sequence
@example(1, 2, 1, 3, 1)  # one layer, MTP modules longer than the sequence allows
def test_the_taint_of_a_model_case_is_its_dataflow(n_layers, depth, rows, length, seed):
    rng = np.random.default_rng(seed)
    moe_layers = {i for i in range(n_layers) if rng.random() < 0.7} or {n_layers - 1}
    routing = [f"layers.{i}.topk_idx" for i in sorted(moe_layers)]
    routing += [f"mtp.{k}.layer.topk_idx" for k in range(1, depth + 1) if length - k > 0]

    def shape_of(name):
        k = int(name.split(".")[1]) if name.startswith("mtp.") else 0
        return rows, length - k
    events = _events(rng, routing, shape_of, int(rng.integers(1, 5)))
    sim = simulate_model(n_layers, moe_layers, depth, rows, length, events)
    near = frozenset(ev for ev in events.values() if rng.random() < 0.5)
    _check("mtp_prefill" if depth else "prefill", sim, near_ids=near)


@settings(max_examples=150, deadline=None)
@given(st.integers(1, 3), st.lists(st.integers(1, 7), min_size=1, max_size=4), st.integers(0, 2**31))
@example(2, [5, 6, 4], 3)
def test_the_taint_of_a_schedule_is_per_request_and_follows_shared_prefixes(n_layers, lengths, seed):
    rng = np.random.default_rng(seed)
    moe_layers = {i for i in range(n_layers) if rng.random() < 0.7} or {0}
    order = rng.permutation(len(lengths))  # shares go from earlier to later in this order
    shares = []
    for a in range(1, len(order)):
        r, q = int(order[a]), int(order[rng.integers(a)])
        length = int(rng.integers(1, min(lengths[q], lengths[r] - 1) + 1)) if lengths[r] > 1 else 0
        if length and rng.random() < 0.7:
            shares.append((r, q, length))
    start = {r: length for r, _, length in shares}
    routing = [f"request.{r}.layers.{i}.topk_idx" for r in range(len(lengths)) for i in sorted(moe_layers)]
    events = _events(rng, routing, lambda n: (1, lengths[int(n.split(".")[1])] - start.get(int(n.split(".")[1]), 0)),
                     int(rng.integers(1, 4)))
    sim = simulate_schedule(n_layers, moe_layers, lengths, shares, events)
    steps = [{"op": "forward", "batch": [[0, 1]]}]
    steps += [{"op": "share_prefix", "request": r, "from": q, "length": length} for r, q, length in shares]
    _check("schedule", sim, {"schedule": {"format": 1, "steps": steps}})


def test_a_flip_in_one_request_leaves_an_unrelated_request_whole():
    """The constructed case of issue 16 in miniature: a flip in request 1 at index 3 must not
    leave out request 2's positions (the old rule cut every output of the same shape)."""
    sim = simulate_schedule(2, {1}, [6, 6, 6], [], {("request.1.layers.1.topk_idx", 0, 3): 0})
    _check("schedule", sim, {"schedule": {"format": 1, "steps": []}})
    taint = Taint("schedule", list(sim.out), {"schedule": {"format": 1, "steps": []}})
    taint.add("request.1.layers.1.topk_idx", np.eye(1, 6, 3, dtype=bool), np.eye(1, 6, 3, dtype=bool))
    assert taint.mask("request.2.logits", (1, 6)) is None
    assert taint.mask("request.1.logits", (1, 6)).tolist() == [[False, False, False, True, False, False]]


def test_a_last_layer_flip_leaves_only_its_own_position_of_the_logits():
    taint = Taint("prefill", ["layers.0.hidden", "layers.1.topk_idx", "layers.1.hidden", "logits"])
    f = np.zeros((1, 10), bool)
    f[0, 0] = True
    taint.add("layers.1.topk_idx", f, f)
    assert taint.cover("logits", (1, 10)) == (9, 10, 0)
    assert taint.mask("layers.0.hidden", (1, 10)) is None


def test_a_single_moe_block_taints_only_the_token():
    taint = Taint("moe", ["router_scores", "topk_idx", "topk_weight", "out"])
    f = np.array([False, True, False])
    taint.add("topk_idx", f, f)
    assert taint.mask("out", (3,)).tolist() == [False, True, False]
    assert taint.mask("topk_weight", (3,)).tolist() == [False, True, False]
    assert taint.mask("router_scores", (3,)) is None


def test_an_unknown_output_name_is_left_out_from_the_flip_on():
    taint = Taint("prefill", ["layers.0.topk_idx", "layers.0.hidden", "layers.0.something_new"])
    f = np.array([[False, True, False]])
    taint.add("layers.0.topk_idx", f, f)
    assert taint.mask("layers.0.something_new", (1, 3)).tolist() == [[False, True, True]]


def test_a_shared_prefix_carries_a_flip_only_below_its_length_along_the_whole_path():
    """Request 1 reuses request 0's first 2 entries, request 2 reuses request 1's first 4: a
    flip of request 0 at position 3 stays there (request 1 computed its own position 3); one at
    position 1 reaches both."""
    shares = [(1, 0, 2), (2, 1, 4)]
    params = {"schedule": {"format": 1, "steps": [
        {"op": "share_prefix", "request": r, "from": q, "length": n} for r, q, n in shares]}}
    for pos, reached in ((3, {0}), (1, {0, 1, 2})):
        sim = simulate_schedule(2, {0}, [6, 6, 6], shares, {("request.0.layers.0.topk_idx", 0, pos): 0})
        _check("schedule", sim, params)
        got = {r for r in range(3) if any(deps for deps in sim.out[f"request.{r}.logits"][0].values())}
        assert got == reached
