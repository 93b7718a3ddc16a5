"""Training-time equations, forward values only (no backward): the MTP loss (section 2.2,
eqs. 24-25), the sequence-wise balance loss (section 2.1.2, eqs. 17-20) and the
auxiliary-loss-free bias update (section 2.1.2).  Golden values for trainers and ports.

Indexing: a training sequence holds tokens t_0 .. t_T (T + 1 ids); the main model reads
t_0 .. t_{T-1} and predicts t_1 .. t_T (T predictions); MTP module k at index i predicts t_{i+k+1},
so depth k has T - k terms.  As printed in eq. (24), each depth's sum is divided by T, not by its
number of terms.
"""

from __future__ import annotations

import numpy as np

from . import ops
from .backend import to_numpy
from .errors import InputError


def log_softmax(logits):
    """log softmax over the last axis in float64.   [..., V] -> [..., V]"""
    return ops.log_softmax(np.asarray(logits, dtype=np.float64))


def mtp_depth_loss(logits_k, tokens, k: int):
    """eq. (24): L^k = -1/T sum_i log P^k_i[t_{i+k+1}], i = 0 .. T-k-1, averaged over the batch.

    logits_k [b, >= T-k, V]: module k's logits at index i (teacher-forced, as from
    Model.forward(mtp=True), whose extra last index predicts beyond the sequence and is ignored);
    tokens int [b, T+1]."""
    tokens = to_numpy(tokens)
    T = tokens.shape[-1] - 1
    n = T - k  # terms at depth k
    if n < 1:
        raise InputError(f"depth {k} needs a sequence of more than {k + 1} tokens, got {T + 1}")
    lp = log_softmax(to_numpy(logits_k)[:, :n])  # [b, n, V]
    target = tokens[:, k + 1:k + 1 + n]  # t_{i+k+1}
    picked = np.take_along_axis(lp, target[..., None], axis=-1)[..., 0]  # [b, n]
    return float(-(picked.sum(axis=-1) / T).mean())


def mtp_loss(mtp_logits, tokens, lam: float):
    """eq. (25): L_MTP = lambda / D * sum_{k=1..D} L^k.   mtp_logits: list of D arrays."""
    D = len(mtp_logits)
    if D < 1:
        raise InputError("mtp_loss needs the logits of at least one MTP depth")
    return lam / D * sum(mtp_depth_loss(lg, tokens, k) for k, lg in enumerate(mtp_logits, 1))


def topk_mask(scores, k: int):
    """1 where s_i,t is among the K largest of its row (ties to the lower index).  [T, E] -> [T, E]"""
    scores = to_numpy(scores)
    return selection_mask(ops.topk_indices(scores, k), scores.shape[-1])


def selection_mask(idx, n_experts: int):
    """Routed indices [T, K] -> 0/1 mask [T, E]."""
    idx = to_numpy(idx)
    m = np.zeros((idx.shape[0], n_experts))
    np.put_along_axis(m, idx, 1.0, axis=-1)
    return m


def balance_loss(scores, top_k: int, alpha: float, selected=None):
    """eqs. (17)-(20), the complementary sequence-wise balance loss for ONE sequence of T tokens:

        f_i = N_r / (K_r T) sum_t 1[expert i selected for token t]       eq. (18)
        s'_i,t = s_i,t / sum_j s_j,t                                    eq. (19)
        P_i = 1/T sum_t s'_i,t                                          eq. (20)
        L_Bal = alpha sum_i f_i P_i                                     eq. (17)

    scores [T, N_r]: the affinities s_i,t (eq. 15, sigmoid, no bias).  `selected` [T, K_r]: the
    experts the router chose; when None, the plain top-K_r of s as eq. (18) prints it (the router
    itself adds the bias and the group limit)."""
    s = to_numpy(scores).astype(np.float64)  # host values (an explicit copy from a device)
    T, n_r = s.shape
    mask = topk_mask(s, top_k) if selected is None else selection_mask(selected, n_r)
    f = n_r / (top_k * T) * mask.sum(axis=0)  # eq. (18)
    s_norm = s / s.sum(axis=-1, keepdims=True)  # eq. (19)
    P = s_norm.mean(axis=0)  # eq. (20)
    return float(alpha * (f * P).sum())  # eq. (17)


def expert_load(idx, n_experts: int):
    """Tokens routed to each expert in a step: idx [T, K] -> counts [E]."""
    return np.bincount(to_numpy(idx).reshape(-1), minlength=n_experts).astype(np.float64)


def update_bias(bias, load, gamma: float = 0.001):
    """Auxiliary-loss-free balancing, after each step: b_i += gamma * sign(mean_load - load_i)
    (an overloaded expert's bias goes down by gamma, an underloaded one's up, an exactly average
    one's stays).   bias [E], load [E] -> new bias [E]"""
    load = to_numpy(load).astype(np.float64)
    return to_numpy(bias).astype(np.float64) + gamma * np.sign(load.mean() - load)
