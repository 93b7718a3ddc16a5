"""The whole model: incremental decode equals the full forward, causality, batch independence,
the MLA forms agree, traces, and token checks."""

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from refimpl import Config, InputError
from refimpl.writer import random_weights
from refimpl import Model
from tests.helpers import rel_err, tiny_model

TINY = Config.preset("tiny")
MODELS = {}


def model(seed=0, cfg=TINY, form="auto"):
    key = (seed, cfg, form)
    if key not in MODELS:
        MODELS[key] = tiny_model(seed, cfg=cfg, mla_form=form)
    return MODELS[key]


@given(st.integers(0, 2**31), st.integers(1, 90), st.data())
@example(0, 1, None)   # a one-token sequence
@example(1, 80, None)  # beyond YaRN's original context of 64
def test_incremental_decode_at_any_split_equals_the_full_forward(seed, length, data):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, TINY.vocab_size, (2, length))
    cuts = sorted(set(data.draw(st.lists(st.integers(1, length), max_size=4)))) if data else []
    m = model()
    full = m.forward(tokens)
    cache = m.new_cache(batch=2, max_len=length + 3)
    pieces, start = [], 0
    for end in [*cuts, length]:
        if end > start:
            pieces.append(m.forward(tokens[:, start:end], cache=cache))
            start = end
    assert cache.length == length
    assert rel_err(np.concatenate(pieces, axis=1), full) < 1e-12


@given(st.integers(0, 2**31), st.integers(2, 70))
def test_changing_later_tokens_never_changes_earlier_outputs(seed, length):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, TINY.vocab_size, (1, length))
    cut = int(rng.integers(1, length))
    b = a.copy()
    b[0, cut:] = (a[0, cut:] + rng.integers(1, TINY.vocab_size, length - cut)) % TINY.vocab_size
    la, lb = model().forward(a), model().forward(b)
    # not bitwise: BLAS blocks a [1, cut] and a [1, length] product differently (~1e-15)
    assert rel_err(la[:, :cut], lb[:, :cut]) < 1e-13
    assert rel_err(la[:, cut:], lb[:, cut:]) > 1e-3  # the later outputs did change


@given(st.integers(0, 2**31), st.integers(1, 4), st.integers(1, 40))
def test_a_batch_equals_its_rows_run_alone(seed, batch, length):
    tokens = np.random.default_rng(seed).integers(0, TINY.vocab_size, (batch, length))
    together = model().forward(tokens)
    for r in range(batch):
        assert rel_err(model().forward(tokens[r:r + 1]), together[r:r + 1]) < 1e-13


def test_naive_and_absorbed_models_agree_in_prefill_and_decode():
    tokens = np.random.default_rng(5).integers(0, TINY.vocab_size, (2, 75))
    naive, absorbed = model(form="naive"), model(form="absorbed")
    assert rel_err(absorbed.forward(tokens), naive.forward(tokens)) < 1e-12
    c1, c2 = naive.new_cache(2, 80), absorbed.new_cache(2, 80)
    naive.forward(tokens[:, :70], cache=c1)
    absorbed.forward(tokens[:, :70], cache=c2)
    assert rel_err(absorbed.forward(tokens[:, 70:], cache=c2),
                   naive.forward(tokens[:, 70:], cache=c1)) < 1e-12


def test_direct_q_proj_and_v2_softmax_models_run_and_decode():
    for cfg in (TINY.replace(q_lora_rank=None),
                TINY.replace(scoring_func="softmax", topk_method="group_limited_greedy",
                             norm_topk_prob=False, routed_scaling_factor=1.0),
                TINY.replace(n_group=1, topk_group=1, rope_scaling=None)):
        m = Model.from_arrays(cfg, random_weights(cfg, 2))
        tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 30))
        full = m.forward(tokens)
        assert np.isfinite(full).all()
        cache = m.new_cache(1, 30)
        m.forward(tokens[:, :29], cache=cache)
        assert rel_err(m.forward(tokens[:, 29:], cache=cache), full[:, 29:]) < 1e-12


def test_trace_names_in_dataflow_order_with_their_shapes():
    tokens = np.arange(6).reshape(1, 6)
    trace = {}
    logits = model().forward(tokens, trace=trace)
    names = list(trace)
    assert names[0] == "embed" and names[-2:] == ["final_hidden", "logits"]
    layer0 = [n for n in names if n.startswith("layers.0.")]
    assert layer0 == [f"layers.0.{n}" for n in ("attn_norm", "c_q", "q_nope", "q_rope", "c_kv",
                                                "k_rope", "attn_out", "h_attn", "ffn_norm",
                                                "ffn_out", "hidden")]
    layer1 = [n[len("layers.1."):] for n in names if n.startswith("layers.1.")]
    assert layer1[layer1.index("ffn_norm") + 1:] == ["router_scores", "topk_idx", "topk_weight",
                                                     "ffn_out", "hidden"]
    c = TINY
    assert trace["layers.1.q_nope"].shape == (1, 6, c.num_attention_heads, c.qk_nope_head_dim)
    assert trace["layers.1.c_kv"].shape == (1, 6, c.kv_lora_rank)
    assert trace["layers.1.topk_idx"].shape == (1, 6, c.num_experts_per_tok)
    np.testing.assert_allclose(trace["layers.1.topk_weight"].sum(-1), c.routed_scaling_factor)
    np.testing.assert_array_equal(trace["logits"], logits)
    # the residual stream: hidden = h_attn + ffn_out, h_attn = previous hidden + attn_out
    np.testing.assert_allclose(trace["layers.1.hidden"],
                               trace["layers.1.h_attn"] + trace["layers.1.ffn_out"], rtol=1e-15)
    np.testing.assert_allclose(trace["layers.1.h_attn"],
                               trace["layers.0.hidden"] + trace["layers.1.attn_out"], rtol=1e-15)


def test_float32_is_close_to_float64():
    tokens = np.random.default_rng(0).integers(0, TINY.vocab_size, (1, 40))
    f32 = tiny_model(0, dtype="float32").forward(tokens)
    assert f32.dtype == np.float32
    assert 1e-9 < rel_err(f32, model().forward(tokens)) < 1e-4


@pytest.mark.parametrize("tokens, msg", [
    (np.array([[1, 256]]), r"token id 256 at \[0, 1\] is outside the vocabulary \[0, 256\)"),
    (np.array([[-1]]), "token id -1"),
    (np.array([1, 2]), "rank 1"),
    (np.array([[1.0, 2.0]]), "must be integers"),
    (np.zeros((1, 0), dtype=np.int64), "at least one id"),
])
def test_bad_tokens_are_refused(tokens, msg):
    with pytest.raises(InputError, match=msg):
        model().forward(tokens)


def test_cache_overflow_and_batch_mismatch_are_refused():
    m = model()
    cache = m.new_cache(1, 4)
    with pytest.raises(InputError, match="overflow the cache of 4"):
        m.forward(np.zeros((1, 5), dtype=np.int64), cache=cache)
    with pytest.raises(InputError, match="batch 2"):
        m.forward(np.zeros((2, 1), dtype=np.int64), cache=cache)
    with pytest.raises(InputError, match="max_len"):
        m.new_cache(1, TINY.max_position_embeddings + 1)
