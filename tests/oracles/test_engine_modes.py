"""The engine-mode profiles (f16_kv, bf16_f32_experts, fp8_kv): emulated in refimpl, calibrated
like the others, and still catching the mutant catalogue."""

import json
import os

import ml_dtypes
import numpy as np
from hypothesis import example, given, settings, strategies as st

from oracles.authoring import emulate
from oracles.checking.candidates import load_adapter
from oracles.engines.reference import RefimplAdapter
from oracles.checking.candidates import AdapterCandidate
from oracles.checking.check import run_check
from oracles.authoring import modes
from refimpl import moe, ops
from tests.helpers import Reused

NEW = ("f16_kv", "bf16_f32_experts", "fp8_kv")


def test_rounding_to_float16_and_e4m3_by_hand():
    x = np.array([1 + 2.0 ** -11, 1 + 2.0 ** -10, 1 + 3 * 2.0 ** -11, 65504.0])
    assert modes.round_to(x, modes.F16).tolist() == [1.0, 1 + 2.0 ** -10, 1 + 2 * 2.0 ** -10, 65504.0]
    # e4m3: 3 mantissa bits; 0.3 = 1.2 x 2^-2 -> 1.25 x 2^-2; beyond 448 saturates (no inf)
    assert modes.round_to(np.array([0.3, 1000.0, -1000.0, 17.0]), modes.E4M3).tolist() == [
        0.3125, 448.0, -448.0, 16.0]


@given(st.floats(-400, 400, allow_nan=False, width=32))
@example(0.0)
@settings(max_examples=50, deadline=None)
def test_e4m3_rounding_is_within_half_an_ulp(v):
    r = float(modes.round_to(np.array([v], np.float32), modes.E4M3)[0])
    assert r == float(np.float32(v).astype(ml_dtypes.float8_e4m3fn))
    assert abs(r - v) <= max(abs(v) * 2.0 ** -4, 2.0 ** -10)


def test_every_profile_is_calibrated_and_recorded(default_dir):
    m = json.load(open(os.path.join(default_dir, "manifest.json")))
    assert set(NEW) <= set(m["calibrated_by"]) and set(NEW) <= set(m["floors"])
    for e in m["cases"]:
        for p in NEW:
            tols = e["tolerances"][p]
            assert list(tols) == [o["name"] for o in e["outputs"]]


def test_the_kv_modes_change_attention_and_nothing_before_it(default_golden):
    g = default_golden
    case = g.load_case("model.prefill.tiny")
    f32 = emulate.run_case(case, "float32")
    kv = emulate.run_case(case, "f16_kv")
    for name in ("embed", "layers.0.attn_norm", "layers.0.c_kv", "layers.0.k_rope"):
        np.testing.assert_array_equal(kv[name], f32[name])  # cache entries are rounded on read
    rel = np.abs(kv["layers.0.attn_out"] - f32["layers.0.attn_out"]).max() / np.abs(f32["layers.0.attn_out"]).max()
    assert 1e-6 < rel < 1e-2  # float16's unit roundoff is 4.9e-4
    b = emulate.run_case(case, "bf16")
    fp8kv = emulate.run_case(case, "fp8_kv")
    np.testing.assert_array_equal(fp8kv["layers.0.c_kv"], b["layers.0.c_kv"])
    assert not np.array_equal(fp8kv["layers.0.attn_out"], b["layers.0.attn_out"])


def test_float32_experts_computes_the_routed_experts_unrounded():
    rng = np.random.default_rng(0)
    d, f, e = 16, 8, 4
    bf = lambda a: a.astype(ml_dtypes.bfloat16).astype(np.float32)  # noqa: E731
    experts = [{k: bf(rng.normal(0, 0.3, s).astype(np.float32)) for k, s in
                (("gate_proj", (f, d)), ("up_proj", (f, d)), ("down_proj", (d, f)))} for _ in range(e)]
    x = bf(rng.normal(0, 1, (5, d)).astype(np.float32))
    idx = np.array([[0, 1], [2, 3], [1, 2], [0, 3], [3, 1]])
    w = rng.uniform(0.2, 1, idx.shape).astype(np.float32)

    def by_hand():  # sum_k w_k down(silu(gate x) * up x), float64
        out = np.zeros((5, d))
        for t in range(5):
            for j, ex in enumerate(idx[t]):
                p = {k: v.astype(np.float64) for k, v in experts[ex].items()}
                h = p["gate_proj"] @ x[t]
                out[t] += w[t, j] * (p["down_proj"] @ (h / (1 + np.exp(-h)) * (p["up_proj"] @ x[t])))
        return out

    want = by_hand()
    with ops.rounding(emulate.round_bf16):
        rounded = moe.routed_experts(x, idx, w, experts)
        with modes.float32_experts():
            plain = moe.routed_experts(x, idx, w, experts)
    np.testing.assert_allclose(plain, want, rtol=1e-5, atol=1e-5)
    assert np.abs(rounded - want).max() > 1e-3  # bf16 boundaries alone round each expert


def test_clean_reference_passes_and_each_mode_passes_its_own_profile(default_golden):
    f32 = Reused(AdapterCandidate(RefimplAdapter("float32"), "f32"))  # run once, judged in each
    for p in NEW:
        assert run_check(default_golden, f32, p)["ok"], p
        # the mode's own emulation never FAILs its profile; cases whose routing it resolves the
        # other way at near-ties (and so compared too little) are INCONCLUSIVE, never PASS
        rep = run_check(default_golden, AdapterCandidate(RefimplAdapter(p), p), p)
        inconclusive = [r for r in rep["cases"] if r["status"] == "inconclusive"]
        assert rep["counts"]["fail"] == rep["counts"]["error"] == rep["counts"]["missing"] == 0, p
        assert all(r["compared"]["fraction"] < rep["min_compared"] for r in inconclusive), p
        assert rep["counts"]["pass"] > 2 * len(inconclusive), p
    # the f16 cache is beyond float32's tolerance (llama.cpp's default fails float32)
    assert not run_check(default_golden, AdapterCandidate(RefimplAdapter("f16_kv"), "f16"), "float32",
                         only="model.prefill.tiny")["ok"]


# Every mode profile's verdict on every mutant: tests/oracles/test_catalogue.py.


def test_gate_precision_mutants_are_caught_by_f16_kv_only(default_golden):
    """f16_kv is float32 outside attention, so a bf16 gate still fails it; the bf16-based modes
    allow it by definition (catalogue.ALLOWED)."""
    rep = run_check(default_golden, load_adapter("oracles.mutants:bf16_gate"), "f16_kv", only="model.prefill.tiny")
    assert rep["counts"]["fail"] == 1
    for p in ("bf16_f32_experts", "fp8_kv"):
        # ...except gate.logits_below_88, where the whole-bf16 gate renormalises 0/0 (NaN)
        rep = run_check(default_golden, load_adapter("oracles.mutants:bf16_gate"), p)
        assert [r["id"] for r in rep["cases"] if r["status"] == "fail"] == ["gate.logits_below_88"], p
