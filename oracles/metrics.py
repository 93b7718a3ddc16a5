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

TOPK = 5


def continuous(c, e) -> dict:
    c, e = np.asarray(c, np.float64), np.asarray(e, np.float64)
    err = c - e
    ref2 = float(np.sum(e * e))
    n = max(e.size, 1)
    rms = (ref2 / n) ** 0.5
    tiny = 1e-300
    return {"nmse": float(np.sum(err * err)) / max(ref2, tiny),
            "max_rel": float(np.max(np.abs(err))) / max(rms, tiny) if e.size else 0.0,
            "norm": abs(float(np.sqrt(np.sum(c * c))) / max(ref2 ** 0.5, tiny) - 1.0)}


def _log_softmax(x):
    m = x.max(axis=-1, keepdims=True)
    y = x - m
    return y - np.log(np.exp(y).sum(axis=-1, keepdims=True))


def logits(c, e, margin_eps: float) -> dict:
    out = continuous(c, e)
    c, e = np.asarray(c, np.float64), np.asarray(e, np.float64)
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
    lp, lq = _log_softmax(e2), _log_softmax(c2)
    out["kl"] = max(float(np.mean(np.sum(np.exp(lp) * (lp - lq), axis=-1))), 0.0)
    return out


def forgiven(margin, eps: float):
    """Tokens whose routing margin is within the profile's rounding (may choose differently)."""
    return np.asarray(margin, np.float64).reshape(-1) <= eps


def indices(c, e, margin, eps: float) -> dict:
    """Expert sets per token; order within a token's K picks does not matter."""
    k = e.shape[-1]
    c2 = np.sort(np.asarray(c).reshape(-1, k), axis=-1)
    e2 = np.sort(np.asarray(e).reshape(-1, k), axis=-1)
    bad = (c2 != e2).any(axis=-1)
    if margin is not None:
        bad &= ~forgiven(margin, eps)
    return {"mismatch": float(bad.mean()) if len(bad) else 0.0,
            "forgiven": int(forgiven(margin, eps).sum()) if margin is not None else 0}


def dense_weights(idx, w, n_experts: int):
    """[..., K] indices and weights -> [T, E] with each token's weight at its experts."""
    k = idx.shape[-1]
    i2, w2 = np.asarray(idx).reshape(-1, k), np.asarray(w, np.float64).reshape(-1, k)
    out = np.zeros((len(i2), n_experts))
    ok = (i2 >= 0) & (i2 < n_experts)
    rows = np.repeat(np.arange(len(i2)), k).reshape(-1, k)
    np.add.at(out, (rows[ok], i2[ok]), w2[ok])
    return out


def routing_weights(c_idx, c_w, e_idx, e_w, n_experts, margin, eps) -> dict:
    dc, de = dense_weights(c_idx, c_w, n_experts), dense_weights(e_idx, e_w, n_experts)
    if margin is not None:
        keep = ~forgiven(margin, eps)
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
