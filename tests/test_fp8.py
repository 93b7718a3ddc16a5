"""FP8 e4m3 block quantisation (spec section 7): decoding, dequantisation by hand-computed
blocks, rounding, the per-block rounding bound, activation quantisation and the FP8 GEMM."""

import ml_dtypes
import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from refimpl import fp8

E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)


def codes(*bits):
    return np.array(bits, dtype=np.uint8).view(E4M3)


def test_e4m3_codes_decode_to_their_textbook_values():
    # sign | 4 exponent bits (bias 7) | 3 mantissa bits; 0x7f is NaN, there is no Inf
    got = fp8.decode_e4m3(codes(0x38, 0xB8, 0x7E, 0x01, 0x08, 0x3C, 0x00, 0x7F))
    assert got[:7].tolist() == [1.0, -1.0, 448.0, 2.0 ** -9, 2.0 ** -6, 1.5, 0.0]
    assert np.isnan(got[7])


def test_dequantize_aligned_blocks_by_hand():
    # a 256 x 384 weight of 2 x 3 full blocks, q = 1.5 everywhere, scales 1, 2, 4 / 8, 16, 32
    q = np.full((256, 384), 1.5).astype(E4M3)
    s = np.array([[1, 2, 4], [8, 16, 32]], dtype=np.float32)
    w = fp8.dequantize(q, s)
    assert w[0, 0] == 1.5 and w[127, 127] == 1.5
    assert w[0, 128] == 3.0 and w[127, 383] == 6.0
    assert w[128, 0] == 12.0 and w[255, 255] == 24.0 and w[200, 300] == 48.0


def test_dequantize_edge_blocks_by_hand():
    # kv_a_proj_with_mqa: 576 x 7168 -> scales (5, 56); the last block row has 64 rows
    assert fp8.scale_shape((576, 7168)) == (5, 56)
    assert fp8.scale_shape((130, 260)) == (2, 3)
    q = np.zeros((130, 260), dtype=E4M3)
    q[129, 259] = 2.0
    q[128, 0] = -0.5
    q[0, 256] = 448.0
    s = np.array([[1, 2, 3], [4, 5, 6]], dtype=np.float32)
    w = fp8.dequantize(q, s)
    assert w.shape == (130, 260)
    assert w[129, 259] == 12.0  # 2 x s[1, 2]
    assert w[128, 0] == -2.0  # -0.5 x s[1, 0]
    assert w[0, 256] == 1344.0  # 448 x s[0, 2]
    assert np.count_nonzero(w) == 3


def test_dequantize_float32_equals_float64_rounded_once():
    rng = np.random.default_rng(0)
    q = fp8.round_e4m3(rng.normal(0, 100, (200, 300)))
    s = rng.uniform(1e-3, 1.0, fp8.scale_shape(q.shape)).astype(np.float32)
    assert np.array_equal(fp8.dequantize(q, s, dtype=np.float32),
                          fp8.dequantize(q, s, dtype=np.float64).astype(np.float32))


def test_round_e4m3_is_exact_on_the_grid_and_ties_go_to_even():
    grid = fp8.decode_e4m3(np.arange(256, dtype=np.uint8).view(E4M3))
    grid = grid[np.isfinite(grid)]
    assert np.array_equal(fp8.decode_e4m3(fp8.round_e4m3(grid)), grid)
    # between 1 and 1.125 (ulp 1/8): the midpoint 1.0625 goes to even 1.0, 1.1875 to 1.25;
    # subnormal spacing 2^-9: 2^-10 is a tie to 0, 3 x 2^-10 a tie to 2^-8
    x = np.array([1.0625, 1.1875, 2.0 ** -10, 3 * 2.0 ** -10, 1000.0, -1e9])
    assert fp8.decode_e4m3(fp8.round_e4m3(x)).tolist() == [1.0, 1.25, 0.0, 2.0 ** -8, 448.0, -448.0]


