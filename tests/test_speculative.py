"""Speculative decoding with the MTP modules: lossless, with caches that roll back exactly, and an
honest account of what was accepted.

Test models: random weights (drafts unrelated to the main model: acceptance near zero), and a
construction where the MTP module provably agrees with the main model. In `agreeing_weights` every
o_proj and down_proj is zero, so each decoder layer adds nothing and the main model's greedy
choice after token t is f(t) = argmax lm_head(norm(Emb(t))): a function of the last token alone.
Each MTP module gets eh_proj = [I 0] (embedding first), enorm = 1 and the main model's final-norm
weight as shared_head.norm, so its logits at index i are a positive multiple of the main model's
logits for token t_{i+k}: its draft is f(t_{i+k}), exactly the main model's next choice.
`context` > 0 gives the main model's attention some weight back, so that its choice depends on
context too and drafts are only sometimes right (partial acceptance exercises the rollback).
"""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import refimpl
from refimpl.writer import random_weights
from refimpl.generate import Drafter, accept_or_resample, decode, greedy
from tests.helpers import rel_err


def agreeing_weights(cfg, seed=0, context=0.0):
    w = random_weights(cfg, seed)
    d = cfg.hidden_size
    for n in list(w):
        if n.endswith("o_proj.weight"):
            main = int(n.split(".")[2]) < cfg.num_hidden_layers
            w[n] = w[n] * (context if main else 0.0)
        elif n.endswith("down_proj.weight"):
            w[n] = np.zeros_like(w[n])
    for k in range(1, cfg.num_nextn_predict_layers + 1):
        p = f"model.layers.{cfg.num_hidden_layers + k - 1}."
        w[p + "enorm.weight"] = np.ones(d)
        w[p + "eh_proj.weight"] = np.concatenate([np.eye(d), np.zeros((d, d))], axis=1)
        w[p + "shared_head.norm.weight"] = w["model.norm.weight"]
    return w


def make_model(D, seed=0, kind="random"):
    cfg = refimpl.Config.preset("tiny").replace(num_nextn_predict_layers=D)
    if kind == "random":
        return refimpl.Model.from_arrays(cfg, random_weights(cfg, seed))
    context = {"agree": 0.0, "partial": 0.3}[kind]
    return refimpl.Model.from_arrays(cfg, agreeing_weights(cfg, seed, context))


prompts = st.lists(st.integers(0, 255), min_size=1, max_size=6)


@given(D=st.integers(1, 3), kind=st.sampled_from(["random", "partial", "agree"]),
       seed=st.integers(0, 2), prompt=prompts, n=st.integers(0, 12))
def test_greedy_speculative_decoding_is_lossless(D, kind, seed, prompt, n):
    model = make_model(D, seed, kind)
    rep = decode(model, prompt, n, use_mtp=True)
    assert rep.tokens == greedy(model, prompt, n)
    assert len(rep.tokens) == n


def reference_caches(model, seq, main_len):
    """Caches built without speculation: the main model prefilled on seq[:main_len] in one
    forward, the MTP modules advanced over the whole sequence in one step."""
    cache = model.new_cache(1, len(seq), mtp=True)
    h0 = model.hidden_states(np.array([seq[:main_len]]), cache)
    Drafter(model, cache).extend(seq, h0)
    return cache


@given(D=st.integers(1, 3), kind=st.sampled_from(["random", "partial"]), seed=st.integers(0, 2),
       prompt=prompts, n=st.integers(2, 12))
def test_rollback_leaves_caches_as_if_built_without_speculation(D, kind, seed, prompt, n):
    model = make_model(D, seed, kind)
    cache = model.new_cache(1, len(prompt) + n, mtp=True)
    rep = decode(model, prompt, n, use_mtp=True, cache=cache)
    seq = prompt + rep.tokens
    assert cache.length == len(seq) - 1  # the last token has not been run by the main model
    ref = reference_caches(model, seq, cache.length)
    assert cache.mtp_lengths == ref.mtp_lengths
    L = model.cfg.num_hidden_layers
    for layer in range(L + D):
        n_filled = cache.length if layer < L else cache.mtp_lengths[layer - L]
        for got, want in ((cache.c_kv[layer], ref.c_kv[layer]),
                          (cache.k_rope[layer], ref.k_rope[layer])):
            if n_filled:
                assert rel_err(got[:, :n_filled], want[:, :n_filled]) < 1e-10


