"""RoPE and YaRN (paper section 2.1.1 eqs. 3 and 8; YaRN: section 4.3; spec section 3).

Rotary embedding acts only on the decoupled parts q^R and k^R, rotating ADJACENT pairs
(2i, 2i+1) of the checkpoint's layout. YaRN stretches the low frequencies by the factor s, keeps
the high ones, ramps between, and scales attention by m(s, mscale_all_dim)^2 in the softmax.
Section 4.3's hyper-parameters map onto the config as: s = rope_scaling.factor (40),
alpha = beta_slow (1), beta = beta_fast (32), sqrt(t) = 0.1 ln s + 1 = m(s, mscale_all_dim).
All tables are computed in float64 whatever the working precision.
"""

from __future__ import annotations

import math

import numpy as np

from .backend import array_module, to_numpy
from .config import Config, RopeScaling
from .ops import boundary


def base_inv_freq(d_rope: int, theta: float):
    """inv_freq[i] = theta^(-2i/d_R), i = 0 .. d_R/2 - 1.   -> [d_R/2] float64"""
    i = np.arange(d_rope // 2, dtype=np.float64)
    return theta ** (-2.0 * i / d_rope)


def correction_dim(rotations: float, d_rope: int, theta: float, original_len: int) -> float:
    """cd(r) = d_R * ln(L_orig / (2 pi r)) / (2 ln theta): the dimension index whose wavelength
    fits r times into the original context."""
    return d_rope * math.log(original_len / (2 * math.pi * rotations)) / (2 * math.log(theta))


def correction_range(rs: RopeScaling, d_rope: int, theta: float) -> tuple[int, int]:
    """(low, high) = (max(floor(cd(beta_fast)), 0), min(ceil(cd(beta_slow)), d_R - 1)), with
    section 4.3's alpha = beta_slow and beta = beta_fast (V3: alpha = 1, beta = 32): frequencies
    turning more than beta times over the original context keep their value, fewer than alpha
    times are interpolated.  For the V3 preset: (10, 23)."""
    low = math.floor(correction_dim(rs.beta_fast, d_rope, theta, rs.original_max_position_embeddings))
    high = math.ceil(correction_dim(rs.beta_slow, d_rope, theta, rs.original_max_position_embeddings))
    return max(low, 0), min(high, d_rope - 1)


def linear_ramp(low: float, high: float, n: int):
    """r[i] = clamp((i - low) / (high - low), 0, 1); high += 0.001 when low == high.  -> [n]"""
    if low == high:
        high += 0.001
    return np.clip((np.arange(n, dtype=np.float64) - low) / (high - low), 0.0, 1.0)


def yarn_inv_freq(rs: RopeScaling, d_rope: int, theta: float):
    """inv_freq_yarn = inv_freq / s * r + inv_freq * (1 - r): dims below `low` keep their
    frequency, dims above `high` are divided by s.   -> [d_R/2] float64"""
    inv_freq = base_inv_freq(d_rope, theta)
    low, high = correction_range(rs, d_rope, theta)
    r = linear_ramp(low, high, d_rope // 2)
    return inv_freq / rs.factor * r + inv_freq * (1.0 - r)


def yarn_mscale(s: float, k: float) -> float:
    """m(s, k) = 0.1 * k * ln(s) + 1 for s > 1, else 1.  With k = mscale_all_dim = 1 this is
    section 4.3's sqrt(t) = 0.1 ln s + 1 (V3: 0.1 ln 40 + 1 = 1.3688879)."""
    return 0.1 * k * math.log(s) + 1.0 if s > 1 else 1.0


def inv_freq(cfg: Config):
    """The frequencies the model uses: YaRN's whenever rope_scaling is yarn (at every position,
    not only past the original context), plain RoPE otherwise.   -> [d_R/2] float64"""
    if cfg.rope_scaling is None:
        return base_inv_freq(cfg.qk_rope_head_dim, cfg.rope_theta)
    return yarn_inv_freq(cfg.rope_scaling, cfg.qk_rope_head_dim, cfg.rope_theta)


def cos_sin_factor(cfg: Config) -> float:
    """cos/sin are multiplied by m(s, mscale) / m(s, mscale_all_dim) (= 1 for V3)."""
    rs = cfg.rope_scaling
    if rs is None:
        return 1.0
    return yarn_mscale(rs.factor, rs.mscale) / yarn_mscale(rs.factor, rs.mscale_all_dim)


def softmax_scale(cfg: Config) -> float:
    """eq. (10)'s 1/sqrt(d_h + d_h^R), times YaRN's t (section 4.3, sqrt(t) = m(s, mscale_all_dim)):
    (d_h + d_h^R)^-0.5 * m(s, mscale_all_dim)^2 (V3: 192^-0.5 * 1.3688879^2 = 0.13523378)."""
    scale = cfg.qk_head_dim ** -0.5
    rs = cfg.rope_scaling
    if rs is not None:
        scale *= yarn_mscale(rs.factor, rs.mscale_all_dim) ** 2
    return scale


def cos_sin(positions, freqs, factor: float = 1.0, xp=np, dtype=np.float64):
    """Angles theta_{p,i} = p * inv_freq_i -> (cos, sin) * factor, each [n_pos, d_R/2] float64,
    placed on xp's device. The angle is formed in `dtype`: float64 by default; a float32 model
    forms it in float32, as float32 engines do (p and inv_freq rounded to float32, their product
    rounded: an absolute error that grows with the position, about p * 2^-24 radians)."""
    pos = to_numpy(positions).astype(dtype)  # host tables (explicit copy from a device)
    angles = pos[:, None] * np.asarray(freqs, dtype=dtype)[None, :]  # [n, d_R/2]
    angles = angles.astype(np.float64)
    return xp.asarray(np.cos(angles) * factor), xp.asarray(np.sin(angles) * factor)


def apply_rope(x, cos, sin):
    """Rotate adjacent pairs (x_2i, x_2i+1) by the angle of frequency i (eqs. 3 and 8):
    (a, b) -> (a cos - b sin, a sin + b cos).

    x: [batch, seq, (heads,) d_R]; cos, sin: [seq, d_R/2] -> same shape as x, x's dtype."""
    xp = array_module(x)
    c, s = pair_tables(x, cos, sin)
    a, b = x[..., 0::2], x[..., 1::2]
    out = xp.empty_like(x)
    out[..., 0::2] = a * c - b * s
    out[..., 1::2] = a * s + b * c
    return boundary(out)


def pair_tables(x, cos, sin):
    """cos, sin [seq, d_R/2] shaped to broadcast against x [batch, seq, (heads,) d_R/2 or d_R]
    (over a heads axis when present), in x's dtype."""
    extra = x.ndim - 3
    c = cos.reshape(cos.shape[:1] + (1,) * extra + cos.shape[1:]).astype(x.dtype, copy=False)
    s = sin.reshape(sin.shape[:1] + (1,) * extra + sin.shape[1:]).astype(x.dtype, copy=False)
    return c, s
