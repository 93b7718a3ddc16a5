"""Edge values that expose swaps (oracles/authoring/edges.py): each case holds the values it claims, and its
expected outputs are what the spec says, computed here by hand."""

import ml_dtypes
import numpy as np
import pytest

import refimpl
from oracles.format import golden
from oracles.authoring.emulate import run_case
from refimpl import fp8
from tests.helpers import rel_err


def _case(suite_dir, cid):
    g = golden.Golden(suite_dir)
    return g.load_case(cid), g.expected(cid)


def test_gate_logits_below_88_give_the_softmax_of_the_selected_logits(default_dir):
    """spec section 9: no epsilon in the renormalisation, so with every gate logit near -93
    the weights are s_i / sum s_j = e^(l_i) / sum e^(l_j) (sigmoid(l) = e^l (1 - e^l + ...))."""
    case, exp = _case(default_dir, "gate.logits_below_88")
    logits = case.inputs["u"].astype(np.float64) @ case.inputs["gate_weight"].astype(np.float64).T
    assert logits.max() < -88 and logits.min() > -100
    sel = np.take_along_axis(logits, exp["topk_idx"], axis=-1)
    want = np.exp(sel - sel.max(-1, keepdims=True))
    want = case.config.routed_scaling_factor * want / want.sum(-1, keepdims=True)
    assert rel_err(exp["topk_weight"], want) < 1e-12
    # the hazard is real: a float32 sigmoid written 1 / (1 + exp(-x)) is 0 for every score
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        naive = 1 / (1 + np.exp(-logits.astype(np.float32)))
        assert (naive == 0).all()
        assert np.isnan(naive[:, :2] / naive[:, :2].sum(-1, keepdims=True)).all()
    # while refimpl in float32 keeps them (subnormal, exp(-|x|)) and stays within 1e-4
    f32 = run_case(case, "float32")
    assert np.isfinite(f32["topk_weight"]).all() and rel_err(f32["topk_weight"], want) < 1e-4


def test_routed_scaling_factor_multiplies_once_with_and_without_renormalisation(default_dir, default_golden):
    case, exp = _case(default_dir, "gate.no_norm_topk_prob")
    cfg = case.config
    assert cfg.norm_topk_prob is False and cfg.routed_scaling_factor == 2.5
    s = np.take_along_axis(exp["router_scores"], exp["topk_idx"], axis=-1)
    np.testing.assert_allclose(exp["topk_weight"], 2.5 * s, rtol=1e-13, atol=0)
    case, exp = _case(default_dir, "gate.tiny")
    assert case.config.norm_topk_prob is True and case.config.routed_scaling_factor == 2.5
    s = np.take_along_axis(exp["router_scores"], exp["topk_idx"], axis=-1)
    np.testing.assert_allclose(exp["topk_weight"], 2.5 * s / s.sum(-1, keepdims=True), rtol=1e-13)
    assert default_golden.cases["moe.no_norm_topk_prob"]["kind"] == "moe"


def test_the_fp8_model_has_unaligned_widths_and_a_scale_per_block(default_dir):
    case, exp = _case(default_dir, "model.prefill.fp8_blocks")
    fp8_names = [n for n, a in case.weights.items() if a.dtype == fp8.E4M3]
    assert len(fp8_names) >= 10
    shapes = {n.rsplit(".", 2)[-2]: case.weights[n].shape for n in fp8_names}
    assert shapes["kv_a_proj_with_mqa"] == (160, 200) and shapes["q_a_proj"] == (136, 200)
    unaligned = [n for n in fp8_names if any(d > 128 and d % 128 for d in case.weights[n].shape)]
    assert len(unaligned) == len(fp8_names)  # every FP8 weight has a partial edge block
    for n in fp8_names:
        s = case.weights[n + "_scale_inv"]
        assert s.shape == fp8.scale_shape(case.weights[n].shape)
        assert len(np.unique(s)) == s.size, n  # a distinct scale per block
        assert s.size >= 2
    # the suite's checkpoint, read by refimpl.load (safetensors, FP8 dequantised with its
    # weight_scale_inv), gives the expected logits: the stored layout is what was computed
    model = refimpl.load(case.model_path)
    assert rel_err(model.forward(case.inputs["input_ids"]), exp["logits"]) < 1e-12


def test_all_zero_and_tiny_activation_and_weight_blocks_get_the_floor_scale(default_dir):
    floor = np.float32(fp8.SCALE_FLOOR / fp8.E4M3_MAX)
    case, exp = _case(default_dir, "fp8_act_quant.zero_and_tiny_blocks")
    x = case.inputs["x"].astype(np.float64)
    assert (x[0, :128] == 0).all() and 0 < np.abs(x[0, 128:256]).max() < fp8.SCALE_FLOOR
    assert exp["s"][0, 0] == floor and exp["s"][0, 1] == floor and exp["s"][1, 1] == floor
    assert (exp["q"][0, :128] == 0).all() and np.isfinite(exp["q"]).all()
    want = (x[0, 128:256] / np.float64(floor)).astype(np.float32).astype(ml_dtypes.float8_e4m3fn)
    np.testing.assert_array_equal(exp["q"][0, 128:256], want.astype(np.float64))
    assert exp["s"][0, 2] == np.float32(np.abs(x[0, 256:]).max() / fp8.E4M3_MAX)
    case, exp = _case(default_dir, "fp8_quant.zero_and_tiny_blocks")
    assert exp["scale_inv"][0, 0] == floor and exp["scale_inv"][1, 0] == floor
    assert (exp["q"][:128, :128] == 0).all()


@pytest.mark.parametrize("cid, check", [
    ("gate.tiny", lambda c: c.config.norm_topk_prob and c.config.routed_scaling_factor != 1),
    ("model.prefill.mscale_differs", lambda c: c.config.rope_scaling.factor == 40
     and c.config.rope_scaling.mscale != c.config.rope_scaling.mscale_all_dim),
    # below half a bf16 spacing at 1.5 (2^-7 / 2), above the f16_kv margin floor (1e-3)
    ("gate.bias_below_bf16", lambda c: 1e-3 < abs(float(c.inputs["bias"][5]) - float(c.inputs["bias"][2]))
     < 2.0 ** -7 * 0.5),
])
def test_the_edge_values_that_were_already_there_still_are(default_dir, cid, check):
    """Not duplicated by oracles/authoring/edges.py: the cases that already held these values."""
    case, _ = _case(default_dir, cid)
    assert check(case)
