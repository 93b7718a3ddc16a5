"""The one precision hook (refimpl.ops.rounding): inside `with rounding(policy)` every operator
boundary passes its output through the policy (the MTP modules' included), the router does not,
and outside the `with` nothing is rounded. The routed experts' sum (ops.accumulate) is stored
after each add, in ascending expert index, as DeepSeek's inference code adds them into a bf16
tensor; without a policy it is the working dtype's sum, bit for bit."""

import threading

import ml_dtypes
import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

import refimpl
from refimpl import moe, ops
from refimpl.norm import rms_norm
from refimpl.rope import apply_rope
from tests.helpers import tiny_model

BF16 = np.dtype(ml_dtypes.bfloat16)


def round_bf16(x):
    return np.asarray(x, np.float32).astype(BF16).astype(np.float32)


def on_bf16_grid(x):
    x = np.asarray(x, np.float32)
    return bool(np.array_equal(x, round_bf16(x)))


def mtp_model():
    cfg = refimpl.Config.preset("tiny").replace(num_nextn_predict_layers=2)
    return tiny_model(1, cfg, dtype="float32")


TOKENS = np.random.default_rng(0).integers(0, 256, (1, 7))

# each operator boundary's output, in the trace: the main model's and the MTP modules'
ROUNDED = ["layers.0.attn_norm", "layers.0.c_q", "layers.0.q_nope", "layers.0.q_rope",
           "layers.0.c_kv", "layers.0.k_rope", "layers.0.attn_out", "layers.0.h_attn",
           "layers.1.ffn_norm", "layers.0.ffn_out", "layers.1.h_attn", "layers.1.ffn_out",
           "layers.2.hidden", "final_hidden", "logits", "mtp.1.layer.h_attn", "mtp.1.layer.ffn_out",
           "mtp.1.eh_proj", "mtp.1.layer.attn_out", "mtp.1.layer.hidden", "mtp.1.head_norm",
           "mtp.1.logits", "mtp.2.eh_proj", "mtp.2.head_norm", "mtp.2.logits"]


def test_every_boundary_is_rounded_the_mtp_modules_included():
    model, trace = mtp_model(), {}
    with ops.rounding(round_bf16):
        model.forward(TOKENS, trace=trace, mtp=True)
    assert [n for n in ROUNDED if not on_bf16_grid(trace[n])] == []
    # the router runs unrounded (engines compute the gate in float32)
    assert not on_bf16_grid(trace["layers.1.router_scores"])
    assert not on_bf16_grid(trace["mtp.1.layer.router_scores"])


def test_outside_the_with_nothing_is_rounded():
    model, trace = mtp_model(), {}
    with ops.rounding(round_bf16):
        pass
    model.forward(TOKENS, trace=trace, mtp=True)
    assert [n for n in ROUNDED if on_bf16_grid(trace[n])] == []


def test_the_policy_sees_each_operator_and_rounding_none_suspends_it():
    seen = []

    def spy(x):
        seen.append(np.shape(x))
        return x
    x = np.random.default_rng(1).normal(size=(2, 3, 4, 8))
    cos, sin = np.ones((3, 4)), np.zeros((3, 4))
    with ops.rounding(spy):
        ops.linear(x, np.ones((5, 8)))
        rms_norm(x, np.ones(8), 1e-6)
        ops.softmax(x)
        apply_rope(x, cos, sin)
        with ops.rounding(None):
            ops.linear(x, np.ones((5, 8)))
        moe.router_scores(x[0, 0], np.ones((6, 8)), "sigmoid")
    assert seen == [(2, 3, 4, 5), (2, 3, 4, 8), (2, 3, 4, 8), (2, 3, 4, 8)]


def test_a_policy_is_local_to_its_thread():
    """A policy set in one thread (a calibration run) never reaches another."""
    inside, outside = threading.Event(), threading.Event()
    got = {}

    def other():
        inside.wait(10)
        got["value"] = ops.linear(np.full((1, 1), 1 / 3), np.ones((1, 1)))
        outside.set()
    t = threading.Thread(target=other)
    t.start()
    with ops.rounding(lambda x: x * 0):
        inside.set()
        outside.wait(10)
    t.join()
    assert got["value"][0, 0] == pytest.approx(1 / 3, rel=1e-15)


# ---- the routed experts' sum, stored per add (ops.accumulate, moe.routed_experts) -------------

def bf16_sequential(terms, order):
    """An independent sequential bf16 accumulation: a bfloat16 accumulator (ml_dtypes) starting
    at zero, each term added in `order` and the sum stored as bfloat16 after each add."""
    n, k = terms.shape[:2]
    acc = np.zeros((n,) + terms.shape[2:], BF16)
    for r in range(n):
        for j in order[r]:
            acc[r] = (acc[r].astype(np.float32) + terms[r, j].astype(np.float32)).astype(BF16)
    return acc.astype(np.float32)


