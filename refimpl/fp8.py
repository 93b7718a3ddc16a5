"""FP8 e4m3 block-scaled weights and activations (paper section 3.3; spec section 7).

A linear weight is stored as e4m3fn values q with a float32 scale per 128x128 block,
`weight_scale_inv` of shape (ceil(out/128), ceil(in/128)); W[i, j] = q[i, j] * s[i//128, j//128].
Edge blocks are partial (kv_a_proj_with_mqa's 576 rows give a (5, 56) scale).

Quantising (weights per 128x128 block, activations per token per 128 channels):
s = max(amax, 1e-4) / 448, q = round_e4m3(x / s); `ue8m0` rounds s up to a power of two (V3.1).

e4m3fn: 3 mantissa bits, exponent bias 7, no infinities, max 448, smallest normal 2^-6, subnormal
spacing 2^-9.  Round to nearest even moves a value x by at most max(2^-4 |x|, 2^-10): half a unit
in the last place, relative for normal numbers, absolute below 2^-6.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from .backend import array_module, to_numpy

BLOCK = 128
E4M3_MAX = 448.0
E4M3 = np.dtype(ml_dtypes.float8_e4m3fn)
SCALE_FLOOR = 1e-4  # amax below this is treated as 1e-4 (a block of zeros gets a finite scale)
E4M3_REL_ROUNDING = 2.0 ** -4  # half an ulp relative to |x|, normal range
E4M3_ABS_ROUNDING = 2.0 ** -10  # half the subnormal spacing 2^-9
# every e4m3fn bit pattern -> its value (NaN for the two NaN codes): decoding is one table lookup
_E4M3_VALUES = np.arange(256, dtype=np.uint8).view(E4M3).astype(np.float64)


def scale_shape(shape, block: int = BLOCK) -> tuple[int, int]:
    """(ceil(out/block), ceil(in/block)) for a weight of shape (out, in)."""
    return (-(-shape[0] // block), -(-shape[1] // block))


def bad_scales(scale_inv) -> str:
    """'' when every block scale is finite and strictly positive, else what is wrong in words
    (a zero scale zeroes its block, a negative one flips it, NaN/Inf poison it)."""
    s = np.asarray(scale_inv, dtype=np.float64)
    finite = np.isfinite(s)
    if not finite.all():
        return f"NaN or Inf ({int((~finite).sum())} scale(s))"
    if not (s > 0).all():
        return f"{int((s <= 0).sum())} zero or negative scale(s) (min {s.min():g})"
    return ""


def decode_e4m3(q, dtype=np.float64) -> np.ndarray:
    """e4m3fn array -> the same values in `dtype` (exact: every e4m3 value fits float16 and up)."""
    return value_table(dtype)[np.asarray(q).view(np.uint8)]


def round_e4m3(x) -> np.ndarray:
    """Round to the nearest e4m3fn value (ties to even), saturating at +-448.  -> e4m3fn array

    Rounded in float64 to the e4m3 grid (ulp 2^(e-3) for 2^e <= |x| < 2^(e+1), e >= -6), then
    cast exactly: ml_dtypes' own float64 cast goes through float32 and can round twice."""
    x = np.clip(np.asarray(x, dtype=np.float64), -E4M3_MAX, E4M3_MAX)
    _, e = np.frexp(x)  # |x| = m 2^e, m in [0.5, 1): the binade is 2^(e-1)
    ulp = np.ldexp(1.0, np.maximum(e - 1, -6) - 3)  # subnormals share the 2^-9 spacing
    return (np.round(x / ulp) * ulp).astype(E4M3)  # np.round: ties to even; exact on the grid


# Values decoded per np.take call: take converts its indices to intp, so a chunk of 2^16 keeps
# that temporary (512 KiB) and the chunk's output in the core's cache while it is scaled.
CHUNK = 1 << 16


@functools.lru_cache(maxsize=None)
def value_table(dtype) -> np.ndarray:
    """The 256 e4m3fn bit patterns -> their values in `dtype` (read-only; NaN for 0x7f, 0xff)."""
    t = _E4M3_VALUES.astype(dtype)
    t.flags.writeable = False
    return t


