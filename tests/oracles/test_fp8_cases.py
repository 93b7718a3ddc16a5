"""FP8 quantisation cases: the expected values follow spec section 7, checked here from the
formula."""

import numpy as np
import pytest


def test_weight_scales_are_the_tile_amax_over_448_with_a_floor(default_golden):
    g = default_golden
    case, exp = g.load_case("fp8_quant.unaligned"), g.expected("fp8_quant.unaligned")
    w = case.inputs["w"].astype(np.float64)
    assert exp["scale_inv"].shape == (5, 2)
    for i in range(5):
        for j in range(2):
            tile = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128]
            assert exp["scale_inv"][i, j] == pytest.approx(max(np.abs(tile).max(), 1e-4) / 448, rel=1e-6)
    s_full = np.repeat(np.repeat(exp["scale_inv"], 128, 0), 128, 1)[:576, :200]
    assert np.all(np.abs(exp["q"]) <= 448)
    # e4m3 keeps 3 mantissa bits; below its smallest subnormal (2^-9) values round to a multiple of it
    err = np.abs(exp["q"] * s_full - w)
    assert np.all(err <= np.maximum(2 ** -4 * np.abs(w), 2 ** -10 * s_full) * (1 + 1e-6))


def test_activation_scales_are_per_token_per_128_channels(default_golden):
    g = default_golden
    case, exp = g.load_case("fp8_act_quant.unaligned"), g.expected("fp8_act_quant.unaligned")
    x = case.inputs["x"].astype(np.float64)
    assert exp["s"].shape == (6, 3)
    assert exp["s"][0, 0] == pytest.approx(np.abs(x[0, :128]).max() / 448, rel=1e-6)
    assert exp["s"][1, 2] == pytest.approx(np.abs(x[1, 256:]).max() / 448, rel=1e-6)
