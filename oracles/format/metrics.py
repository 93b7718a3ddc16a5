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
forgiven routing differences), its metrics are absent, not 0.0, and `compared` / `positions`
say how many token positions were compared; the checker makes such a case INCONCLUSIVE.
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


class Taint:
    """Tokens whose routing legitimately differs (a forgiven near-tie that the candidate did
    resolve the other way) and everything downstream of them: those tokens are left out of the
    comparison of later outputs. In a causal model (prefill, decode, MTP) a token changed at
    position p changes every later position of its row from the next layer on, so the taint
    spreads to the end of the row. One mask per token-axes shape: an MTP module's sequence is
    shorter, and its index i continues position i of the main model (h^0_i) and of the module
    before it (h^(k-1)_i), so it also takes their masks, cut to its length.

    `near` keeps the same masks for near-tie flips only (margin > 0, a rounding question), apart
    from exact ties decided the other way (margin 0, a tie-break convention the conventions suite
    labels): only the former make a case INCONCLUSIVE (cover)."""

    def __init__(self, causal: bool):
        self.causal = causal
        self.masks = {}  # token-axes shape ([b, s] or [T]) -> bool mask
        self.near = {}  # the same, near-tie flips (and their downstream) only
        self.reported = {}  # the same, flips the candidate reported (its own topk_idx) only
        self.reported_near = {}
        self.ALL, self.REPORTED = (self.masks, self.near), (self.reported, self.reported_near)
        # a generated stream that legitimately went another way (a forgiven near-tie) n steps
        # before its end: the sequence outputs compared after it drop their last n positions
        # (they belong to another sequence); see stream()
        self.stream_cut = 0

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

    @property
    def mask(self):
        return next(iter(self.masks.values()), None)

    def count(self) -> int:
        return int(sum(m.sum() for m in self.masks.values()))

    def mask_for(self, shape, masks=None):
        """The left-out tokens of an output whose token axes are `shape`, or None: its own mask
        and, in a causal model, the masks of the longer sequences of the same rows, cut to it."""
        masks = self.masks if masks is None else masks
        m = masks.get(shape)
        if self.causal and len(shape) == 2:
            for s, other in masks.items():
                if len(s) == 2 and s[0] == shape[0] and s[1] > shape[1]:
                    m = other[:, :shape[1]] if m is None else (m | other[:, :shape[1]])
        return m

    def cover(self, shape, which=None) -> tuple[int, int, int]:
        """For an output whose token axes are `shape` -> (positions compared, positions, positions
        left out only because of exact ties decided the other way). which: ALL or REPORTED."""
        masks, near_masks = which or self.ALL
        n = int(np.prod(shape))
        m = self.mask_for(shape, masks)
        if m is None:
            return n, n, 0
        near = self.mask_for(shape, near_masks)
        exact = int((m & ~near).sum()) if near is not None else int(m.sum())
        return n - int(m.sum()), n, exact

    def select(self, a, lead: int, masks=None):
        """a [*token_axes, ...] -> the untainted tokens' rows, [n, ...] (or `a` when untainted)."""
        a = np.asarray(a)
        m = self.mask_for(a.shape[:lead], masks)
        return a if m is None else a[~m]

    def update(self, c_idx, e_idx, margin, eps, exact_ties=True):
        k = e_idx.shape[-1]
        lead = e_idx.shape[:-1]
        c2 = np.sort(np.asarray(c_idx).reshape(-1, k), -1)
        e2 = np.sort(np.asarray(e_idx).reshape(-1, k), -1)
        flipped = (c2 != e2).any(-1) & forgiven(margin, eps, exact_ties)
        self._add(flipped.reshape(lead), (flipped & _positive(margin)).reshape(lead), reported=True)

    def assume(self, e_idx, margin, eps, exact_ties=True):
        """The routing a candidate did not report (logits-only): any token whose margin is within
        the profile's rounding may have gone either way, so all of them count as flipped, from
        the golden's own margins."""
        lead = np.asarray(e_idx).shape[:-1]
        f = forgiven(margin, eps, exact_ties)
        self._add(f.reshape(lead), (f & _positive(margin)).reshape(lead), reported=False)

    def _add(self, flipped, near, reported):
        pairs = [(self.masks, flipped), (self.near, near)]
        if reported:
            pairs += [(self.reported, flipped), (self.reported_near, near)]
        for masks, new in pairs:
            if not new.any():
                continue
            if self.causal and new.ndim == 2:
                new = np.maximum.accumulate(new, axis=1)
            old = masks.get(new.shape)
            masks[new.shape] = new if old is None else (old | new)


