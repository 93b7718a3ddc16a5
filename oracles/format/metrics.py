"""Error metrics, one function per output type. Everything in float64.

continuous   nmse = sum (c - e)^2 / sum e^2; max_rel = max |c - e| / rms(e);
             norm = | ||c|| / ||e|| - 1 |  (cosine alone misses a wrong scale)
logits       the above, plus top1 (fraction of positions whose argmax differs, counting only
             positions whose top-2 gap exceeds the margin), topk (1 - mean overlap of the top-5
             sets) and kl (mean KL(softmax(e) || softmax(c)))
indices      mismatch: fraction of tokens whose expert SET differs, forgiving tokens whose
             routing margin is within the profile's rounding
routing_weights   continuous metrics on the dense [T, E] weight matrix, leaving out forgiven
             tokens routed to another expert set
tokens       mismatch: 1 if the streams part at a step whose logit margin is beyond the
             profile's rounding, else 0 (a candidate may continue either way at a near-tie)

Nothing compared is not zero error: when every position of an output is left out (downstream of
forgiven routing differences, taint.py), its metrics are absent, not 0.0, and `compared` /
`positions` / `not_compared` say how many of its token positions were and were not compared;
the checker makes such a case INCONCLUSIVE.
"""

from __future__ import annotations

import numpy as np

from refimpl.ops import log_softmax

TOPK = 5
CONTINUOUS_METRICS = ("nmse", "max_rel", "norm")
LOGIT_METRICS = CONTINUOUS_METRICS + ("top1", "topk", "kl")


def continuous(c, e) -> dict:
    c, e = np.asarray(c, np.float64), np.asarray(e, np.float64)
    if e.size == 0:  # nothing to compare: no metric values
        return {}
    err = c - e
    ref2 = float(np.sum(e * e))
    n = max(e.size, 1)
    rms = (ref2 / n) ** 0.5
    tiny = 1e-300
    c_norm = float(np.sqrt(np.sum(c * c)))
    return {"nmse": float(np.sum(err * err)) / max(ref2, tiny),
            "max_rel": float(np.max(np.abs(err))) / max(rms, tiny) if e.size else 0.0,
            # an all-zero output matched by zeros has no norm error (not |0 / tiny - 1| = 1)
            "norm": 0.0 if c_norm == 0.0 and ref2 == 0.0 else
            abs(c_norm / max(ref2 ** 0.5, tiny) - 1.0)}


def logits(c, e, margin_eps: float) -> dict:
    out = continuous(c, e)
    c, e = np.asarray(c, np.float64), np.asarray(e, np.float64)
    if e.size == 0:  # every position left out (downstream of forgiven routing differences)
        return {}
    v = e.shape[-1]
    c2, e2 = c.reshape(-1, v), e.reshape(-1, v)
    srt = -np.sort(-e2, axis=-1)
    decided = (srt[:, 0] - srt[:, 1]) > margin_eps if v > 1 else np.ones(len(e2), bool)
    differ = (np.argmax(c2, axis=-1) != np.argmax(e2, axis=-1)) & decided
    out["top1"] = float(differ.mean()) if len(e2) else 0.0
    k = min(TOPK, v)
    tc = np.argsort(-c2, axis=-1, kind="stable")[:, :k]
    te = np.argsort(-e2, axis=-1, kind="stable")[:, :k]
    overlap = [len(set(a) & set(b)) / k for a, b in zip(tc.tolist(), te.tolist())]
    out["topk"] = 1.0 - float(np.mean(overlap)) if overlap else 0.0
    lp, lq = log_softmax(e2), log_softmax(c2)
    out["kl"] = max(float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=-1))), 0.0)
    return out


def forgiven(margin, eps: float, exact_ties: bool = True):
    """Tokens whose routing margin is within the profile's rounding (may choose differently).
    exact_ties=False: an exact tie (margin 0) is decided by the case's tie-break convention
    (the conventions suite's topk_ties cases), not forgiven."""
    m = np.asarray(margin, np.float64).reshape(-1)
    return (m <= eps) & ((m > 0) | exact_ties)


def indices(c, e, margin, eps: float, exact_ties: bool = True) -> dict:
    """Expert sets per token; order within a token's K picks does not matter."""
    k = e.shape[-1]
    c2 = np.sort(np.asarray(c).reshape(-1, k), axis=-1)
    e2 = np.sort(np.asarray(e).reshape(-1, k), axis=-1)
    bad = (c2 != e2).any(axis=-1)
    ok = np.zeros(len(bad), bool) if margin is None else forgiven(margin, eps, exact_ties)
    if not len(bad):
        return {"forgiven": 0}
    return {"mismatch": float((bad & ~ok).mean()), "forgiven": int(ok.sum())}


def dense_weights(idx, w, n_experts: int):
    """[..., K] indices and weights -> [T, E] with each token's weight at its experts."""
    k = idx.shape[-1]
    i2, w2 = np.asarray(idx).reshape(-1, k), np.asarray(w, np.float64).reshape(-1, k)
    out = np.zeros((len(i2), n_experts))
    ok = (i2 >= 0) & (i2 < n_experts)
    rows = np.repeat(np.arange(len(i2)), k).reshape(-1, k)
    np.add.at(out, (rows[ok], i2[ok]), w2[ok])
    return out


