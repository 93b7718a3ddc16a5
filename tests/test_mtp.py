"""MTP modules (paper eqs. 21-23, spec section 6): teacher-forced outputs, the incremental path,
and the named conventions, each shown to be live."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import refimpl
from refimpl import mtp
from refimpl.generate import Drafter
from refimpl.layer import AttentionContext, decoder_layer
from refimpl.writer import random_weights
from refimpl.norm import rms_norm
from tests.helpers import rel_err, tiny_model


def model_with_depth(D, seed=0):
    cfg = refimpl.Config.preset("tiny").replace(num_nextn_predict_layers=D)
    return tiny_model(seed, cfg)


def tokens_of(seed, n, vocab=256):
    return np.random.default_rng(seed).integers(0, vocab, (1, n))


def test_forward_mtp_shapes_depth_k_has_T_minus_k_positions():
    model = model_with_depth(3)
    logits, mtp_logits = model.forward(tokens_of(0, 7), mtp=True)
    assert logits.shape == (1, 7, 256)
    assert [x.shape for x in mtp_logits] == [(1, 6, 256), (1, 5, 256), (1, 4, 256)]
    _, short = model.forward(tokens_of(0, 2), mtp=True)
    assert [x.shape[1] for x in short] == [1, 0, 0]


def test_forward_mtp_main_logits_unchanged():
    model = model_with_depth(1)
    t = tokens_of(1, 9)
    logits, _ = model.forward(t, mtp=True)
    np.testing.assert_array_equal(logits, model.forward(t))


def per_position_module1(model, tokens):
    """eqs. (21)-(23) for module 1 written position by position: at index i, combine Emb(t_{i+1})
    with h^0_i, run the MTP decoder layer over the prefix 0..i alone (no cache, no mask shared
    with other positions), take the last row, apply shared_head.norm and the main lm_head."""
    cfg, w = model.cfg, model.weights
    L = cfg.num_hidden_layers
    p = f"model.layers.{L}."
    E = w.get("model.embed_tokens.weight")
    h0 = model.hidden_states(tokens)[0]  # after the final norm
    T = tokens.shape[1]
    hp = []
    for i in range(T - 1):
        e = rms_norm(E[tokens[0, i + 1]], w.get(p + "enorm.weight"), cfg.rms_norm_eps)
        h = rms_norm(h0[i], w.get(p + "hnorm.weight"), cfg.rms_norm_eps)
        hp.append(w.get(p + "eh_proj.weight") @ np.concatenate([e, h]))  # embedding first
    hp = np.array(hp)
    out = []
    from refimpl import mla, rope
    for i in range(T - 1):
        pos = np.arange(i + 1)
        cos, sin = rope.cos_sin(pos, model.inv_freq, model.cos_sin_factor, np)
        mask = mla.causal_mask(pos, pos, np)
        step = AttentionContext(cos, sin, mask, 0, model.softmax_scale, "naive")
        hk = decoder_layer(hp[None, :i + 1], model.weights, cfg, L, step)[0, -1]
        hn = rms_norm(hk, w.get(p + "shared_head.norm.weight"), cfg.rms_norm_eps)
        out.append(w.get("lm_head.weight") @ hn)
    return np.array(out)


def test_module1_equals_a_per_position_implementation_of_eqs_21_to_23():
    model = model_with_depth(1, seed=3)
    t = tokens_of(3, 8)
    _, (got,) = model.forward(t, mtp=True)
    assert rel_err(got[0], per_position_module1(model, t)) < 1e-12


def test_depth2_reads_depth1_hidden_and_token_two_ahead():
    """Module 2 at index i = module 1's output chain at i and Emb(t_{i+2}): changing t_j changes
    module-2 logits only at indices i >= j - 2, module-1 logits only at i >= j - 1 (causality along
    the modules' own sequences, and the eq. 21 alignment)."""
    model = model_with_depth(2, seed=4)
    t = tokens_of(4, 9)
    _, (a1, a2) = model.forward(t, mtp=True)
    u = t.copy()
    j = 6
    u[0, j] = (u[0, j] + 1) % 256
    _, (b1, b2) = model.forward(u, mtp=True)
    d1 = np.abs(a1 - b1).max(axis=-1)[0]
    d2 = np.abs(a2 - b2).max(axis=-1)[0]
    # (unchanged = equal to rounding: BLAS may block the changed matrices differently)
    assert (d1[:j - 1] < 1e-12).all() and (d1[j - 1:] > 1e-6).all()
    assert (d2[:j - 2] < 1e-12).all() and (d2[j - 2:] > 1e-6).all()


@pytest.mark.parametrize("name,alt", [("concat", "hidden_first"), ("h0", "pre_norm"),
                                      ("weights", "module"), ("first_embedding", "zero")])
def test_each_convention_is_live(name, alt):
    model = model_with_depth(1, seed=5)
    t = tokens_of(5, 6)
    _, (a,) = model.forward(t, mtp=True)
    _, (b,) = model.forward(t, mtp=True, mtp_conventions=mtp.Conventions(**{name: alt}))
    assert rel_err(b, a) > 1e-3


def test_chain_convention_is_live_from_depth_2_only():
    model = model_with_depth(2, seed=6)
    t = tokens_of(6, 6)
    _, (a1, a2) = model.forward(t, mtp=True)
    _, (b1, b2) = model.forward(t, mtp=True, mtp_conventions=mtp.Conventions(chain="pre_head_norm"))
    np.testing.assert_array_equal(a1, b1)
    assert rel_err(b2, a2) > 1e-3


def test_position_convention_changes_no_logit_rope_is_relative():
    model = model_with_depth(2, seed=7)
    t = tokens_of(7, 10)
    _, a = model.forward(t, mtp=True)
    _, b = model.forward(t, mtp=True, mtp_conventions=mtp.Conventions(positions="token"))
    for x, y in zip(a, b):
        assert rel_err(y, x) < 1e-10


def test_unknown_convention_is_refused():
    with pytest.raises(refimpl.RefimplError, match="concat"):
        mtp.Conventions(concat="sideways")


def test_trace_names_mtp_intermediates_in_dataflow_order():
    model = model_with_depth(2)
    trace = {}
    model.forward(tokens_of(0, 5), mtp=True, trace=trace)
    names = [n for n in trace if n.startswith("mtp.")]
    for k, s in ((1, 4), (2, 3)):
        for n in ("embed", "h_prev", "eh_proj", "layer.attn_norm", "layer.q_nope", "layer.c_kv",
                  "layer.k_rope", "layer.attn_out", "layer.router_scores", "layer.hidden",
                  "head_norm", "logits", "hidden"):
            assert f"mtp.{k}.{n}" in trace
        assert trace[f"mtp.{k}.logits"].shape == (1, s, 256)
    assert names.index("mtp.1.logits") < names.index("mtp.2.embed")
    assert names.index("mtp.1.eh_proj") < names.index("mtp.1.layer.q_nope") < names.index("mtp.1.logits")


def test_forward_mtp_without_mtp_weights_is_a_clear_error():
    cfg = refimpl.Config.preset("tiny")
    model = refimpl.Model.from_arrays(cfg, random_weights(cfg, 0, mtp=False))
    with pytest.raises(refimpl.InputError, match="no MTP layers"):
        model.forward(tokens_of(0, 4), mtp=True)


def incremental_mtp_logits(model, tokens, cuts):
    """Main model and MTP modules fed chunk by chunk through one latent cache (Drafter);
    returns each depth's logits at its committed indices, concatenated."""
    cache = model.new_cache(1, tokens.shape[1], mtp=True)
    drafter = Drafter(model, cache)
    got = [[] for _ in range(model.cfg.num_nextn_predict_layers)]
    bounds = [0, *cuts, tokens.shape[1]]
    for a, b in zip(bounds[:-1], bounds[1:]):
        h0 = model.hidden_states(tokens[:, a:b], cache)
        for k, lg in enumerate(drafter.extend(tokens[0, a:b], h0)):
            got[k].append(lg)
    return [np.concatenate(g, axis=1) for g in got], cache


@given(D=st.integers(1, 3), n=st.integers(2, 10), seed=st.integers(0, 3), data=st.data())
def test_incremental_mtp_logits_equal_teacher_forced(D, n, seed, data):
    model = model_with_depth(D, seed)
    t = tokens_of(seed + 10, n)
    cuts = sorted(data.draw(st.sets(st.integers(1, n - 1), max_size=3)))
    got, cache = incremental_mtp_logits(model, t, cuts)
    _, want = model.forward(t, mtp=True)
    for k in range(D):
        # the drafter commits index i of depth k+1 once t_{i+k+1} is in: n-k-1 indices
        assert cache.mtp_lengths[k] == max(0, n - k - 1) == got[k].shape[1]
        if got[k].shape[1]:
            assert rel_err(got[k], want[k]) < 1e-10
