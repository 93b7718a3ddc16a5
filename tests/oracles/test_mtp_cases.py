"""MTP and training-time cases: what their expected values must be, from the spec rather than
from refimpl's output."""

import numpy as np
import pytest

import refimpl
from oracles.format import golden
from refimpl.generate import greedy


def _case(suite_dir, cid):
    g = golden.Golden(suite_dir)
    return g.load_case(cid), g.expected(cid)


@pytest.mark.parametrize("cid", ["speculative.depth1", "speculative.depth2"])
def test_speculative_stream_equals_plain_greedy(default_dir, cid):
    case, exp = _case(default_dir, cid)
    prompt = case.inputs["input_ids"][0]
    plain = greedy(refimpl.load(case.model_path), prompt, case.params["max_new_tokens"])
    assert exp["tokens"][0].tolist() == plain


def test_mtp_depth2_logits_cover_one_index_fewer_per_depth(default_dir):
    case, exp = _case(default_dir, "mtp_prefill.depth2")
    b, t = case.inputs["input_ids"].shape
    v = case.config.vocab_size
    assert exp["logits"].shape == (b, t, v)
    assert exp["mtp.1.logits"].shape == (b, t - 1, v) and exp["mtp.2.logits"].shape == (b, t - 2, v)


def test_training_values_follow_equations_17_to_20_and_the_bias_rule(default_dir):
    case, exp = _case(default_dir, "training.basic")
    s = case.inputs["scores"].astype(np.float64)
    idx, bias = case.inputs["idx"], case.inputs["bias"].astype(np.float64)
    t, e = s.shape
    k = idx.shape[1]
    chosen = np.zeros((t, e))
    for row, picks in enumerate(idx):
        chosen[row, picks] = 1
    f = e / (k * t) * chosen.sum(0)  # eq. (18)
    p = (s / s.sum(1, keepdims=True)).mean(0)  # eqs. (19), (20)
    assert exp["balance_loss"][0] == pytest.approx(case.params["alpha"] * (f * p).sum(), rel=1e-12)
    load = chosen.sum(0)
    want = bias + case.params["gamma"] * np.sign(load.mean() - load)
    np.testing.assert_allclose(exp["bias_updated"], want, rtol=0, atol=1e-15)
