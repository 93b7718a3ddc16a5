"""Margins by design (oracles/authoring/margins.py): the planted weights route every token with the
designed margin at every MoE layer whatever its context, the greedy streams clear theirs, and
an honest run in every profile's precision therefore compares every position of every model
case."""

import json
import os

import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st

from oracles.authoring import margins
from oracles.authoring.draws import draw_config, model_weights, tiny
from oracles.authoring.kinds import routing_margin
from oracles.checking.candidates import AdapterCandidate
from oracles.checking.check import run_check
from oracles.engines.reference import RefimplAdapter
from oracles.format.tolerances import FLOORS, PROFILES
from refimpl import names
from refimpl.model import Model

THOROUGH = os.environ.get("HYPOTHESIS_PROFILE") == "thorough"


def _routing(cfg, w, ids):
    """{layer: (router scores [T, E], the layer's bias)} of a float64 prefill, and the trace."""
    trace = {}
    Model.from_arrays(cfg, w, dtype="float64").forward(ids, trace=trace)
    out = {}
    for i in margins.moe_layers(cfg, w):
        s = trace[f"layers.{i}.router_scores"]
        out[i] = (s.reshape(-1, s.shape[-1]), w.get(names.gate_bias(i)))
    return out, trace


@given(st.integers(0, 2**31 - 1))
@example(0)
@settings(max_examples=8, deadline=None)
def test_planted_routing_clears_the_margin_in_every_context(seed):
    """Drawn configs, random token sequences (contexts the design never saw): every token's
    group cut and top-k cut at every MoE layer are at least ROUTING_MARGIN apart, and the
    routing still depends on the token (not every token picks the same experts)."""
    rng = np.random.default_rng(seed)
    cfg = draw_config(rng)
    w = model_weights(cfg, rng)
    ids = rng.integers(0, cfg.vocab_size, (2, 24))
    routes, trace = _routing(cfg, w, ids)
    for i, (s, bias) in routes.items():
        m = routing_margin(s, bias, cfg)
        assert m.min() >= margins.ROUTING_MARGIN, (i, m.min())
        chosen = {tuple(sorted(t)) for t in trace[f"layers.{i}.topk_idx"].reshape(-1, cfg.num_experts_per_tok)}
        assert len(chosen) > 1 or cfg.num_experts_per_tok == cfg.n_routed_experts


def test_the_code_channels_carry_the_embedding_through_every_layer():
    """Nothing is added to the code channels: each layer's output holds the embedding's code
    there exactly (float64), so the gate sees the token's code whatever the context."""
    cfg = tiny()
    rng = np.random.default_rng(1)
    w = model_weights(cfg, rng)
    ids = rng.integers(0, cfg.vocab_size, (1, 9))
    _, trace = _routing(cfg, w, ids)
    emb = np.asarray(w[names.EMBED], np.float64)[ids[0]]
    chan = np.nonzero(np.all(np.abs(np.asarray(w[names.EMBED], np.float64)) == 1.0, axis=0))[0]
    assert len(chan) == cfg.n_routed_experts  # the code channels: +-1 in every row
    for i in range(cfg.num_hidden_layers):
        np.testing.assert_array_equal(trace[f"layers.{i}.hidden"][0][:, chan], emb[:, chan])


def test_a_score_of_one_half_stays_within_the_context_slack():
    """Codes of 0 (model.prefill.single_expert) put a score at 1/2, moved only by the gate's
    small read of the other channels: within CONTEXT_SLACK, which the design counts against
    the margin."""
    cfg = tiny(num_experts_per_tok=1)
    rng = np.random.default_rng(2)
    from refimpl.writer import random_weights
    w = margins.plant_routing(cfg, random_weights(cfg, 7, mtp=False), rng, levels=(-1.0, 0.0, 1.0))
    ids = rng.integers(0, cfg.vocab_size, (2, 40))
    _, trace = _routing(cfg, w, ids)
    for i in margins.moe_layers(cfg, w):
        s = trace[f"layers.{i}.router_scores"]
        half = s[np.abs(s - 0.5) < 0.25]
        assert len(half) and np.abs(half - 0.5).max() <= margins.CONTEXT_SLACK


