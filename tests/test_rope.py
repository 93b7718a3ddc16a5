"""RoPE and YaRN: hand-checked V3 constants, identities, and an independent complex-number form."""

import math

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from refimpl import Config
from refimpl import rope
from refimpl.config import RopeScaling
from tests.helpers import rel_err, tiny_model

V3 = Config.preset("deepseek-v3")


def test_v3_correction_range_is_10_to_23():
    # cd(32) = 64 ln(4096 / 64pi) / (2 ln 1e4) = 10.47 -> floor 10;  cd(1) = 22.5 -> ceil 23
    assert rope.correction_range(V3.rope_scaling, 64, 10000) == (10, 23)


def test_v3_softmax_scale():
    # 192^-0.5 * (0.1 ln 40 + 1)^2 = 0.0721688 * 1.3688879^2
    assert rope.softmax_scale(V3) == pytest.approx(0.13523378, abs=5e-9)
    assert rope.yarn_mscale(40, 1.0) == pytest.approx(1.3688879, abs=5e-8)
    assert rope.cos_sin_factor(V3) == 1.0


def test_v3_yarn_inv_freq_hand_values():
    f = rope.inv_freq(V3)
    assert f.shape == (32,)
    assert f[0] == 1.0
    assert f[8] == pytest.approx(0.1, rel=1e-15)          # 1e4^(-16/64), below low: unchanged
    assert f[10] == pytest.approx(1e4 ** (-20 / 64), rel=1e-15)  # ramp starts at 0
    # i = 16: base 1e4^(-1/2) = 0.01, ramp r = 6/13: 0.01 (7/13) + 0.01/40 (6/13) = 0.0055
    assert f[16] == pytest.approx(0.0055, rel=1e-14)
    assert f[24] == pytest.approx(0.001 / 40, rel=1e-14)  # above high: divided by s
    assert f[23] == pytest.approx(1e4 ** (-46 / 64) / 40, rel=1e-14)


def test_ramp_singularity_guard():
    r = rope.linear_ramp(3, 3, 6)
    np.testing.assert_allclose(r, [0, 0, 0, 0, 1, 1])  # (i - 3) / 0.001 clamped


def test_mscale_ratio_scales_cos_sin():
    cfg = Config.preset("tiny").replace(rope_scaling=RopeScaling(
        factor=4.0, original_max_position_embeddings=64, mscale=0.707, mscale_all_dim=1.0))
    want = (0.1 * 0.707 * math.log(4) + 1) / (0.1 * math.log(4) + 1)
    assert rope.cos_sin_factor(cfg) == pytest.approx(want, rel=1e-15)
    assert rope.softmax_scale(cfg) == pytest.approx(24 ** -0.5 * (0.1 * math.log(4) + 1) ** 2)


def _complex_rope(x, positions, freqs):
    """Independent form: each adjacent pair is a complex number multiplied by e^{i p f}."""
    z = x[..., 0::2] + 1j * x[..., 1::2]
    z = z * np.exp(1j * positions[:, None] * freqs[None, :])[None]
    out = np.empty_like(x)
    out[..., 0::2], out[..., 1::2] = z.real, z.imag
    return out


@given(st.integers(0, 2**31 - 1), st.lists(st.integers(0, 200_000), min_size=1, max_size=6))
@example(0, [4095, 4096, 100_000])
def test_adjacent_pair_rotation_equals_complex_multiplication(seed, positions):
    pos = np.array(positions)
    x = np.random.default_rng(seed).normal(size=(1, len(pos), 64))
    f = rope.inv_freq(V3)
    cos, sin = rope.cos_sin(pos, f)
    assert rel_err(rope.apply_rope(x, cos, sin), _complex_rope(x, pos, f)) < 1e-13


@given(st.integers(0, 2**31 - 1), st.integers(0, 150_000), st.integers(0, 150_000),
       st.integers(-4096, 4096))
@example(1, 4095, 4096, 1)
def test_rotary_scores_depend_only_on_relative_position(seed, m, n, shift):
    rng = np.random.default_rng(seed)
    q, k = rng.normal(size=(2, 1, 1, 64))
    f = rope.inv_freq(V3)

    def score(pm, pn):
        cq, sq = rope.cos_sin([pm], f)
        ck, sk = rope.cos_sin([pn], f)
        return float((rope.apply_rope(q, cq, sq) * rope.apply_rope(k, ck, sk)).sum())

    a, b = max(m + shift, 0), max(n + shift, 0)
    if a - b == m - n:
        # angles up to 1.5e5 rad lose ~1e-11 absolute precision in float64 cos/sin
        assert score(m, n) == pytest.approx(score(a, b), rel=1e-9, abs=1e-9)


