"""Multi-head Latent Attention (paper section 2.1.1, eqs. 1-11; spec section 4).

Keys and values are compressed into one latent c^KV per token (d_c values) plus a rotary key
k^R shared by all heads (d_R values); that is all the cache holds. Two forms compute eq. (10):

- naive: expand c^KV into per-head k^C, v^C with W^UK, W^UV (eqs. 2, 5) and attend;
- absorbed: fold W^UK into the query and W^UV after attention, attending in the latent space.

They are algebraically equal (tests hold them to 1e-12 in float64).  `attention_block` is the
whole block, eqs. (1)-(11), as the model, the golden cases and the benchmarks all run it.
Weights are passed as a dict keyed by the checkpoint's names (`q_a_proj`, `kv_b_proj`, ...,
names.attention_keys), each [out, in].

Beyond eqs. (1)-(11), the released model normalises both latents: RMSNorms on c^Q (q_a_layernorm)
and on c^KV (kv_a_layernorm), the "additional RMSNorm layers after the compressed latent vectors"
of the paper's section 4.2.
"""

from __future__ import annotations

from .backend import array_module
from .errors import RefimplError
from .norm import rms_norm
from .ops import linear, softmax
from .rope import apply_rope
from .trace import ignore

# q_a_layernorm and kv_a_layernorm (section 4.2's extra RMSNorms on the latents) use the RMSNorm
# class default 1e-6 whatever rms_norm_eps says, as transformers and DeepSeek's code do (spec
# sections 9.1 and 9.3).
LATENT_NORM_EPS = 1e-6
FORMS = ("naive", "absorbed")


def attention_block(x, w, cfg, cos, sin, mask, scale: float, form: str = "naive", cache=None,
                    start: int = 0, record=ignore):
    """The MLA block, eqs. (1)-(11): normalised hidden states x [b, s, d] -> u [b, s, d].

    w: the block's weights by checkpoint key; cos, sin [s, d_R/2]: RoPE tables of the new tokens'
    positions; mask [s, t]: which keys each query sees; scale: the softmax scale
    (rope.softmax_scale); form: "naive" or "absorbed" (eq. 10 either way).
    cache: None (attend over the s new tokens, t = s) or a latent cache slot (c_kv [b, T, d_c],
    k_rope [b, T, d_R]): the new tokens' c^KV and k^R are written at start..start+s-1 and the
    attention reads entries 0..start+s-1 (t = start + s).
    record: c_q (with a low-rank query), q_nope, q_rope, c_kv, k_rope (the new tokens'), attn_out."""
    if form not in FORMS:
        raise RefimplError(f"MLA form {form!r} is not one of {', '.join(FORMS)}")
    c_q, q_nope, q_rope = query(x, w, cfg.num_attention_heads, cfg.qk_nope_head_dim,
                                cfg.qk_rope_head_dim)  # eqs. (6)-(8)
    c_kv, k_rope = latent_kv(x, w, cfg.kv_lora_rank)  # eqs. (1), (3) before RoPE
    q_rope, k_rope = rope_parts(q_rope, k_rope, cos, sin)  # eqs. (8), (3)
    if c_q is not None:
        record("c_q", c_q)
    for name, v in (("q_nope", q_nope), ("q_rope", q_rope), ("c_kv", c_kv), ("k_rope", k_rope)):
        record(name, v)
    if cache is not None:  # append to the latent cache, attend over everything in it
        c_all, k_all = cache
        s = x.shape[1]
        c_all[:, start:start + s] = c_kv
        k_all[:, start:start + s] = k_rope
        c_kv, k_rope = c_all[:, :start + s], k_all[:, :start + s]
    attend = attention_absorbed if form == "absorbed" else attention_naive
    o = attend(q_nope, q_rope, c_kv, k_rope, w["kv_b_proj"], scale, mask)  # eqs. (2), (4), (5), (9), (10)
    u = output(o, w["o_proj"])  # eq. (11)
    record("attn_out", u)
    return u


def query(h, w, n_heads: int, d_nope: int, d_rope: int):
    """Queries per head, before RoPE.   h: [b, s, d] -> (c_q [b, s, d'_c] or None,
    q_nope [b, s, H, d_h], q_rope_pre [b, s, H, d_R])."""
    if "q_proj" in w:  # q_lora_rank null (DeepSeek-V2-Lite): one direct projection
        c_q = None
        q = linear(h, w["q_proj"])
    else:
        # eq. (6) c^Q = W^DQ h, then section 4.2's RMSNorm on the latent
        c_q = rms_norm(linear(h, w["q_a_proj"]), w["q_a_layernorm"], LATENT_NORM_EPS)
        q = linear(c_q, w["q_b_proj"])  # eqs. (7), (8): [q^C ; q^R] = W^UQ c^Q (, W^QR c^Q)
    b, s = h.shape[:2]
    q = q.reshape(b, s, n_heads, d_nope + d_rope)  # [b, s, H*(d_h+d_R)] -> [b, s, H, d_h+d_R]
    return c_q, q[..., :d_nope], q[..., d_nope:]


def latent_kv(h, w, d_c: int):
    """The cached latents, before RoPE.   h: [b, s, d] -> (c_kv [b, s, d_c] normalised,
    k_rope_pre [b, s, d_R]).  One projection gives both (kv_a_proj_with_mqa = [W^DKV; W^KR]);
    c^KV then goes through section 4.2's RMSNorm (kv_a_layernorm)."""
    kv = linear(h, w["kv_a_proj_with_mqa"])  # eq. (1) c^KV = W^DKV h, and W^KR h: [b, s, d_c+d_R]
    c_kv = rms_norm(kv[..., :d_c], w["kv_a_layernorm"], LATENT_NORM_EPS)
    return c_kv, kv[..., d_c:]


