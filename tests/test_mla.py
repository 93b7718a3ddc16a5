"""MLA: absorbed equals naive, an independent per-head loop, causality, and the latent cache."""

import numpy as np
from hypothesis import example, given
from hypothesis import strategies as st

from refimpl import mla
from tests.helpers import rel_err


def _inputs(seed, b, s, t, heads, d_nope, d_rope, d_v, d_c):
    rng = np.random.default_rng(seed)
    q_nope = rng.normal(size=(b, s, heads, d_nope))
    q_rope = rng.normal(size=(b, s, heads, d_rope))
    c_kv = rng.normal(size=(b, t, d_c))
    k_rope = rng.normal(size=(b, t, d_rope))
    kv_b = rng.normal(size=(heads * (d_nope + d_v), d_c)) * d_c ** -0.5
    return q_nope, q_rope, c_kv, k_rope, kv_b


shapes = st.tuples(st.integers(1, 3), st.integers(1, 9), st.integers(0, 9), st.integers(1, 5),
                   st.sampled_from([2, 8, 16]), st.sampled_from([2, 4, 8]), st.sampled_from([2, 8]),
                   st.sampled_from([4, 16, 32]))


@given(st.integers(0, 2**31), shapes)
@example(0, (1, 1, 0, 1, 2, 2, 2, 4))   # one token, nothing cached
@example(0, (2, 1, 8, 4, 16, 8, 8, 32))  # one decode step at a nonzero start
def test_absorbed_mla_equals_naive(seed, shape):
    b, s, past, heads, d_nope, d_rope, d_v, d_c = shape
    t = past + s
    args = _inputs(seed, b, s, t, heads, d_nope, d_rope, d_v, d_c)
    mask = mla.causal_mask(np.arange(past, t), np.arange(t), np)
    naive = mla.attention_naive(*args, 0.3, mask)
    absorbed = mla.attention_absorbed(*args, 0.3, mask)
    assert naive.shape == (b, s, heads, d_v)
    assert rel_err(absorbed, naive) < 1e-12


def test_naive_attention_equals_a_plain_loop():
    """eqs. (2)-(5), (10) written out per batch row, head and query, independently."""
    b, s, heads, d_nope, d_rope, d_v, d_c = 2, 5, 3, 4, 2, 3, 6
    q_nope, q_rope, c_kv, k_rope, kv_b = _inputs(7, b, s, s, heads, d_nope, d_rope, d_v, d_c)
    scale = 0.37
    got = mla.attention_naive(q_nope, q_rope, c_kv, k_rope, kv_b, scale,
                              mla.causal_mask(np.arange(s), np.arange(s), np))
    W = kv_b.reshape(heads, d_nope + d_v, d_c)
    want = np.zeros((b, s, heads, d_v))
    for bi in range(b):
        for h in range(heads):
            for i in range(s):
                logits = []
                for j in range(i + 1):
                    k = np.concatenate([W[h, :d_nope] @ c_kv[bi, j], k_rope[bi, j]])
                    q = np.concatenate([q_nope[bi, i, h], q_rope[bi, i, h]])
                    logits.append(q @ k * scale)
                p = np.exp(np.array(logits) - max(logits))
                p /= p.sum()
                want[bi, i, h] = sum(p[j] * (W[h, d_nope:] @ c_kv[bi, j]) for j in range(i + 1))
    assert rel_err(got, want) < 1e-13


def test_latent_projection_splits_one_matrix_and_normalises_only_c_kv():
    rng = np.random.default_rng(1)
    h = rng.normal(size=(1, 3, 10))
    w = {"kv_a_proj_with_mqa": rng.normal(size=(6 + 4, 10)), "kv_a_layernorm": rng.uniform(0.5, 1.5, 6)}
    c_kv, k_pre = mla.latent_kv(h, w, 6)
    full = h @ w["kv_a_proj_with_mqa"].T
    np.testing.assert_allclose(k_pre, full[..., 6:], rtol=1e-15)  # the rope key is not normalised
    c = full[..., :6]
    np.testing.assert_allclose(c_kv, c / np.sqrt((c ** 2).mean(-1, keepdims=True) + 1e-6)
                               * w["kv_a_layernorm"], rtol=1e-14)


def test_causal_mask():
    m = mla.causal_mask(np.arange(2, 4), np.arange(4), np)
    assert m.tolist() == [[True, True, True, False], [True, True, True, True]]


@given(st.integers(0, 2**31), shapes)
def test_absorbed_mla_equals_its_einsum_subscripts(seed, shape):
    """The subscripts attention_absorbed's docstring gives (DeepSeek's einsum style), computed
    with np.einsum: the matrix-product code computes the same contractions."""
    b, s, past, heads, d_nope, d_rope, d_v, d_c = shape
    t = past + s
    q_nope, q_rope, c_kv, k_rope, kv_b = _inputs(seed, b, s, t, heads, d_nope, d_rope, d_v, d_c)
    mask = mla.causal_mask(np.arange(past, t), np.arange(t), np)
    w_uk, w_uv = mla.split_kv_b(kv_b, heads, d_nope)
    q_lat = np.einsum("bshd,hdc->bshc", q_nope, w_uk)
    scores = (np.einsum("bshc,btc->bsht", q_lat, c_kv)
              + np.einsum("bshr,btr->bsht", q_rope, k_rope)) * 0.3
    scores = np.where(mask[:, None, :], scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    want = np.einsum("bshc,hvc->bshv", np.einsum("bsht,btc->bshc", p, c_kv), w_uv)
    assert rel_err(mla.attention_absorbed(q_nope, q_rope, c_kv, k_rope, kv_b, 0.3, mask), want) < 1e-12