def dequantize(q, scale_inv, block: int = BLOCK, dtype=np.float64, out=None):
    """W = q * s per block: each scale covers a block x block tile, the last ones partial.

    q: [out, in] e4m3 (or any float dtype); scale_inv: [ceil(out/block), ceil(in/block)], float32
    or UE8M0 (ml_dtypes.float8_e8m0fnu: powers of two) -> [out, in] in `dtype` (written into
    `out` when given: a C-contiguous array of that shape and dtype).

    Decoding is a lookup: the stored bytes index the 256-entry value_table, a chunk of rows at a
    time (np.take straight into the result), and the chunk is scaled in place by its block row's
    scales while it is still in cache.  So the only full-size array is the result and the largest
    temporaries are one chunk's indices and one row of scales.  Each value is table[q] * s rounded
    once in `dtype`, the product the definition asks for."""
    q = np.asarray(q)
    rows_out, inp = q.shape
    s = np.asarray(to_numpy(scale_inv), dtype=dtype)  # (an explicit copy from a device)
    if out is None:
        out = np.empty((rows_out, inp), dtype=dtype)
    elif out.shape != (rows_out, inp) or out.dtype != np.dtype(dtype) or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous {np.dtype(dtype).name} array of shape "
                         f"{(rows_out, inp)}, got {out.dtype} {out.shape}")
    fp8 = q.dtype == E4M3
    codes, table = (q.view(np.uint8), value_table(dtype)) if fp8 else (q, None)
    step = max(1, min(block, CHUNK // max(inp, 1)))  # rows per chunk, within one block row
    for i in range(s.shape[0]):
        s_row = np.repeat(s[i], block)[:inp]  # [in]: scale of each column's block in this row
        for a in range(i * block, min((i + 1) * block, rows_out), step):
            rows = slice(a, min(a + step, (i + 1) * block, rows_out))
            w = out[rows]
            if fp8:
                np.take(table, codes[rows], out=w, mode="wrap")  # codes are 0..255: never wraps
            else:
                np.copyto(w, q[rows], casting="unsafe")
            np.multiply(w, s_row, out=w)  # W[i, j] = q[i, j] * s[i//128, j//128]
    return out


def nan_codes(q, chunk: int = 1 << 22) -> int:
    """How many e4m3fn NaN codes (0x7f, 0xff) q holds: e4m3fn has no Inf, so a dequantised
    weight is finite where its codes are not NaN and its products do not overflow
    (products_finite).  Counted on the stored bytes, in chunks."""
    u = np.asarray(q).reshape(-1).view(np.uint8)
    return sum(int(np.count_nonzero((u[a:a + chunk] & 0x7F) == 0x7F))
               for a in range(0, u.size, chunk))


def products_finite(scale_inv, dtype) -> bool:
    """True when no product q * s of a finite e4m3 value (|q| <= 448) and a scale can overflow
    `dtype`: fl(448 * max s) is finite, and rounding is monotone.  (False does not mean one
    overflows: only that the values must be checked.)"""
    s = np.asarray(scale_inv, dtype=dtype)
    with np.errstate(over="ignore"):
        return s.size == 0 or bool(np.isfinite(np.multiply(np.asarray(E4M3_MAX, dtype), s.max())))


def dequantize_bits(bits, scale_inv, block: int = BLOCK, dtype=np.float64):
    """The same W = q * s from the raw e4m3 bit patterns, with the array module of `bits`: on a
    GPU the stored byte per weight is what crosses the bus, and decoding happens on the device,
    one block row at a time (xp.take into the result, scaled in place), so no temporary is larger
    than a block row.

    bits: uint8 [out, in] (numpy or cupy); scale_inv: [ceil(out/block), ceil(in/block)] -> [out, in]"""
    xp = array_module(bits)
    if xp is np:
        return dequantize(np.asarray(bits).view(E4M3), scale_inv, block, dtype)
    rows_out, inp = bits.shape
    table = xp.asarray(value_table(dtype))  # 256 bit patterns -> values (an explicit copy)
    s = xp.asarray(np.asarray(scale_inv, dtype=dtype))
    out = xp.empty((rows_out, inp), dtype=dtype)
    for i in range(s.shape[0]):
        rows = slice(i * block, min((i + 1) * block, rows_out))
        w = out[rows]
        xp.take(table, bits[rows], out=w)
        w *= xp.repeat(s[i], block)[:inp]  # W[i, j] = q[i, j] * s[i//128, j//128]
    return out


def block_scales(w, block: int = BLOCK, ue8m0: bool = False) -> np.ndarray:
    """Per block x block tile: s = max(amax, 1e-4) / 448, as float32 (spec section 7);
    ue8m0 rounds s up to a power of two.   [out, in] -> [ceil(out/block), ceil(in/block)]"""
    out, inp = w.shape
    col_starts = np.arange(0, inp, block)
    amax = np.empty(scale_shape(w.shape, block))
    for i in range(amax.shape[0]):
        col_max = np.abs(w[i * block:(i + 1) * block]).max(axis=0)  # [in]
        amax[i] = np.maximum.reduceat(col_max, col_starts)  # [ceil(in/block)]
    return _scale_from_amax(amax, ue8m0)


def _scale_from_amax(amax, ue8m0: bool) -> np.ndarray:
    s = np.maximum(np.asarray(amax, dtype=np.float64), SCALE_FLOOR) / E4M3_MAX
    if ue8m0:
        s = 2.0 ** np.ceil(np.log2(s))  # UE8M0: an unsigned power-of-two exponent
    return s.astype(np.float32)


def quantize(w, block: int = BLOCK, ue8m0: bool = False):
    """Block quantisation of a weight (spec section 7): q = round_e4m3(W / s) with the
    float32 scale s of each tile, so that dequantize(q, s) ~= W.

    w: [out, in] float -> (q [out, in] e4m3fn, scale_inv [ceil(out/block), ceil(in/block)] f32)"""
    w = np.asarray(w)
    s = block_scales(w, block, ue8m0)
    q = np.empty(w.shape, dtype=E4M3)
    for i in range(s.shape[0]):
        rows = slice(i * block, (i + 1) * block)
        s_row = np.repeat(s[i].astype(np.float64), block)[:w.shape[1]]  # [in]
        q[rows] = round_e4m3(np.asarray(w[rows], dtype=np.float64) / s_row)
    return q, s


def quantize_activations(x, block: int = BLOCK):
    """Per token per `block` channels, the weights' rule (spec section 7), in float32 as
    DeepSeek's act_quant computes it.   x [T, K] -> (q [T, K] e4m3fn, s [T, ceil(K/block)] f32)"""
    x = np.asarray(x, dtype=np.float32)
    t, k = x.shape
    starts = np.arange(0, k, block)
    amax = np.maximum.reduceat(np.abs(x), starts, axis=1)  # [T, KB]
    s = _scale_from_amax(amax, ue8m0=False)
    s_cols = np.repeat(s, block, axis=1)[:, :k]  # [T, K]
    return round_e4m3(x / s_cols), s


@dataclass(frozen=True)
class BlockFP8:
    """A stored FP8 linear weight kept as it is stored: q [out, in] e4m3fn and scale_inv
    [ceil(out/128), ceil(in/128)] float32.  ops.linear multiplies it with fp8_gemm (`product`)."""

    q: np.ndarray
    scale_inv: np.ndarray

    @property
    def shape(self):
        return self.q.shape

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.scale_inv.nbytes

    def product(self, x) -> np.ndarray:
        """x W^T through the emulated FP8 GEMM (what ops.linear calls for this weight)."""
        return fp8_gemm(x, self)


def fp8_gemm(x, w: BlockFP8, block: int = BLOCK) -> np.ndarray:
    """y = x W^T the way an FP8 engine computes it (paper section 3.3.2; DeepSeek's fp8 path):
    x quantised per token per 128 channels, products of e4m3 values summed per 128-wide block of
    the inner dimension in float32, each block's sum scaled by s_x * s_W and accumulated in
    float32.   x [..., in] -> y [..., out] float32"""
    lead, k = x.shape[:-1], x.shape[-1]
    n = w.q.shape[0]
    qx, sx = quantize_activations(np.asarray(x).reshape(-1, k), block)
    qx, qw = decode_e4m3(qx, np.float32), decode_e4m3(w.q, np.float32)
    s_w = np.repeat(np.asarray(w.scale_inv, dtype=np.float32), block, axis=0)[:n]  # [out, KB]
    y = np.zeros((qx.shape[0], n), dtype=np.float32)
    for j in range(sx.shape[1]):
        cols = slice(j * block, (j + 1) * block)
        part = qx[:, cols] @ qw[:, cols].T  # [T, out]: exact e4m3 products, float32 sums
        y += part * (sx[:, j:j + 1] * s_w[None, :, j])  # scale per (token, out-row) block
    return y.reshape(*lead, n)
