"""docs/figures/make_figures.py: it runs (Agg backend, into a temporary folder), writes small PNGs,
and the numbers it draws are the paper's and the spec's (docs/spec.md), worked out by hand here."""

from __future__ import annotations

import importlib.util
import math
import os
import struct

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIGURES = os.path.join(ROOT, "docs", "figures")
MAX_PNG_BYTES = 100 * 1024


def _load_script():
    spec = importlib.util.spec_from_file_location("make_figures", os.path.join(FIGURES, "make_figures.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def script():
    return _load_script()


@pytest.fixture(scope="module")
def drawn(script, tmp_path_factory):
    """(the folder the script's command line drew into, the numbers make_all draws)."""
    out = tmp_path_factory.mktemp("figures")
    assert script.main(["--out", str(out)]) == 0
    return out, script.figure_data()


def _png_size(path) -> tuple[int, int]:
    with open(path, "rb") as f:
        head = f.read(24)
    assert head[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert head[12:16] == b"IHDR"
    return struct.unpack(">II", head[16:24])


def test_every_figure_is_written_as_a_small_png(script, drawn):
    out, _ = drawn
    assert sorted(os.listdir(out)) == sorted(script.FILES)
    for name in script.FILES:
        path = out / name
        width, height = _png_size(path)
        assert 400 <= width <= 1200 and 150 <= height <= 800, (name, width, height)
        assert os.path.getsize(path) < MAX_PNG_BYTES, name


def test_committed_figures_are_the_ones_the_script_writes_and_small(script):
    committed = sorted(f for f in os.listdir(FIGURES) if f.endswith(".png"))
    assert committed == sorted(script.FILES)
    for name in committed:
        _png_size(os.path.join(FIGURES, name))
        assert os.path.getsize(os.path.join(FIGURES, name)) < MAX_PNG_BYTES, name


def test_yarn_figure_kept_blended_and_interpolated_dimensions(drawn):
    y = drawn[1]["yarn_ramp.png"]
    # spec section 3: low = floor(cd(32)) = floor(10.47) = 10, high = ceil(cd(1)) = ceil(22.51) = 23
    assert (y["low"], y["high"]) == (10, 23)
    assert y["kept"] == list(range(0, 11))
    assert y["blended"] == list(range(11, 23))
    assert y["interpolated"] == list(range(23, 32))
    ratio = y["inv_freq_yarn"] / y["inv_freq"]
    np.testing.assert_allclose(ratio[y["kept"]], 1.0, rtol=0, atol=0)
    np.testing.assert_allclose(ratio[y["interpolated"]], 1 / 40, rtol=1e-15)
    # blended: inv_freq (1 - r + r / s), r = (i - 10) / 13
    i = np.array(y["blended"])
    np.testing.assert_allclose(ratio[i], 1 - (i - 10) / 13 * (1 - 1 / 40), rtol=1e-14)
    # section 4.3: s = 40, alpha = 1, beta = 32, sqrt(t) = 0.1 ln s + 1
    assert (y["factor"], y["beta_slow"], y["beta_fast"]) == (40, 1, 32)
    assert y["sqrt_t"] == pytest.approx(0.1 * math.log(40) + 1, rel=1e-15)
    assert y["softmax_scale"] == pytest.approx((0.1 * math.log(40) + 1) ** 2 / math.sqrt(192), rel=1e-15)


def test_cache_figure_numbers(drawn):
    c = drawn[1]["mla_cache.png"]
    kv = c["kv_cache"]
    # spec section 8: 512 + 64 = 576 against 128 x 192 + 128 x 128 = 40,960
    assert kv["mla_values_per_token_per_layer"] == 512 + 64
    assert kv["mha_values_per_token_per_layer"] == 128 * 192 + 128 * 128
    assert kv["mla_bytes_context"] == 576 * 61 * 2 * 128 * 1024
    assert kv["mha_bytes_context"] == 40960 * 61 * 2 * 128 * 1024
    assert list(c["mla_parts"].values()) == [512, 64]
    assert list(c["mha_parts"].values()) == [128 * 192, 128 * 128]


def test_routing_figure_groups_experts_and_weights(drawn):
    r = drawn[1]["routing.png"]
    # by hand: group scores are the top-2 sums of s (+ b) per group of 4
    np.testing.assert_allclose(r["without_bias"]["group_scores"], [1.10, 1.05, 1.18, 0.55], atol=1e-15)
    np.testing.assert_allclose(r["with_bias"]["group_scores"], [0.80, 1.20, 1.18, 0.55], atol=1e-15)
    assert r["without_bias"]["groups_kept"] == [0, 2]
    assert r["with_bias"]["groups_kept"] == [1, 2]
    # moe.group_mask: the biased scores of the kept groups, -inf elsewhere
    s, b = np.array(r["scores"]), np.array(r["bias"])
    for case, shift, kept in (("without_bias", 0.0, [0, 2]), ("with_bias", b, [1, 2])):
        expected = np.full(16, -np.inf)
        for g in kept:
            expected[4 * g:4 * g + 4] = (s + shift)[4 * g:4 * g + 4]
        np.testing.assert_array_equal(r[case]["masked"], expected)
    # top-4 of the kept groups, largest first: expert 1 (s = 0.20) beats expert 4 (0.55) of a
    # masked group; with the bias, expert 0 (the highest s) is no longer chosen
    assert r["without_bias"]["experts"] == [0, 8, 9, 1]
    assert r["with_bias"]["experts"] == [4, 8, 9, 5]
    # weights from s alone: 2.5 s_i / sum of the chosen s
    np.testing.assert_allclose(r["without_bias"]["weights"],
                               2.5 * np.array([0.90, 0.60, 0.58, 0.20]) / 2.28, rtol=1e-14)
    np.testing.assert_allclose(r["with_bias"]["weights"],
                               2.5 * np.array([0.55, 0.60, 0.58, 0.50]) / 2.23, rtol=1e-14)
    np.testing.assert_allclose(r["with_bias"]["weights_if_bias_entered"],
                               2.5 * np.array([0.65, 0.60, 0.58, 0.55]) / 2.38, rtol=1e-14)
