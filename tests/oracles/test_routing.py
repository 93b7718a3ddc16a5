"""Routing explained by the candidate's own router input (oracles/routing.py): the bound on the
router arithmetic holds for float32 arithmetic on bf16-rounded gate weights (what the bf16
profiles emulate), every selection of scores within the bound is explained (so an honest run
never fails), and a selection made by another rule is not."""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from oracles.checking import routing
from refimpl import moe

METHODS = ("noaux_tc", "group_limited_greedy", "greedy")


def _config(rng, method):
    n_group = int(rng.choice([1, 2, 4, 8]))
    per = int(rng.integers(2, 6))
    topk_group = int(rng.integers(1, n_group + 1))
    top_k = int(rng.integers(1, topk_group * per + 1)) if method != "greedy" else int(rng.integers(1, n_group * per + 1))
    return n_group, per, topk_group, top_k


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**31), st.sampled_from(METHODS), st.floats(0, 0.2), st.booleans())
@example(0, "noaux_tc", 0.0, False)
@example(1, "group_limited_greedy", 0.05, True)
def test_every_selection_of_scores_within_the_bound_is_explained(seed, method, scale, extreme):
    rng = np.random.default_rng(seed)
    n_group, per, topk_group, top_k = _config(rng, method)
    e, t = n_group * per, 6
    biased = rng.normal(size=(t, e))
    if rng.random() < 0.3:  # exact ties
        biased = np.round(biased, 1)
    delta = scale * rng.random((t, e))
    eta = delta * (np.sign(rng.normal(size=(t, e))) if extreme else rng.uniform(-1, 1, (t, e)))
    chosen = moe.select_experts(biased + eta, None, n_group, topk_group, top_k, method)
    assert routing.explained(chosen, biased, delta, n_group, topk_group, method).all()


def test_a_selection_by_another_rule_is_not_explained():
    """Groups of 2 experts, one kept: group 0 is best by its best expert (V2's rule), group 1 by
    the sum of its top two (V3's rule). An engine scoring V2's groups by the top-2 sum picks
    from group 1: beyond any score error below the margins, not a near-tie."""
    biased = np.array([[0.50, 0.00, 0.40, 0.30]])
    v2 = moe.select_experts(biased, None, 2, 1, 1, "group_limited_greedy")
    v3 = moe.select_experts(biased, None, 2, 1, 1, "noaux_tc")
    assert v2.tolist() == [[0]] and v3.tolist() == [[2]]
    for d in (0.0, 0.01, 0.04):  # group margins 0.1 (max) and 0.2 (sum)
        assert not routing.explained(v3, biased, np.full((1, 4), d), 2, 1, "group_limited_greedy")[0]
        assert routing.explained(v2, biased, np.full((1, 4), d), 2, 1, "group_limited_greedy")[0]
    # within the rounding (score errors of 0.05 can move the best expert of either group)
    assert routing.explained(v3, biased, np.full((1, 4), 0.05), 2, 1, "group_limited_greedy")[0]
    # without groups: the 3rd best instead of the 2nd, by 0.1
    flat = np.array([[0.9, 0.5, 0.4, 0.1]])
    assert not routing.explained(np.array([[0, 2]]), flat, np.full((1, 4), 0.04), 1, 1, "greedy")[0]
    assert routing.explained(np.array([[0, 2]]), flat, np.full((1, 4), 0.05), 1, 1, "greedy")[0]


def _candidate_scores(u, w, bias, func, round_weights):
    """What an engine computes: float32 arithmetic, the gate weight rounded to bf16 or not."""
    w32 = np.asarray(w, np.float32)
    if round_weights:
        w32 = w32.astype(ml_dtypes.bfloat16).astype(np.float32)
    z = np.asarray(u, np.float32) @ w32.T
    if func == "sigmoid":
        s = np.float32(1) / (np.float32(1) + np.exp(-z))
    else:
        ez = np.exp(z - z.max(-1, keepdims=True))
        s = ez / ez.sum(-1, keepdims=True)
    return (s + np.asarray(bias, np.float32)).astype(np.float64)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31), st.sampled_from([8, 64, 1024, 7168]), st.sampled_from(["sigmoid", "softmax"]),
       st.sampled_from(["float32", "bf16"]), st.floats(0.1, 10))
@example(0, 7168, "sigmoid", "bf16", 10.0)
def test_the_router_arithmetic_stays_within_the_bound(seed, d, func, profile, scale):
    rng = np.random.default_rng(seed)
    u = (rng.normal(size=(4, d)) * scale).astype(ml_dtypes.bfloat16).astype(np.float32)
    w = (rng.normal(size=(16, d)) / np.sqrt(d)).astype(np.float32)
    if rng.random() < 0.3:  # a checkpoint stored in bf16: no rounding error
        w = w.astype(ml_dtypes.bfloat16).astype(np.float32)
    bias = rng.normal(0, 0.3, 16).astype(np.float32)
    biased, delta = routing.bound(u, w, bias, func, profile)
    got = _candidate_scores(u, w, bias, func, routing.GATE_WEIGHT[profile] == "bf16")
    assert (np.abs(got - biased) <= delta).all()
    # a weight kept as stored (float32) is covered under the bf16 profiles too
    if profile == "bf16":
        assert (np.abs(_candidate_scores(u, w, bias, func, False) - biased) <= delta).all()
    # and the bound is not vacuous: for inputs of RMSNorm's scale, well below the bf16
    # profile's forgiveness floor (0.01)
    if scale <= 2:
        assert delta.max() < 5e-3


def test_gate_layers_of_routing_outputs():
    from refimpl import Config
    cfg = Config.preset("tiny")
    assert routing.gate_layer("layers.2.topk_idx", cfg) == 2
    assert routing.gate_layer("request.1.layers.1.topk_idx", cfg) == 1
    assert routing.gate_layer("mtp.1.layer.topk_idx", cfg) == cfg.num_hidden_layers
    assert routing.gate_layer("topk_idx", cfg) is None


@pytest.mark.parametrize("profile", ["float32", "bf16"])
def test_bound_covers_refimpls_own_router_in_the_profiles_precision(profile):
    """refimpl's router under the profile's emulation (weights as prepared, ops.rounding) stays
    within the bound of the float64 scores from the same inputs."""
    from oracles.authoring.precision import round_bf16
    from refimpl import Config, ops
    cfg = Config.preset("tiny")
    rng = np.random.default_rng(5)
    u = round_bf16(rng.normal(size=(32, cfg.hidden_size)).astype(np.float32))
    w = (rng.normal(size=(cfg.n_routed_experts, cfg.hidden_size)) / 8).astype(np.float32)
    bias = rng.normal(0, 0.2, cfg.n_routed_experts).astype(np.float32)
    w_used = round_bf16(w) if profile == "bf16" else w
    with ops.rounding(round_bf16 if profile == "bf16" else None):
        s = moe.router_scores(u, w_used, cfg.scoring_func)
    got = np.asarray(s, np.float64) + bias.astype(np.float32)
    biased, delta = routing.bound(u, w, bias, cfg.scoring_func, profile)
    assert (np.abs(got - biased) <= delta).all()
