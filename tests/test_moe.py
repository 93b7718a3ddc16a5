"""DeepSeekMoE: routing properties, the -inf group mask, ties, and vectorised dispatch against a
per-token loop."""

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from refimpl import Config, moe
from refimpl.ops import sigmoid
from tests.helpers import rel_err

routing = st.tuples(st.sampled_from([1, 2, 4, 8]), st.integers(2, 6), st.integers(1, 8),
                    st.integers(1, 8), st.integers(0, 2**31))


def _draw(n_group, per_group, topk_group, top_k, seed, tokens=5):
    topk_group = min(topk_group, n_group)
    top_k = min(top_k, topk_group * per_group)
    rng = np.random.default_rng(seed)
    e = n_group * per_group
    scores = sigmoid(rng.normal(size=(tokens, e)))
    bias = rng.normal(0, 0.3, size=e)
    return scores, bias, n_group, topk_group, top_k


@given(routing)
@example((8, 32, 4, 8, 0))  # the V3 shape
def test_routing_picks_k_distinct_experts_inside_the_kept_groups(params):
    scores, bias, n_group, topk_group, top_k, = _draw(*params)
    idx = moe.select_experts(scores, bias, n_group, topk_group, top_k, "noaux_tc")
    per_group = scores.shape[1] // n_group
    biased = scores + bias
    for t in range(scores.shape[0]):
        assert len(set(idx[t].tolist())) == top_k
        groups = biased[t].reshape(n_group, per_group)
        gscore = np.sort(groups, axis=1)[:, -2:].sum(1)  # sum of the top-2 biased scores
        kept = sorted(range(n_group), key=lambda g: (-gscore[g], g))[:topk_group]
        assert {int(i) // per_group for i in idx[t]} <= set(kept)
        # and they are the best top_k of the kept groups by biased score
        allowed = [i for i in range(scores.shape[1]) if i // per_group in kept]
        best = sorted(allowed, key=lambda i: (-biased[t, i], i))[:top_k]
        assert idx[t].tolist() == best


@given(routing, st.booleans())
def test_weights_come_from_unbiased_scores_and_sum_to_the_scaling_factor(params, norm):
    scores, bias, n_group, topk_group, top_k = _draw(*params)
    idx = moe.select_experts(scores, bias, n_group, topk_group, top_k, "noaux_tc")
    g = moe.routing_weights(scores, idx, norm, 2.5)
    picked = np.take_along_axis(scores, idx, -1)  # s, never s + b
    if norm:
        np.testing.assert_allclose(g.sum(-1), 2.5, rtol=1e-14)
        np.testing.assert_allclose(g, picked / picked.sum(-1, keepdims=True) * 2.5, rtol=1e-14)
    else:
        np.testing.assert_allclose(g, picked * 2.5, rtol=1e-15)


def test_excluded_groups_are_minus_inf_not_zero():
    """Biased scores below zero: a 0.0 mask would let an excluded expert (score 0) beat kept
    experts with negative biased scores."""
    scores = np.array([[0.05, 0.04, 0.9, 0.8]])  # groups {0,1} and {2,3}
    bias = np.array([-0.2, -0.2, -1.0, -0.95])     # biased: [-0.15, -0.16, -0.1, -0.15]
    # group scores: -0.31 and -0.25 -> keep group 1 only; pick 2 from {2, 3}
    idx = moe.select_experts(scores, bias, 2, 1, 2, "noaux_tc")
    assert idx.tolist() == [[2, 3]]
    # what a 0.0-masked implementation picks: the zeros of group 0 beat -0.1 and -0.15
    biased = scores + bias
    zero_masked = np.where([[False, False, True, True]], biased, 0.0)
    assert np.argsort(-zero_masked[0], kind="stable")[:2].tolist() == [0, 1]
    # group_mask is that one place, its fill a parameter (the zero_group_mask mutant's 0.0)
    np.testing.assert_array_equal(moe.group_mask(biased, 2, 1, "noaux_tc"),
                                  [[-np.inf, -np.inf, biased[0, 2], biased[0, 3]]])
    np.testing.assert_array_equal(moe.group_mask(biased, 2, 1, "noaux_tc", fill=0.0), zero_masked)


def test_exact_ties_go_to_the_lower_index():
    scores = np.full((1, 8), 0.5)
    idx = moe.select_experts(scores, np.zeros(8), 4, 2, 3, "noaux_tc")
    assert idx.tolist() == [[0, 1, 2]]  # groups 0 and 1 win the group tie, experts 0,1,2
    scores = np.array([[0.1, 0.7, 0.7, 0.2, 0.7, 0.7, 0.3, 0.3]])
    idx = moe.select_experts(scores, np.zeros(8), 4, 4, 3, "noaux_tc")
    assert idx.tolist() == [[1, 2, 4]]


def test_group_score_is_the_sum_of_the_top_two():
    biased = np.array([[0.9, 0.0, 0.0, 0.6, 0.5, 0.0]])  # groups of 3: top2 sums 0.9 and 1.1
    np.testing.assert_allclose(moe.group_scores(biased, 2, "noaux_tc"), [[0.9, 1.1]])
    np.testing.assert_allclose(moe.group_scores(biased, 2, "group_limited_greedy"), [[0.9, 0.6]])
    # max would keep group 0, top-2 sum keeps group 1
    assert moe.select_experts(biased, None, 2, 1, 1, "noaux_tc").tolist() == [[3]]
    assert moe.select_experts(biased, None, 2, 1, 1, "group_limited_greedy").tolist() == [[0]]


def test_softmax_scoring_v2():
    cfg = Config.preset("tiny").replace(scoring_func="softmax", topk_method="greedy",
                                        norm_topk_prob=False, routed_scaling_factor=1.0)
    rng = np.random.default_rng(0)
    u, w = rng.normal(size=(3, 64)), rng.normal(size=(16, 64)) * 0.1
    s, idx, g = moe.route(u, w, np.full(16, 5.0), cfg)  # a bias is ignored without noaux_tc
    logits = u @ w.T
    want = np.exp(logits - logits.max(1, keepdims=True))
    want /= want.sum(1, keepdims=True)
    np.testing.assert_allclose(s, want, rtol=1e-14)
    assert idx.tolist() == np.argsort(-want, axis=1, kind="stable")[:, :4].tolist()
    np.testing.assert_allclose(g, np.take_along_axis(want, idx, 1), rtol=1e-15)


@given(st.integers(0, 2**31), st.integers(1, 40), st.integers(1, 6))
@example(0, 1, 1)
def test_vectorised_dispatch_equals_a_per_token_loop(seed, tokens, top_k):
    rng = np.random.default_rng(seed)
    d, inter, n_exp = 8, 6, 6
    experts = [{"gate_proj": rng.normal(size=(inter, d)), "up_proj": rng.normal(size=(inter, d)),
                "down_proj": rng.normal(size=(d, inter))} for _ in range(n_exp)]
    x = rng.normal(size=(tokens, d))
    idx = np.stack([rng.permutation(n_exp)[:top_k] for _ in range(tokens)])
    g = rng.uniform(size=(tokens, top_k))
    got = moe.routed_experts(x, idx, g, experts)
    want = np.zeros_like(x)
    for t in range(tokens):
        for j in range(top_k):
            e = experts[idx[t, j]]
            hidden = x[t] @ e["gate_proj"].T
            hidden = hidden / (1 + np.exp(-hidden)) * (x[t] @ e["up_proj"].T)
            want[t] += g[t, j] * (hidden @ e["down_proj"].T)
    assert rel_err(got, want) < 1e-13


def test_only_routed_experts_are_read():
    class Counting(list):
        asked = set()

        def __getitem__(self, e):
            self.asked.add(e)
            return super().__getitem__(e)
    rng = np.random.default_rng(0)
    experts = Counting({"gate_proj": rng.normal(size=(3, 4)), "up_proj": rng.normal(size=(3, 4)),
                        "down_proj": rng.normal(size=(4, 3))} for _ in range(10))
    moe.routed_experts(rng.normal(size=(3, 4)), np.array([[1, 7], [7, 2], [1, 2]]),
                       np.ones((3, 2)), experts)
    assert Counting.asked == {1, 2, 7}


@pytest.mark.parametrize("x", [-800.0, -30.0, 0.0, 30.0, 800.0])
def test_sigmoid_is_stable(x):
    v = float(sigmoid(np.array(x)))
    assert 0.0 <= v <= 1.0 and v == pytest.approx(1 / (1 + np.exp(-np.clip(x, -700, 700))), rel=1e-12, abs=1e-300)
