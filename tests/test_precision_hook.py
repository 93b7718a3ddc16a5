"""The one precision hook (refimpl.ops.rounding): inside `with rounding(policy)` every operator
boundary passes its output through the policy (the MTP modules' included), the router does not,
and outside the `with` nothing is rounded."""

import threading

import ml_dtypes
import numpy as np
import pytest

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
           "layers.0.c_kv", "layers.0.k_rope", "layers.0.attn_out", "layers.1.ffn_norm",
           "layers.0.ffn_out", "layers.2.hidden", "final_hidden", "logits",
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