def _positive(margin):
    return np.asarray(margin, np.float64).reshape(-1) > 0


def compare(name, kind, c, e, expected, tols, taint, c_idx=None):
    """The metrics of one output -> (values, the metric names that are judged). Tokens tainted by
    an earlier forgiven routing difference are left out; indices outputs update the taint.
    Where tokens were left out, `compared` and `positions` count the token positions."""
    cut = (lambda a: a)
    if kind != "tokens" and taint is not None and taint.stream_cut and np.ndim(e) >= 2:
        keep = max(np.shape(e)[1] - taint.stream_cut, 0)  # positions of the expected sequence
        cut = (lambda a: None if a is None else np.asarray(a)[:, :keep])
        c, e, c_idx = cut(c), cut(e), cut(c_idx)
    cover = None
    if kind in ("continuous", "logits"):
        measure = continuous if kind == "continuous" else (lambda a, b: logits(a, b, tols["logit_eps"]))
        names = CONTINUOUS_METRICS if kind == "continuous" else LOGIT_METRICS
        lead = None if taint is None else next(
            (n for n in sorted({len(s) for s in taint.masks})
             if taint.mask_for(np.asarray(e).shape[:n]) is not None), None)
        if lead is None:
            vals = measure(c, e)
        else:
            # routing the candidate did not report may or may not have flipped: first compare
            # leaving out only the flips it reported; if that passes, nothing needed forgiving
            shape = np.asarray(e).shape[:lead]
            for which in (taint.REPORTED, taint.ALL):
                vals = measure(taint.select(c, lead, which[0]), taint.select(e, lead, which[0]))
                cover = taint.cover(shape, which)
                if which is taint.ALL or (vals and all(
                        vals[m] <= tols[m]["tol"] for m in names if m in tols)):
                    break
    elif kind == "indices":
        margin = cut(expected.get(name[: -len("topk_idx")] + "topk_margin"))
        lead = e.ndim - 1
        cs, es = (taint.select(c, lead), taint.select(e, lead)) if taint else (c, e)
        ms = taint.select(margin, lead) if (taint and margin is not None) else margin
        if taint is not None and taint.mask_for(np.asarray(e).shape[:lead]) is not None:
            cover = taint.cover(np.asarray(e).shape[:lead])
        ties = tols.get("exact_ties", "forgiven") == "forgiven"
        vals, names = indices(cs, es, ms, tols["margin_eps"], ties), ("mismatch",)
        if taint is not None and margin is not None:
            taint.update(c, e, margin, tols["margin_eps"], ties)
    elif kind == "routing_weights":
        stem = name[: -len("topk_weight")]
        e_idx = cut(expected[stem + "topk_idx"])
        lead = e.ndim - 1
        sel = (lambda a: taint.select(a, lead)) if taint else (lambda a: a)
        margin = cut(expected.get(stem + "topk_margin"))
        n_exp = expected[stem + "router_scores"].shape[-1] if stem + "router_scores" in expected \
            else int(max(e_idx.max(), c_idx.max())) + 1
        vals = routing_weights(sel(c_idx), sel(c), sel(e_idx), sel(e), n_exp,
                               None if margin is None else sel(margin), tols["margin_eps"],
                               tols.get("exact_ties", "forgiven") == "forgiven")
        names = CONTINUOUS_METRICS
        if taint is not None and taint.mask_for(np.asarray(e).shape[:lead]) is not None:
            cover = taint.cover(np.asarray(e).shape[:lead])
    else:  # tokens
        vals, names = tokens(c, e, expected["tokens_margin"], tols["logit_eps"]), ("mismatch",)
        if taint is not None and vals["mismatch"] == 0:
            taint.stream(c, e, vals["compared"])
    if taint is not None and taint.count() and kind != "indices":
        vals["not_compared"] = taint.count()
    if cover is not None:
        vals["compared"], vals["positions"], exact = cover
        if exact:
            vals["exact_tie_positions"] = exact
    return vals, names