def test_planted_streams_clear_their_margin():
    cfg = tiny()
    rng = np.random.default_rng(3)
    w = model_weights(cfg, rng)
    prompt = rng.integers(0, cfg.vocab_size, 5)
    w = margins.plant_stream_margins(cfg, w, prompt, 12)
    _, logits, _ = margins.greedy_logits(cfg, w, prompt, 12)
    top2 = -np.sort(-logits, axis=-1)[:, :2]
    assert (top2[:, 0] - top2[:, 1]).min() >= margins.STREAM_MARGIN


def test_designed_margins_exceed_every_profiles_forgiveness():
    assert margins.ROUTING_MARGIN >= 3 * max(f["margin_eps"] for f in FLOORS.values())
    assert margins.STREAM_MARGIN >= 3 * max(f["logit_eps"] for f in FLOORS.values())


def _designed_model_cases(golden):
    m = json.load(open(os.path.join(golden, "manifest.json")))
    return m, [c for c in m["cases"] if c["model"] and "designed_margins" in c["params"]]


def test_every_model_case_records_its_designed_margins_and_meets_them(default_dir, default_golden):
    m, designed = _designed_model_cases(default_dir)
    model = [c["id"] for c in m["cases"] if c["model"] and c["id"] != "model.prefill.near_ties"]
    assert {c["id"] for c in designed} == set(model)  # no other model case is left to chance
    # the cases kept (partly) random on purpose, and marked so
    assert [c["id"] for c in m["cases"] if "near_ties" in c["params"]] == ["model.prefill.near_ties"]
    g = default_golden
    for c in designed:
        exp = g.expected(c["id"])
        want = c["params"]["designed_margins"]
        for k, v in exp.items():
            if k.endswith("topk_margin"):
                assert v.min() >= want["routing_margin"], (c["id"], k, v.min())
            if k == "tokens_margin" and "stream_margin" in want:
                assert v.min() >= want["stream_margin"], (c["id"], v.min())


def _coverage(golden, profile, only):
    rep = run_check(golden, AdapterCandidate(RefimplAdapter(profile), profile, timeout=0),
                    profile, only=only, allow_inconclusive=True)
    return {r["id"]: (r["status"], r.get("compared", {}).get("fraction", 1.0)) for r in rep["cases"]}


@pytest.mark.parametrize("profile", PROFILES)
def test_an_honest_run_in_each_profile_compares_every_position_of_the_model_cases(default_dir, profile):
    """Issue 16 item 3: the clean emulation of the profile (an engine running exactly in that
    precision) passes every designed model case and compares at least 90% of its positions
    (in fact all of them: no routing decision and no greedy step is within its rounding)."""
    _, designed = _designed_model_cases(default_dir)
    cov = _coverage(default_dir, profile, ",".join(c["id"] for c in designed
                                                   if "near_ties" not in c["params"]))
    low = {cid: v for cid, v in cov.items() if v[0] != "pass" or v[1] < 0.9}
    assert not low, low


@pytest.mark.slow
@pytest.mark.skipif(not THOROUGH, reason="generates the engine and scenarios suites (minutes): "
                                          "HYPOTHESIS_PROFILE=thorough")
@pytest.mark.parametrize("suite", ["engine", "scenarios"])
def test_the_engine_and_scenario_suites_are_compared_in_full_too(tmp_path, suite):
    from oracles.authoring.writer import generate
    out = str(tmp_path / suite)
    generate(out, suite)
    _, designed = _designed_model_cases(out)
    # not done: the long speculation streams have no designed margins (their routing has)
    only = ",".join(c["id"] for c in designed if "near_ties" not in c["params"]
                    and (c["kind"] != "mtp_speculation" or "stream_margin" in c["params"]["designed_margins"]))
    for profile in PROFILES:
        cov = _coverage(out, profile, only)
        low = {cid: v for cid, v in cov.items() if v[0] != "pass" or v[1] < 0.9}
        assert not low, (profile, low)