def test_entries_past_the_filled_length_are_never_read():
    """Rejected drafts leave stale entries past cache.length; decoding from a cache whose every
    entry starts as NaN gives the same tokens, so nothing past a filled length is ever read."""
    model = make_model(2, 0, "partial")
    prompt, n = [3, 1, 4, 1, 5], 11
    clean = decode(model, prompt, n, use_mtp=True)
    assert 0 < sum(clean.accepted) < sum(clean.drafted)  # some rollbacks happened
    cache = model.new_cache(1, len(prompt) + n, mtp=True)
    for arrays in (cache.c_kv, cache.k_rope):
        for a in arrays:
            a[...] = np.nan
    assert decode(model, prompt, n, use_mtp=True, cache=cache).tokens == clean.tokens


@pytest.mark.parametrize("D", [1, 2, 3])
def test_agreeing_mtp_module_is_always_accepted_and_gives_D_plus_1_tokens_per_forward(D):
    model = make_model(D, 0, "agree")
    rounds = 4
    n = 1 + rounds * (D + 1)  # the prefill's token, then full rounds
    rep = decode(model, [7, 42], n, use_mtp=True)
    assert rep.tokens == greedy(model, [7, 42], n)
    assert rep.acceptance == [1.0] * D
    assert rep.drafted == [rounds] * D
    assert rep.forward_passes == 1 + rounds
    assert rep.tokens_per_forward == D + 1


def test_random_weights_acceptance_is_near_zero_and_reported_as_such():
    model = make_model(1, 0, "random")
    rep = decode(model, [1, 2, 3], 30, use_mtp=True)
    # one draft per round except the last (one token left: nothing to draft): 28 when none is kept
    assert rep.drafted[0] >= 26
    assert rep.acceptance[0] < 0.1
    assert rep.tokens_per_forward < 1.1
    assert rep.forward_passes >= 27


def test_plain_decoding_report():
    model = make_model(1, 0, "random")
    rep = decode(model, [1, 2, 3], 5)
    assert rep.tokens == greedy(model, [1, 2, 3], 5)
    assert (rep.forward_passes, rep.tokens_per_forward, rep.depth) == (5, 1.0, 0)


def test_speculative_sampling_rule_reproduces_the_target_distribution():
    """A draft d ~ q kept with probability min(1, p(d)/q(d)), else a draw from norm(max(0, p-q)),
    is distributed as p (Leviathan et al. 2023, Theorem 1); checked by Monte Carlo."""
    p = np.array([0.5, 0.2, 0.2, 0.1])
    q = np.array([0.1, 0.6, 0.1, 0.2])
    rng = np.random.default_rng(0)
    n = 20000
    counts = np.zeros(4)
    for _ in range(n):
        d = int(rng.choice(4, p=q))
        counts[accept_or_resample(p, q, d, rng)[1]] += 1
    sigma = np.sqrt(p * (1 - p) / n)
    assert (np.abs(counts / n - p) < 5 * sigma).all()


def test_sampling_is_seeded():
    model = make_model(2, 0, "partial")
    a = decode(model, [9, 8], 10, use_mtp=True, temperature=0.7, seed=1)
    b = decode(model, [9, 8], 10, use_mtp=True, temperature=0.7, seed=1)
    c = decode(model, [9, 8], 10, use_mtp=True, temperature=0.7, seed=2)
    assert a.tokens == b.tokens and a.accepted == b.accepted
    assert a.tokens != c.tokens
    assert len(a.tokens) == 10 and all(0 <= t < 256 for t in a.tokens)


def test_mtp_decoding_without_mtp_weights_is_a_clear_error():
    cfg = refimpl.Config.preset("tiny")
    model = refimpl.Model.from_arrays(cfg, random_weights(cfg, 0, mtp=False))
    with pytest.raises(refimpl.InputError, match="needs MTP layers"):
        decode(model, [1, 2], 3, use_mtp=True)