def rope_parts(q_rope_pre, k_rope_pre, cos, sin):
    """eq. (8) q^R = RoPE(W^QR c^Q) per head, eq. (3) k^R = RoPE(W^KR h), shared by all heads."""
    return apply_rope(q_rope_pre, cos, sin), apply_rope(k_rope_pre, cos, sin)


def causal_mask(q_pos, k_pos, xp):
    """[s, t] True where key position <= query position."""
    return xp.asarray(k_pos)[None, :] <= xp.asarray(q_pos)[:, None]


def _masked_softmax(scores, mask):
    xp = array_module(scores)
    scores = xp.where(mask, scores, -xp.inf)  # [b, H, s, t]
    return softmax(scores, axis=-1)


def split_kv_b(kv_b_proj, n_heads: int, d_nope: int):
    """kv_b_proj [H*(d_h+d_v), d_c] -> (W^UK [H, d_h, d_c], W^UV [H, d_v, d_c])."""
    w = kv_b_proj.reshape(n_heads, -1, kv_b_proj.shape[-1])
    return w[:, :d_nope, :], w[:, d_nope:, :]


def attention_naive(q_nope, q_rope, c_kv, k_rope, kv_b_proj, scale, mask):
    """eq. (10) with expanded keys and values.

    q_nope [b, s, H, d_h], q_rope [b, s, H, d_R], c_kv [b, t, d_c], k_rope [b, t, d_R],
    mask [s, t] -> o [b, s, H, d_v]."""
    xp = array_module(q_nope)
    b, t = c_kv.shape[:2]
    n_heads, d_nope = q_nope.shape[2], q_nope.shape[3]
    kv = linear(c_kv, kv_b_proj).reshape(b, t, n_heads, -1)  # eqs. (2), (5): [b, t, H, d_h+d_v]
    k_nope, v = kv[..., :d_nope], kv[..., d_nope:]
    k_r = xp.broadcast_to(k_rope[:, :, None, :], (b, t, n_heads, k_rope.shape[-1]))
    k = xp.concatenate([k_nope, k_r], axis=-1)  # eq. (4): k = [k^C ; k^R]   [b, t, H, d_h+d_R]
    q = xp.concatenate([q_nope, q_rope], axis=-1)  # eq. (9): q = [q^C ; q^R]  [b, s, H, d_h+d_R]
    scores = q.transpose(0, 2, 1, 3) @ k.transpose(0, 2, 3, 1) * scale  # [b, H, s, t]
    p = _masked_softmax(scores, mask)
    return (p @ v.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)  # [b, H, s, d_v] -> [b, s, H, d_v]


def attention_absorbed(q_nope, q_rope, c_kv, k_rope, kv_b_proj, scale, mask):
    """eq. (10) in the latent space: q^C_i W^UK_i dotted with c^KV, W^UV applied after attention.
    Same arguments and result as attention_naive.  In einsum subscripts (b batch, s queries,
    t keys, h heads, d = d_h, r = d_R, c = d_c, v = d_v):

        q_lat  = einsum("bshd,hdc->bshc", q^C, W^UK)                    q^C_i W^UK_i
        scores = einsum("bshc,btc->bsht", q_lat, c^KV) + einsum("bshr,btr->bsht", q^R, k^R)
        o      = einsum("bshc,hvc->bshv", einsum("bsht,btc->bshc", p, c^KV), W^UV)

    computed below with matrix products instead: np.einsum was up to 3x slower per call on the
    CPU and no faster over a whole decode (benchmarks/cpu_forward.md)."""
    b, s, n_heads, d_nope = q_nope.shape
    t, d_c = c_kv.shape[1], c_kv.shape[2]
    w_uk, w_uv = split_kv_b(kv_b_proj, n_heads, d_nope)
    q_lat = q_nope.transpose(0, 2, 1, 3) @ w_uk  # [b, H, s, d_h] @ [H, d_h, d_c] -> [b, H, s, d_c]
    # heads folded into rows, the cache on the left: the latent cache is read once for all heads
    q_lat = q_lat.reshape(b, n_heads * s, d_c)
    q_r = q_rope.transpose(0, 2, 1, 3).reshape(b, n_heads * s, -1)  # [b, H*s, d_R]
    scores = (c_kv @ q_lat.transpose(0, 2, 1)  # c^KV_j . (q^C_i W^UK)      [b, t, H*s]
              + k_rope @ q_r.transpose(0, 2, 1)) * scale  # + k^R_j . q^R_i
    p = _masked_softmax(scores.transpose(0, 2, 1).reshape(b, n_heads, s, t), mask)
    o_lat = p.reshape(b, n_heads * s, t) @ c_kv  # sum_j p_j c^KV_j           [b, H*s, d_c]
    o = o_lat.reshape(b, n_heads, s, d_c) @ w_uv.transpose(0, 2, 1)  # W^UV after: [b, H, s, d_v]
    return o.transpose(0, 2, 1, 3)


def output(o, o_proj):
    """eq. (11): u = W^O [o_1; ...; o_H].   [b, s, H, d_v] -> [b, s, d]"""
    b, s = o.shape[:2]
    return linear(o.reshape(b, s, -1), o_proj)