def test_rotation_preserves_norms():
    x = np.random.default_rng(0).normal(size=(2, 5, 3, 64))
    cos, sin = rope.cos_sin(np.arange(100_000, 100_005), rope.inv_freq(V3))
    np.testing.assert_allclose(np.linalg.norm(rope.apply_rope(x, cos, sin), axis=-1),
                               np.linalg.norm(x, axis=-1), rtol=1e-13)


def test_permuted_half_layout_gives_the_same_scores():
    """transformers de-interleaves into [evens | odds] and rotates halves: the attention scores
    are identical, only the rotated vectors are a permutation (spec section 3)."""
    rng = np.random.default_rng(3)
    q, k = rng.normal(size=(2, 1, 7, 64))
    pos = np.arange(4090, 4097)
    f = rope.inv_freq(V3)
    cos, sin = rope.cos_sin(pos, f)
    ours = (rope.apply_rope(q, cos, sin) @ rope.apply_rope(k, cos, sin)[0].T)

    def half(x):
        x = np.concatenate([x[..., 0::2], x[..., 1::2]], axis=-1)
        c, s = np.concatenate([cos, cos], -1), np.concatenate([sin, sin], -1)
        rot = np.concatenate([-x[..., 32:], x[..., :32]], axis=-1)
        return x * c + rot * s
    theirs = half(q) @ half(k)[0].T
    assert rel_err(ours, theirs) < 1e-13
    assert rel_err(rope.apply_rope(q, cos, sin), half(q)) > 0.1  # the vectors themselves differ


@given(st.integers(0, 1000), st.floats(8, 64), st.floats(1.01, 4), st.integers(8, 512))
@example(0, 32.0, 1.0001, 64)
def test_yarn_with_factor_1_equals_plain_rope(seed, beta_fast, beta_slow, original):
    plain = Config.preset("tiny").replace(rope_scaling=None)
    yarn1 = plain.replace(rope_scaling=RopeScaling(
        factor=1.0, original_max_position_embeddings=original, beta_fast=beta_fast,
        beta_slow=beta_slow, mscale=0.8, mscale_all_dim=1.0))
    np.testing.assert_array_equal(rope.inv_freq(yarn1), rope.inv_freq(plain))
    assert rope.softmax_scale(yarn1) == rope.softmax_scale(plain)
    assert rope.cos_sin_factor(yarn1) == 1.0
    tokens = np.random.default_rng(seed).integers(0, 256, (1, 70))
    a = tiny_model(seed % 3, cfg=plain).forward(tokens)
    b = tiny_model(seed % 3, cfg=yarn1).forward(tokens)
    np.testing.assert_array_equal(a, b)


def test_yarn_changes_outputs_only_through_its_parts():
    """With factor 40 the model differs from plain RoPE (the option is live)."""
    tiny = Config.preset("tiny")
    tokens = np.arange(80).reshape(1, 80)
    a = tiny_model(0, cfg=tiny).forward(tokens)
    b = tiny_model(0, cfg=tiny.replace(rope_scaling=None)).forward(tokens)
    assert rel_err(a, b) > 1e-3


@given(st.integers(0, 200_000))
@example(4095)
@example(100_000)
def test_a_float32_model_forms_the_angle_in_float32(p):
    """cos_sin(dtype=float32) is cos(fl32(fl32(p) * fl32(inv_freq))) (what float32 engines
    compute: the angle's error grows with the position, about p * 2^-24 rad); the default is
    the float64 angle. The float64 model's expected values do not change."""
    freqs = rope.inv_freq(Config.preset("tiny"))
    c64, s64 = rope.cos_sin([p], freqs)
    c32, s32 = rope.cos_sin([p], freqs, dtype=np.float32)
    angle = (np.float32(p) * freqs.astype(np.float32)).astype(np.float64)
    assert np.array_equal(c32[0], np.cos(angle)) and np.array_equal(s32[0], np.sin(angle))
    assert np.array_equal(c64[0], np.cos(p * freqs))
    exact = p * freqs
    assert np.all(np.abs(angle - exact) <= 2.0 ** -23 * np.maximum(exact, 1e-30) + 1e-30)
    v3 = rope.inv_freq(Config.preset("deepseek-v3"))  # far out the float32 angle is visibly off
    off = np.abs(rope.cos_sin([p], v3, dtype=np.float32)[0] - rope.cos_sin([p], v3)[0]).max()
    assert off <= p * 2.0 ** -23 + 1e-7
    if p in (4095, 100_000):
        assert off > 1e-5


def test_the_model_forms_angles_in_its_working_precision():
    m64 = tiny_model()
    m32 = tiny_model(dtype="float32")
    pos = np.array([3, 900, 4000])
    assert np.array_equal(m64.attention_context(pos, 4001, 0).cos, rope.cos_sin(pos, m64.inv_freq, m64.cos_sin_factor)[0])
    want = rope.cos_sin(pos, m32.inv_freq, m32.cos_sin_factor, dtype=np.float32)[0]
    assert np.array_equal(np.asarray(m32.attention_context(pos, 4001, 0).cos), want)
