"""Routing explained by the candidate's own router input (oracles/routing.py): the bound on the
router arithmetic holds for float32 arithmetic on bf16-rounded gate weights (what the bf16
profiles emulate) and, under the bf16-based profiles, for a gate computed wholly in bf16 as
DeepSeek's inference code computes it (mutants bf16_gate and bf16_gate_bias, which those profiles
allow); every selection of scores within the bound is explained (so an honest run
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


def _bf16(x):
    return np.asarray(x, np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)


def _candidate_scores(u, w, bias, func, round_weights, bf16_gate=False, bias_bf16=False):
    """What an engine computes: float32 arithmetic, the gate weight rounded to bf16 or not; or
    (bf16_gate) DeepSeek's inference/model.py Gate: the input and weight in bf16, the logits
    rounded to bf16 (a bf16 linear), the scores rounded to bf16, the bias added in float32 (or
    first rounded to bf16)."""
    w32 = np.asarray(w, np.float32)
    u32 = np.asarray(u, np.float32)
    if round_weights or bf16_gate:
        w32 = _bf16(w32)
    if bf16_gate:
        u32 = _bf16(u32)
    z = u32 @ w32.T
    if bf16_gate:
        z = _bf16(z)
    if func == "sigmoid":
        s = np.float32(1) / (np.float32(1) + np.exp(-z))
    else:
        ez = np.exp(z - z.max(-1, keepdims=True))
        s = ez / ez.sum(-1, keepdims=True)
    if bf16_gate:
        s = _bf16(s)
    b = _bf16(bias) if bias_bf16 else np.asarray(bias, np.float32)
    return (s + b).astype(np.float64)


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 2**31), st.sampled_from([8, 64, 1024, 7168]), st.sampled_from(["sigmoid", "softmax"]),
       st.sampled_from(["float32", "bf16"]), st.floats(0.1, 10))
@example(0, 7168, "sigmoid", "bf16", 10.0)
@example(0, 8, "sigmoid", "bf16", 2.0)
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
    if profile == "bf16":
        # a weight kept as stored (float32) is covered under the bf16 profiles too
        assert (np.abs(_candidate_scores(u, w, bias, func, False) - biased) <= delta).all()
        # and a gate wholly in bf16, the bias in float32 or in bf16, input as given or not
        for bias_bf16 in (False, True):
            for uu in (u, u * np.float32(1 + 2 ** -12)):  # an input off the bf16 grid
                b2, d2 = routing.bound(uu, w, bias, func, profile)
                got = _candidate_scores(uu, w, bias, func, True, bf16_gate=True,
                                        bias_bf16=bias_bf16)
                assert (np.abs(got - b2) <= d2).all()
    # and the bound is not vacuous: for inputs of RMSNorm's scale, well below the bf16
    # profile's forgiveness floor (0.01) for V3's sigmoid scores (a bf16 score near 0.5 alone
    # moves by up to 2^-9 = 0.002), and below 5e-3 for float32 arithmetic
    if scale <= 2 and (profile == "float32" or func == "sigmoid"):
        assert delta.max() < (5e-3 if profile == "float32" else 7.5e-3)


def test_a_bf16_gate_needs_its_own_terms_in_the_bound(monkeypatch):
    """DeepSeek's bf16 gate resolves near-ties the other way beyond the float32-arithmetic bound:
    of 4000 tokens at a V3-like routing (sigmoid, 16 experts in 4 groups, top-2 groups, 4
    experts), every bf16-gate selection is explained by the bf16 profile's bound, and without
    the bound's bf16 rounding terms some are not (the terms are needed, not decoration)."""
    rng = np.random.default_rng(0)
    u = rng.normal(size=(4000, 64)).astype(np.float32)
    w = (rng.normal(size=(16, 64)) / 8).astype(np.float32)
    bias = rng.normal(0, 0.01, 16).astype(np.float32)
    got = _candidate_scores(u, w, bias, "sigmoid", True, bf16_gate=True)
    chosen = moe.select_experts(got, None, 4, 2, 4, "noaux_tc")
    exact = moe.select_experts(routing.scores(u, w, bias, "sigmoid")[1], None, 4, 2, 4, "noaux_tc")
    flipped = (np.sort(chosen, -1) != np.sort(exact, -1)).any(-1)
    assert flipped.sum() >= 10  # near-ties the bf16 gate decided the other way

    def unexplained():
        biased, delta = routing.bound(u, w, bias, "sigmoid", "bf16")
        return int((~routing.explained(chosen, biased, delta, 4, 2, "noaux_tc")).sum())
    assert unexplained() == 0
    monkeypatch.setattr(routing, "half_spacing_bf16", lambda x: 0.0 * np.asarray(x))
    assert unexplained() > 0


def test_half_spacing_bf16_is_the_largest_rounding_error():
    """Checked against ml_dtypes' rounding on every bf16 binade from 2^-20 to 2^20: the largest
    |bf16(y) - y| for y up to x is half_spacing_bf16(x), and it is reached."""
    rng = np.random.default_rng(1)
    for e in range(-20, 21):
        lo = 2.0 ** e
        y = rng.uniform(lo, 2 * lo, 20000).astype(np.float32)
        err = np.abs(_bf16(y).astype(np.float64) - y.astype(np.float64))
        h = routing.half_spacing_bf16(y.astype(np.float64))
        assert (err <= h).all()
        assert err.max() > 0.99 * h.max()
        assert routing.half_spacing_bf16(lo) == 2.0 ** (e - 8)


def test_sigmoid_slope_is_the_largest_on_the_interval():
    z = np.linspace(-8, 8, 161)
    for err in (0.0, 0.05, 1.0, 10.0):
        grid = z[:, None] + np.linspace(-err, err, 401)[None, :]
        sg = 1 / (1 + np.exp(-grid))
        assert np.allclose(routing.sigmoid_slope(z, err), (sg * (1 - sg)).max(-1), rtol=1e-12, atol=1e-15)


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
