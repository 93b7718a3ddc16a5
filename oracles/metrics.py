"""Error metrics, one function per output type. Everything in float64.

continuous   nmse = sum (c - e)^2 / sum e^2; max_rel = max |c - e| / rms(e);
             norm = | ||c|| / ||e|| - 1 |  (cosine alone misses a wrong scale)
logits       the above, plus top1 (fraction of positions whose argmax differs, counting only
             positions whose top-2 gap exceeds the margin), topk (1 - mean overlap of the top-5
             sets) and kl (mean KL(softmax(e) || softmax(c)))
indices      mismatch: fraction of tokens whose expert SET differs, forgiving tokens whose
             routing margin is within the profile's rounding
routing_weights   continuous metrics on the dense [T, E] weight matrix, forgiven tokens left out
tokens       mismatch: 1 if the streams differ before the first step whose logit margin is
             within the profile's rounding, else 0
"""

from __future__ import annotations

import numpy as np

from refimpl.ops import log_softmax

TOPK = 5
CONTINUOUS_METRICS = ("nmse", "max_rel", "norm")
LOGIT_METRICS = CONTINUOUS_METRICS + ("top1", "topk", "kl")


def continuous(c, e) -> dict:
    c, e = np.asarray(c, np.float64), np.asarray(e, np.float64)
    if e.size == 0:
        return {"nmse": 0.0, "max_rel": 0.0, "norm": 0.0}
    err = c - e
    ref2 = float(np.sum(e * e))
    n = max(e.size, 1)
    rms = (ref2 / n) ** 0.5
    tiny = 1e-300
    return {"nmse": float(np.sum(err * err)) / max(ref2, tiny),
            "max_rel": float(np.max(np.abs(err))) / max(rms, tiny) if e.size else 0.0,
            "norm": abs(float(np.sqrt(np.sum(c * c))) / max(ref2 ** 0.5, tiny) - 1.0)}


def logits(c, e, margin_eps: float) -> dict:
    out = continuous(c, e)
    c, e = np.asarray(c, np.float64), np.asarray(e, np.float64)
    if e.size == 0:  # every position left out (downstream of forgiven routing differences)
        return {**out, "top1": 0.0, "topk": 0.0, "kl": 0.0}
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
    return {"mismatch": float((bad & ~ok).mean()) if len(bad) else 0.0, "forgiven": int(ok.sum())}


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
    dc, de = dense_weights(c_idx, c_w, n_experts), dense_weights(e_idx, e_w, n_experts)
    if margin is not None:
        keep = ~forgiven(margin, eps, exact_ties)
        dc, de = dc[keep], de[keep]
    if de.size == 0:
        return {"nmse": 0.0, "max_rel": 0.0, "norm": 0.0}
    return continuous(dc, de)


def tokens(c, e, margin, eps: float) -> dict:
    c, e = np.asarray(c).reshape(-1), np.asarray(e).reshape(-1)
    m = np.asarray(margin, np.float64).reshape(-1)
    for j in range(len(e)):
        if m[j] <= eps:  # a near-tie: any continuation from here on is acceptable
            return {"mismatch": 0.0, "compared": j}
        if j >= len(c) or c[j] != e[j]:
            return {"mismatch": 1.0, "compared": j + 1}
    return {"mismatch": 0.0, "compared": len(e)}