def test_round_e4m3_rounds_float64_once():
    # just above the 1.0625 midpoint: nearest is 1.125.  (Casting through float32 first, as
    # ml_dtypes' float64 cast does, lands on the midpoint and then on 1.0.)
    x = np.array([1.0 + 2.0 ** -4 + 2.0 ** -30])
    assert fp8.decode_e4m3(fp8.round_e4m3(x))[0] == 1.125


def test_block_scale_is_amax_over_448_with_a_floor():
    w = np.zeros((130, 140))
    w[5, 7] = -224.0  # block (0, 0): amax 224 -> s = 0.5
    w[129, 139] = 896.0  # block (1, 1): amax 896 -> s = 2
    w[0, 130] = 1e-6  # block (0, 1): amax below the 1e-4 floor -> s = 1e-4 / 448
    s = fp8.block_scales(w)
    assert s.dtype == np.float32 and s.shape == (2, 2)
    assert s[0, 0] == 0.5 and s[1, 1] == 2.0
    assert s[0, 1] == np.float32(1e-4 / 448) and s[1, 0] == np.float32(1e-4 / 448)
    q, _ = fp8.quantize(w)
    assert fp8.decode_e4m3(q)[5, 7] == -448.0 and fp8.decode_e4m3(q)[129, 139] == 448.0


def test_ue8m0_scales_are_the_next_power_of_two():
    w = np.zeros((128, 128))
    w[0, 0] = 300.0  # 300 / 448 = 0.67 -> 1
    s = fp8.block_scales(w, ue8m0=True)
    assert s[0, 0] == 1.0
    w[0, 0] = 448.0 * 2 ** -5  # exactly a power of two stays
    assert fp8.block_scales(w, ue8m0=True)[0, 0] == 2.0 ** -5


def rounding_bound(w, s):
    """Per element: half an e4m3 ulp of w/s times s, i.e. max(2^-4 |w|, 2^-10 s); plus the
    float32 rounding of s itself, which can push |w/s| past 448 by 2^-24 relative (clipped)."""
    s_full = np.repeat(np.repeat(s.astype(np.float64), 128, 0)[:w.shape[0]], 128, 1)[:, :w.shape[1]]
    return np.maximum(fp8.E4M3_REL_ROUNDING * np.abs(w), fp8.E4M3_ABS_ROUNDING * s_full) \
        + 2.0 ** -22 * s_full * fp8.E4M3_MAX


@given(rows=st.integers(1, 300), cols=st.integers(1, 300), log_scale=st.floats(-12, 6),
       ue8m0=st.booleans(), seed=st.integers(0, 2 ** 16), zero_block=st.booleans())
def test_quantise_then_dequantise_stays_within_the_e4m3_rounding_bound(rows, cols, log_scale,
                                                                       ue8m0, seed, zero_block):
    rng = np.random.default_rng(seed)
    w = rng.standard_t(3, (rows, cols)) * 10.0 ** log_scale  # heavy tails: blocks differ
    if zero_block:
        w[:128, :128] = 0.0
    q, s = fp8.quantize(w, ue8m0=ue8m0)
    assert q.dtype == E4M3 and s.shape == fp8.scale_shape(w.shape)
    err = np.abs(fp8.dequantize(q, s) - w)
    assert np.all(err <= rounding_bound(w, s))


def test_activation_quantisation_is_per_token_per_128_channels():
    x = np.zeros((2, 200), dtype=np.float32)
    x[0, 3] = 224.0  # token 0, channels 0-127: s = 0.5
    x[0, 150] = -4.48  # token 0, channels 128-199 (partial block): s = 0.01
    x[1, 199] = 448.0  # token 1, second block: s = 1; its first block is empty: the floor
    q, s = fp8.quantize_activations(x)
    assert s.shape == (2, 2)
    assert s[0, 0] == 0.5 and s[0, 1] == np.float32(0.01) and s[1, 1] == 1.0
    assert s[1, 0] == np.float32(1e-4 / 448)
    v = fp8.decode_e4m3(q)
    assert v[0, 3] == 448.0 and v[0, 150] == -448.0 and v[1, 199] == 448.0