def routing_weights(c_idx, c_w, e_idx, e_w, n_experts, margin, eps, exact_ties=True) -> dict:
    """Tokens left out: forgiven ones the candidate routed to another expert set (their weights
    belong to other experts). A near-tie token routed to the expected set is compared."""
    dc, de = dense_weights(c_idx, c_w, n_experts), dense_weights(e_idx, e_w, n_experts)
    if margin is not None:
        k = np.shape(e_idx)[-1]
        differ = (np.sort(np.asarray(c_idx).reshape(-1, k), -1)
                  != np.sort(np.asarray(e_idx).reshape(-1, k), -1)).any(-1)
        keep = ~(forgiven(margin, eps, exact_ties) & differ)
        dc, de = dc[keep], de[keep]
    return continuous(dc, de)


def tokens(c, e, margin, eps: float) -> dict:
    """The streams agree up to step d, so the candidate saw the same context there: parting at
    d is acceptable only if step d is a near-tie (and then nothing after d can be compared)."""
    c, e = np.asarray(c).reshape(-1), np.asarray(e).reshape(-1)
    m = np.asarray(margin, np.float64).reshape(-1)
    n = len(e)
    for j in range(n):
        if j >= len(c) or c[j] != e[j]:
            if m[j] <= eps:  # a near-tie: either continuation is acceptable from here on
                return {"mismatch": 0.0, "compared": j, "positions": n}
            return {"mismatch": 1.0, "compared": j + 1, "positions": n}
    return {"mismatch": 0.0, "compared": n, "positions": n}


def compare(name, kind, c, e, expected, tols, taint, c_idx=None):
    """The metrics of one output -> (values, the metric names that are judged). Positions that a
    forgiven routing difference reaches (taint.Taint, filled before any output is compared; this
    module does not import it) are
    left out; `compared`, `positions` and `not_compared` then count this output's token
    positions."""
    cut = (lambda a: a)
    if kind != "tokens" and taint is not None and taint.stream_cut and np.ndim(e) >= 2:
        cut = taint.cut
        c, e, c_idx = cut(c), cut(e), cut(c_idx)
    cover = None
    shape = np.shape(e)
    lead = taint.lead(name, shape) if taint is not None else 0
    tainted = taint is not None and kind != "tokens" and taint.any_for(name, shape[:lead])
    if kind in ("continuous", "logits"):
        measure = continuous if kind == "continuous" else (lambda a, b: logits(a, b, tols["logit_eps"]))
        names = CONTINUOUS_METRICS if kind == "continuous" else LOGIT_METRICS
        if not tainted:
            vals = measure(c, e)
        else:
            # routing the candidate did not report may or may not have flipped: first compare
            # leaving out only the flips it reported; if that passes, nothing needed forgiving
            for which in ("reported", "all"):  # taint.REPORTED, taint.ALL
                vals = measure(taint.select(c, name, lead, which), taint.select(e, name, lead, which))
                cover = taint.cover(name, shape[:lead], which)
                if which == "all" or (vals and all(
                        vals[m] <= tols[m]["tol"] for m in names if m in tols)):
                    break
    elif kind == "indices":
        margin = cut(expected.get(name[: -len("topk_idx")] + "topk_margin"))
        lead = e.ndim - 1
        sel = (lambda a: taint.select(a, name, lead)) if tainted else (lambda a: a)
        cs, es = sel(c), sel(e)
        ms = sel(margin) if margin is not None else None
        if tainted:
            cover = taint.cover(name, shape[:lead])
        ties = tols.get("exact_ties", "forgiven") == "forgiven"
        vals, names = indices(cs, es, ms, tols["margin_eps"], ties), ("mismatch",)
        bad = None if taint is None else taint.unexplained.get(name)
        if bad is not None and bad.any():
            # near-ties its own router input does not explain (routing.explained): failures,
            # wherever they are (their positions are never left out)
            n = int(np.prod(shape[:lead]))
            vals["unexplained"] = int(bad.sum())
            vals["forgiven"] = max(vals.get("forgiven", 0) - int(bad.sum()), 0)
            vals["mismatch"] = max(vals.get("mismatch", 0.0), float(bad.sum()) / n)
    elif kind == "routing_weights":
        stem = name[: -len("topk_weight")]
        e_idx = cut(expected[stem + "topk_idx"])
        lead = e.ndim - 1
        sel = (lambda a: taint.select(a, name, lead)) if tainted else (lambda a: a)
        margin = cut(expected.get(stem + "topk_margin"))
        n_exp = expected[stem + "router_scores"].shape[-1] if stem + "router_scores" in expected \
            else int(max(e_idx.max(), c_idx.max())) + 1
        vals = routing_weights(sel(c_idx), sel(c), sel(e_idx), sel(e), n_exp,
                               None if margin is None else sel(margin), tols["margin_eps"],
                               tols.get("exact_ties", "forgiven") == "forgiven")
        names = CONTINUOUS_METRICS
        if tainted:
            cover = taint.cover(name, shape[:lead])
    else:  # tokens
        vals, names = tokens(c, e, expected["tokens_margin"], tols["logit_eps"]), ("mismatch",)
        if taint is not None and vals["mismatch"] == 0:
            taint.stream(c, e, vals["compared"])
    if cover is not None:
        vals["compared"], vals["positions"], exact = cover
        vals["not_compared"] = vals["positions"] - vals["compared"]
        if exact:
            vals["exact_tie_positions"] = exact
    return vals, names