class Taint:
    """Tokens whose routing legitimately differs (a forgiven near-tie that the candidate did
    resolve the other way) and everything downstream of them: those tokens are left out of the
    comparison of later outputs. In a causal model (prefill, decode, MTP) a token changed at
    position p changes every later position of its row from the next layer on, so the taint
    spreads to the end of the row. One mask per token-axes shape: an MTP module's sequence is
    shorter, and its index i continues position i of the main model (h^0_i) and of the module
    before it (h^(k-1)_i), so it also takes their masks, cut to its length."""

    def __init__(self, causal: bool):
        self.causal = causal
        self.masks = {}  # token-axes shape ([b, s] or [T]) -> bool mask

    @property
    def mask(self):
        return next(iter(self.masks.values()), None)

    def count(self) -> int:
        return int(sum(m.sum() for m in self.masks.values()))

    def mask_for(self, shape):
        """The left-out tokens of an output whose token axes are `shape`, or None: its own mask
        and, in a causal model, the masks of the longer sequences of the same rows, cut to it."""
        m = self.masks.get(shape)
        if self.causal and len(shape) == 2:
            for s, other in self.masks.items():
                if len(s) == 2 and s[0] == shape[0] and s[1] > shape[1]:
                    m = other[:, :shape[1]] if m is None else (m | other[:, :shape[1]])
        return m

    def select(self, a, lead: int):
        """a [*token_axes, ...] -> the untainted tokens' rows, [n, ...] (or `a` when untainted)."""
        a = np.asarray(a)
        m = self.mask_for(a.shape[:lead])
        return a if m is None else a[~m]

    def update(self, c_idx, e_idx, margin, eps, exact_ties=True):
        k = e_idx.shape[-1]
        lead = e_idx.shape[:-1]
        c2 = np.sort(np.asarray(c_idx).reshape(-1, k), -1)
        e2 = np.sort(np.asarray(e_idx).reshape(-1, k), -1)
        flipped = ((c2 != e2).any(-1) & forgiven(margin, eps, exact_ties)).reshape(lead)
        if not flipped.any():
            return
        if self.causal and flipped.ndim == 2:
            flipped = np.maximum.accumulate(flipped, axis=1)
        old = self.masks.get(lead)
        self.masks[lead] = flipped if old is None else (old | flipped)


def compare(name, kind, c, e, expected, tols, taint, c_idx=None):
    """The metrics of one output -> (values, the metric names that are judged). Tokens tainted by
    an earlier forgiven routing difference are left out; indices outputs update the taint."""
    if kind in ("continuous", "logits") and taint is not None:
        for lead in sorted({len(shape) for shape in taint.masks}):
            if taint.mask_for(np.asarray(e).shape[:lead]) is not None:
                c, e = taint.select(c, lead), taint.select(e, lead)
                break
    if kind == "continuous":
        vals, names = continuous(c, e), CONTINUOUS_METRICS
    elif kind == "logits":
        vals, names = logits(c, e, tols["logit_eps"]), LOGIT_METRICS
    elif kind == "indices":
        margin = expected.get(name[: -len("topk_idx")] + "topk_margin")
        lead = e.ndim - 1
        cs, es = (taint.select(c, lead), taint.select(e, lead)) if taint else (c, e)
        ms = taint.select(margin, lead) if (taint and margin is not None) else margin
        ties = tols.get("exact_ties", "forgiven") == "forgiven"
        vals, names = indices(cs, es, ms, tols["margin_eps"], ties), ("mismatch",)
        if taint is not None and margin is not None:
            taint.update(c, e, margin, tols["margin_eps"], ties)
    elif kind == "routing_weights":
        stem = name[: -len("topk_weight")]
        e_idx = expected[stem + "topk_idx"]
        lead = e.ndim - 1
        sel = (lambda a: taint.select(a, lead)) if taint else (lambda a: a)
        margin = expected.get(stem + "topk_margin")
        n_exp = expected[stem + "router_scores"].shape[-1] if stem + "router_scores" in expected \
            else int(max(e_idx.max(), c_idx.max())) + 1
        vals = routing_weights(sel(c_idx), sel(c), sel(e_idx), sel(e), n_exp,
                               None if margin is None else sel(margin), tols["margin_eps"],
                               tols.get("exact_ties", "forgiven") == "forgiven")
        names = CONTINUOUS_METRICS
    else:  # tokens
        vals, names = tokens(c, e, expected["tokens_margin"], tols["logit_eps"]), ("mismatch",)
    if taint is not None and taint.count() and kind != "indices":
        vals["not_compared"] = taint.count()
    return vals, names