def test_fp8_gemm_multiplies_the_quantised_operands_in_float32():
    rng = np.random.default_rng(1)
    x = rng.normal(0, 1, (5, 300))
    w = rng.normal(0, 300 ** -0.5, (200, 300))
    qw, sw = fp8.quantize(w)
    y = fp8.fp8_gemm(x, fp8.BlockFP8(qw, sw))
    assert y.dtype == np.float32 and y.shape == (5, 200)
    # the same quantised operands multiplied exactly in float64
    qx, sx = fp8.quantize_activations(x)
    xd = fp8.decode_e4m3(qx) * np.repeat(sx.astype(np.float64), 128, axis=1)[:, :300]
    exact = xd @ fp8.dequantize(qw, sw).T
    # float32: 3 block partial sums of 128 products each, then 3 scaled accumulations
    bound = 300 * 2.0 ** -23 * (np.abs(xd) @ np.abs(fp8.dequantize(qw, sw)).T)
    assert np.all(np.abs(y - exact) <= bound)
    # and it differs from the unquantised product by the e4m3 rounding of both operands
    ref = x @ w.T
    rel = np.linalg.norm(y - ref) / np.linalg.norm(ref)
    assert 0.01 < rel < 2 * 2 * fp8.E4M3_REL_ROUNDING


@pytest.mark.parametrize("shape", [(1, 1), (128, 128), (129, 1), (576, 300)])
def test_quantize_shapes_and_dtypes(shape):
    q, s = fp8.quantize(np.ones(shape))
    assert q.shape == shape and q.dtype == E4M3
    assert s.shape == fp8.scale_shape(shape) and s.dtype == np.float32
    assert np.all(fp8.decode_e4m3(q) == 448.0)  # every block's amax maps to the e4m3 maximum
    assert np.allclose(fp8.dequantize(q, s), 1.0, rtol=2.0 ** -23, atol=0)  # 448 x float32(1/448)


@given(st.integers(1, 300), st.integers(1, 300), st.integers(0, 2**31))
def test_dequantize_from_bit_patterns_equals_dequantize(rows, cols, seed):
    """The device path (raw bytes decoded by a 256-entry table) equals the host path, partial
    edge blocks included."""
    rng = np.random.default_rng(seed)
    q = fp8.round_e4m3(rng.normal(0, 100, (rows, cols)))
    s = rng.uniform(1e-4, 1.0, fp8.scale_shape((rows, cols))).astype(np.float32)
    np.testing.assert_array_equal(fp8.dequantize_bits(q.view(np.uint8), s), fp8.dequantize(q, s))


# ---- the lookup-table dequantisation: bit for bit the definition ------------------------------

def dequantize_before(q, scale_inv, block=128, dtype=np.float64):
    """The dequantisation as refimpl computed it before the lookup table (kept verbatim as the
    reference): decode a block row with a fancy-indexed table, multiply by the repeated scales."""
    out, inp = q.shape
    s = np.asarray(scale_inv, dtype=dtype)
    w = np.empty((out, inp), dtype=dtype)
    fp8_in = np.asarray(q).dtype == E4M3
    table = np.arange(256, dtype=np.uint8).view(E4M3).astype(np.float64).astype(dtype)
    for i in range(s.shape[0]):
        rows = slice(i * block, min((i + 1) * block, out))
        s_row = np.repeat(s[i], block)[:inp]
        vals = table[np.asarray(q[rows]).view(np.uint8)] if fp8_in else np.asarray(q[rows], dtype=dtype)
        np.multiply(vals, s_row, out=w[rows])
    return w