def test_accumulate_rounds_after_each_add_by_hand():
    # bf16 keeps 8 significant bits: 1 + 2^-8 is halfway between 1 and 1 + 2^-7 and rounds to
    # the even 1.  Added one at a time, two halves of an ulp are lost; summed first, they are not.
    terms = np.array([[[1.0], [2.0 ** -8], [2.0 ** -8]]], np.float32)  # [1 token, K=3, d=1]
    with ops.rounding(round_bf16):
        per_add = ops.accumulate(terms)
    assert per_add[0, 0] == 1.0
    assert round_bf16(terms.sum(axis=1))[0, 0] == 1.0 + 2.0 ** -7
    # the order is DeepSeek's (ascending expert index): the small terms first, they add up
    with ops.rounding(round_bf16):
        assert ops.accumulate(terms, order=np.array([[1, 2, 0]]))[0, 0] == 1.0 + 2.0 ** -7


@given(st.integers(1, 5), st.integers(1, 8), st.integers(1, 6), st.integers(0, 2**31),
       st.floats(-8, 8))
@example(1, 2, 1, 0, 0.0)
def test_accumulate_is_a_sequential_bf16_sum_in_the_given_order(n, k, d, seed, log_spread):
    rng = np.random.default_rng(seed)
    # terms of mixed signs and sizes (partial cancellation is where per-add rounding shows)
    scale = 2.0 ** rng.uniform(0, abs(log_spread), (n, k, 1))
    terms = round_bf16(rng.normal(size=(n, k, d)) * scale)
    order = np.argsort(rng.random((n, k)), axis=-1)
    with ops.rounding(round_bf16):
        got = ops.accumulate(terms, order=order)
    assert np.array_equal(got, bf16_sequential(terms, order))
    # without a policy: the working dtype's sum over axis 1, bit for bit (float64 goldens)
    t64 = rng.normal(size=(n, k, d))
    assert np.array_equal(ops.accumulate(t64, order=order), t64.sum(axis=1))


def _experts(rng, e, d, f):
    shapes = {"gate_proj": (f, d), "up_proj": (f, d), "down_proj": (d, f)}
    return [{n: round_bf16(rng.normal(size=sh)) for n, sh in shapes.items()} for _ in range(e)]


@given(st.integers(1, 6), st.integers(1, 4), st.integers(0, 2**31))
@example(3, 4, 7)
def test_routed_experts_add_as_deepseeks_inference_code(t, k, seed):
    """moe.routed_experts under a bf16 policy equals DeepSeek's MoE.forward written out
    (inference/model.py:682-689): y = zeros (bf16); for each expert i in ascending index, for
    its tokens, y += expert_i(x) * weight (each a bf16 tensor, the weight cast to bf16)."""
    rng = np.random.default_rng(seed)
    e, d, f = 6, 8, 4
    x = round_bf16(rng.normal(size=(t, d)))
    experts = _experts(rng, e, d, f)
    idx = np.stack([rng.permutation(e)[:k] for _ in range(t)])  # selection order, not sorted
    w = rng.uniform(0.1, 1.5, size=(t, k)).astype(np.float32)
    with ops.rounding(round_bf16):
        got = moe.routed_experts(x, idx, w, experts)
        want = np.zeros((t, d), BF16)
        for i in range(e):
            tok, top = np.nonzero(idx == i)
            if len(tok):
                out = moe.swiglu(x[tok], **experts[i])  # bf16 at its boundaries
                prod = round_bf16(out * round_bf16(w[tok, top, None]))
                want[tok] = (want[tok].astype(np.float32) + prod).astype(BF16)
    assert np.array_equal(got, want.astype(np.float32))


def test_routed_experts_without_a_policy_sum_in_selection_order_bit_for_bit():
    """The hook is the identity without rounding: the float64 sum is the one before it existed,
    each token's K weighted outputs summed in selection order."""
    rng = np.random.default_rng(3)
    t, k, e, d, f = 5, 3, 6, 8, 4
    x = rng.normal(size=(t, d))
    experts = [{n: np.asarray(a, np.float64) for n, a in ex.items()}
               for ex in _experts(rng, e, d, f)]
    idx = np.stack([rng.permutation(e)[:k] for _ in range(t)])
    w = rng.uniform(0.1, 1.5, size=(t, k))
    # each expert over its tokens at once, as routed_experts groups them (a GEMM's float64 bits
    # depend on its row count), then each token's K terms summed in selection order
    terms = np.zeros((t, k, d))
    for i in range(e):
        tok, top = np.nonzero(idx == i)
        if len(tok):
            terms[tok, top] = moe.swiglu(x[tok], **experts[i]) * w[tok, top, None]
    want = terms[:, 0]
    for j in range(1, k):
        want = want + terms[:, j]
    assert np.array_equal(moe.routed_experts(x, idx, w, experts), want)