def by_definition(q, s, dtype):
    """W[i, j] = value(q[i, j]) * s[i // 128, j // 128], one element at a time in `dtype`."""
    vals = np.arange(256, dtype=np.uint8).view(E4M3).astype(np.float64)
    u = q.view(np.uint8)
    s = np.asarray(s, dtype=dtype)
    w = np.empty(q.shape, dtype)
    for i in range(q.shape[0]):
        for j in range(q.shape[1]):
            w[i, j] = dtype(vals[u[i, j]]) * s[i // 128, j // 128]
    return w


def _scales(rng, shape, fmt):
    """float32 block scales over a wide range, or UE8M0 ones: powers of two, stored as float32
    or as ml_dtypes.float8_e8m0fnu exponent bytes."""
    if fmt == "float32":
        return np.exp(rng.uniform(-12, 12, shape)).astype(np.float32)
    exps = rng.integers(-20, 20, shape)
    if fmt == "ue8m0-float32":
        return np.ldexp(1.0, exps).astype(np.float32)
    return (exps + 127).astype(np.uint8).view(ml_dtypes.float8_e8m0fnu)


@given(st.integers(1, 300), st.integers(1, 400), st.integers(0, 2**31),
       st.sampled_from(["float32", "ue8m0-float32", "ue8m0-e8m0"]),
       st.sampled_from([np.float64, np.float32]))
@example(128, 128, 0, "float32", np.float64).via("aligned single block")
@example(129, 257, 1, "ue8m0-e8m0", np.float32).via("one past the block edges")
@example(1, 1, 2, "float32", np.float64).via("one value")
def test_dequantize_is_bitwise_the_previous_code_over_every_byte(rows, cols, seed, fmt, dtype):
    """Every byte value (NaN codes 0x7f and 0xff included) at random places, shapes that are not
    multiples of 128, both scale formats: the same bits as before, NaN payloads included."""
    rng = np.random.default_rng(seed)
    u = rng.integers(0, 256, (rows, cols), dtype=np.uint8)
    u.reshape(-1)[:256] = np.arange(256, dtype=np.uint8)[:u.size]  # every code when it fits
    q = u.view(E4M3)
    s = _scales(rng, fp8.scale_shape(q.shape), fmt)
    with np.errstate(invalid="ignore", over="ignore"):
        got = fp8.dequantize(q, s, dtype=dtype)
        assert got.dtype == dtype and got.shape == q.shape
        np.testing.assert_array_equal(got.view(np.uint8), dequantize_before(q, s, dtype=dtype).view(np.uint8))
        into = np.full(q.shape, 7.0, dtype)  # an output buffer already holding other values
        assert fp8.dequantize(q, s, dtype=dtype, out=into) is into
        np.testing.assert_array_equal(into.view(np.uint8), got.view(np.uint8))


def test_dequantize_equals_the_definition_element_by_element():
    rng = np.random.default_rng(5)
    u = rng.integers(0, 256, (130, 260), dtype=np.uint8)
    u[0, :256] = np.arange(256)
    s = _scales(rng, (2, 3), "float32")
    for dtype in (np.float64, np.float32):
        with np.errstate(invalid="ignore"):
            np.testing.assert_array_equal(fp8.dequantize(u.view(E4M3), s, dtype=dtype).view(np.uint8),
                                          by_definition(u.view(E4M3), s, dtype).view(np.uint8))


def test_dequantize_refuses_an_output_buffer_of_the_wrong_kind():
    q, s = np.zeros((4, 4), E4M3), np.ones((1, 1), np.float32)
    for bad in (np.empty((4, 5)), np.empty((4, 4), np.float32), np.empty((4, 8))[:, ::2]):
        with pytest.raises(ValueError, match="out must be"):
            fp8.dequantize(q, s, out=bad)


def test_nan_codes_and_overflow_decide_finiteness():
    u = np.zeros((3, 300), np.uint8)
    assert fp8.nan_codes(u.view(E4M3)) == 0
    u[0, 5], u[2, 299], u[1, 7] = 0x7F, 0xFF, 0x7E  # two NaN codes and 448
    assert fp8.nan_codes(u.view(E4M3)) == 2
    assert fp8.products_finite(np.array([[1.0, 2.0, 1e30]], np.float32), np.float64)
    # 448 x 1e36 overflows float32 but not float64: the float32 values must then be checked
    assert not fp8.products_finite(np.array([[1e36]], np.float32), np.float32)
    assert fp8.products_finite(np.array([[1e36]], np.float32), np.float64)
    assert fp8.products_finite(np.array([[float(np.finfo(np.float32).max) / 448]], np.float32),
                               np.float32)
