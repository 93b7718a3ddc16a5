#!/usr/bin/env python3
"""Full-width DeepSeek-V3 layers on one GPU: refimpl on cupy against the same math in torch.

Cases, float32, sizes of the deepseek-v3 preset (hidden 7168, 128 heads, q-lora 1536,
kv-lora 512, 256 routed experts of 2048 plus one shared, the published YaRN settings):

  mla_prefill   MLA block (eqs. 1-11), naive form, 4096 tokens attending causally
  mla_decode    MLA block, absorbed form: one new token against a 32,768-token latent cache
  moe           DeepSeekMoE layer (eqs. 12-16): gate, group-limited top-8 of 256, one shared
                expert, 4096 tokens

The refimpl side calls refimpl's own blocks (mla.attention_block, moe.moe_ffn: the functions the
model and the golden cases run) on cupy arrays. The torch side is the same math written independently in torch ops below, on the
same GPU, reading the very same weights through DLPack (no second copy: the MoE layer alone is
256 * 3 * 2048 * 7168 * 4 B = 45 GB in float32). TF32 is OFF on both sides (torch:
fp32_precision "ieee" / allow_tf32 False; cupy: CUPY_TF32 unset), so both do IEEE float32
matrix products and the comparison is like for like.

Each case reports its floating-point operations (matrix products only, 2 per multiply-add; the
formulas are in the `*_flops` functions), the bytes it must move at least (weights read once,
activations in and out, latent cache read/written; the `*_bytes` functions), the median time
over --repeats runs after --warmup runs (device events on a GPU, perf_counter on the CPU), the
achieved rates and their fraction of the ceilings measured at the start (a large float32 matrix
product, a large device-to-device copy counting bytes read plus written), the ratio
refimpl/torch and the relative difference of the two outputs.

    python benchmarks/gpu_layers.py                    # full width, cupy + torch on the GPU
    python benchmarks/gpu_layers.py --small --cpu      # tiny widths, numpy + torch on the CPU
    python benchmarks/gpu_layers.py --out DIR          # JSON and markdown into DIR ($OUT or out/)

The --small --cpu mode runs every code path of this script in seconds on a machine without a GPU
(tests/test_benchmark_scripts.py does so).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from refimpl import Config, mla, moe, rope  # noqa: E402

CASES = ("mla_prefill", "mla_decode", "moe")
LATENT_NORM_EPS = mla.LATENT_NORM_EPS


# ---------------------------------------------------------------------------------------------
# Sizes
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Sizes:
    cfg: Config
    prefill_tokens: int  # s = t for the prefill
    cache_len: int  # T: keys the decode step attends to (the new token is the last)
    moe_tokens: int
    gemm_n: int  # the matrix-rate ceiling: an n x n x n float32 product
    copy_bytes: int  # the bandwidth ceiling: a copy of this many bytes

    @property
    def dims(self):
        c = self.cfg
        return dict(d=c.hidden_size, H=c.num_attention_heads, ql=c.q_lora_rank,
                    dc=c.kv_lora_rank, dn=c.qk_nope_head_dim, dr=c.qk_rope_head_dim,
                    dv=c.v_head_dim, E=c.n_routed_experts, I=c.moe_intermediate_size,
                    Is=c.n_shared_experts * c.moe_intermediate_size, K=c.num_experts_per_tok)


def sizes(small: bool) -> Sizes:
    if small:
        return Sizes(Config.preset("tiny"), prefill_tokens=64, cache_len=512, moe_tokens=64,
                     gemm_n=256, copy_bytes=8 << 20)
    return Sizes(Config.preset("deepseek-v3"), prefill_tokens=4096, cache_len=32768,
                 moe_tokens=4096, gemm_n=8192, copy_bytes=2 << 30)


# ---------------------------------------------------------------------------------------------
# Operation and byte counts (matrix products only: 2 FLOP per multiply-add)
# ---------------------------------------------------------------------------------------------

def mla_weight_params(z: dict) -> int:
    """q_a_proj + q_a_layernorm + q_b_proj + kv_a_proj_with_mqa + kv_a_layernorm + kv_b_proj +
    o_proj (187,107,328 for V3)."""
    return (z["d"] * z["ql"] + z["ql"] + z["ql"] * z["H"] * (z["dn"] + z["dr"])
            + z["d"] * (z["dc"] + z["dr"]) + z["dc"] + z["dc"] * z["H"] * (z["dn"] + z["dv"])
            + z["H"] * z["dv"] * z["d"])


def mla_projection_flops(z: dict, n: int) -> int:
    """Per n tokens: q_a, q_b, kv_a and o_proj."""
    return 2 * n * (z["d"] * z["ql"] + z["ql"] * z["H"] * (z["dn"] + z["dr"])
                    + z["d"] * (z["dc"] + z["dr"]) + z["H"] * z["dv"] * z["d"])


def mla_prefill_flops(z: dict, s: int) -> int:
    """Naive form over s queries and t = s keys, the full s x t score matrix as computed (a
    causal kernel would skip about half of the two attention terms):
    projections + kv_b on t tokens 2 t d_c H (d_h + d_v) + scores 2 H s t (d_h + d_R)
    + p.v 2 H s t d_v."""
    t = s
    return (mla_projection_flops(z, s) + 2 * t * z["dc"] * z["H"] * (z["dn"] + z["dv"])
            + 2 * z["H"] * s * t * (z["dn"] + z["dr"]) + 2 * z["H"] * s * t * z["dv"])


def mla_prefill_bytes(z: dict, s: int, itemsize: int) -> int:
    """Weights once, x in, u out, the latents c^KV and k^R written (the cache)."""
    return itemsize * (mla_weight_params(z) + 2 * s * z["d"] + s * (z["dc"] + z["dr"]))


def mla_decode_flops(z: dict, t: int) -> int:
    """Absorbed form, one query, t cached keys: projections + W^UK into the query 2 H d_h d_c
    + scores 2 H t (d_c + d_R) + p.c^KV 2 H t d_c + W^UV after attention 2 H d_c d_v."""
    return (mla_projection_flops(z, 1) + 2 * z["H"] * z["dn"] * z["dc"]
            + 2 * z["H"] * t * (z["dc"] + z["dr"]) + 2 * z["H"] * t * z["dc"]
            + 2 * z["H"] * z["dc"] * z["dv"])


def mla_decode_bytes(z: dict, t: int, itemsize: int) -> int:
    """Weights once, the whole latent cache read (t x (d_c + d_R)), the new entry written,
    x in, u out."""
    return itemsize * (mla_weight_params(z) + (t + 1) * (z["dc"] + z["dr"]) + 2 * z["d"])


def moe_flops(z: dict, n: int) -> int:
    """Gate 2 T d E + routed 3 x 2 (T K) d I (gate, up, down per token-slot) + shared
    3 x 2 T d I_s."""
    return (2 * n * z["d"] * z["E"] + 3 * 2 * n * z["K"] * z["d"] * z["I"]
            + 3 * 2 * n * z["d"] * z["Is"])


def moe_bytes(z: dict, n: int, active_experts: int, itemsize: int) -> int:
    """Gate weight and bias, the three matrices of every expert that received a token and of the
    shared expert, x in, out written."""
    return itemsize * (z["E"] * z["d"] + z["E"] + 3 * z["d"] * z["I"] * active_experts
                       + 3 * z["d"] * z["Is"] + 2 * n * z["d"])


# ---------------------------------------------------------------------------------------------
# The device: array module, torch device, clocks, memory. Everything cupy-only is here.
# ---------------------------------------------------------------------------------------------

class Device:
    """numpy + torch CPU (--cpu) or cupy + torch CUDA on the same GPU."""

    def __init__(self, gpu: bool):
        import torch

        self.gpu, self.torch = gpu, torch
        if gpu:
            os.environ["CUPY_TF32"] = "0"  # read at cupy's first float32 product: IEEE, like torch
            import cupy

            self.xp = cupy
            self.tdev = torch.device("cuda", cupy.cuda.Device().id)
            torch.cuda.set_device(self.tdev)
        else:
            self.xp = np
            self.tdev = torch.device("cpu")
            torch.set_num_threads(1)  # steadier CPU timings; the CPU run only proves code paths
        self.tf32 = disable_tf32(torch)

    # -- arrays --
    def rng(self, seed: int):
        """Something with standard_normal(size, dtype=...): numpy's Generator, or cupy's cuRAND
        RandomState (host API, nothing to compile), drawing straight into device memory."""
        if self.gpu:
            return self.xp.random.RandomState(seed)
        return np.random.default_rng(seed)

    def to_torch(self, a):
        """The same memory as a torch tensor (DLPack on the GPU, from_numpy on the CPU)."""
        return self.torch.from_dlpack(a) if self.gpu else self.torch.from_numpy(a)

    # -- clocks: (elapsed ms, output) of one call of fn --
    def clock_refimpl(self, fn):
        if not self.gpu:
            return host_clock(fn)
        cp = self.xp
        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record()
        out = fn()
        b.record()
        b.synchronize()
        return cp.cuda.get_elapsed_time(a, b), out

    def clock_torch(self, fn):
        if not self.gpu:
            return host_clock(fn)
        tc = self.torch.cuda
        a, b = tc.Event(enable_timing=True), tc.Event(enable_timing=True)
        a.record()
        out = fn()
        b.record()
        b.synchronize()
        return a.elapsed_time(b), out

    def synchronize(self):
        if self.gpu:
            self.xp.cuda.Device().synchronize()
            self.torch.cuda.synchronize()

    # -- memory --
    def free(self):
        """Hand cached blocks back between cases (cupy's pool, torch's caching allocator)."""
        import gc

        gc.collect()
        if self.gpu:
            self.synchronize()
            self.xp.get_default_memory_pool().free_all_blocks()
            self.torch.cuda.empty_cache()

    def memory(self, side: str) -> dict:
        """What one side holds right after its runs: cupy's pool (every block since the last
        free_all_blocks, so its high-water mark) or torch's peak since the last reset."""
        if not self.gpu:
            return {}
        free, total = self.xp.cuda.runtime.memGetInfo()
        if side == "refimpl":
            held = self.xp.get_default_memory_pool().total_bytes()
        else:
            held = self.torch.cuda.max_memory_allocated()
            self.torch.cuda.reset_peak_memory_stats()
        return {"held_gb": held / 1e9, "device_free_gb": free / 1e9, "device_total_gb": total / 1e9}

    def describe(self) -> dict:
        torch = self.torch
        d = {"python": platform.python_version(), "numpy": np.__version__,
             "torch": torch.__version__, "tf32": self.tf32,
             "CUPY_TF32": os.environ.get("CUPY_TF32", "")}
        if self.gpu:
            cp = self.xp
            props = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)
            name = props["name"]
            d.update(device=name.decode() if isinstance(name, bytes) else str(name),
                     cupy=cp.__version__, cuda_runtime=cp.cuda.runtime.runtimeGetVersion(),
                     torch_cuda=torch.version.cuda)
        else:
            d.update(device=f"CPU ({platform.machine()}, {os.cpu_count()} cores)",
                     torch_threads=torch.get_num_threads())
        return d


def host_clock(fn):
    t0 = time.perf_counter()
    out = fn()
    return (time.perf_counter() - t0) * 1e3, out


def disable_tf32(torch) -> dict:
    """IEEE float32 matrix products in torch (cupy uses TF32 only when CUPY_TF32 is set)."""
    mm = torch.backends.cuda.matmul
    if hasattr(mm, "fp32_precision"):  # torch >= 2.9
        mm.fp32_precision = "ieee"
        torch.backends.cudnn.conv.fp32_precision = "ieee"
        return {"torch_matmul_fp32_precision": mm.fp32_precision}
    mm.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.set_float32_matmul_precision("highest")
    return {"torch_matmul_allow_tf32": mm.allow_tf32,
            "torch_float32_matmul_precision": torch.get_float32_matmul_precision()}


def measure(clock, fn, warmup: int, repeats: int):
    """warmup untimed calls, then repeats timed ones -> (times in ms, the last output)."""
    for _ in range(warmup):
        clock(fn)
    times, out = [], None
    for _ in range(repeats):
        out = None  # let the previous output go before the next run allocates
        ms, out = clock(fn)
        times.append(ms)
    return times, out


def timing(times) -> dict:
    return {"times_ms": times, "median_ms": statistics.median(times), "min_ms": min(times),
            "max_ms": max(times)}


# ---------------------------------------------------------------------------------------------
# Inputs: random, well scaled, made on the device (no host copies of the weights)
# ---------------------------------------------------------------------------------------------

def randn(rng, shape, std, dtype):
    a = rng.standard_normal(shape, dtype=dtype)
    a *= dtype(std)
    return a


def norm_weight(rng, n, dtype):
    """1 + N(0, 0.25^2): far from constant, so a side that dropped it would disagree."""
    a = randn(rng, (n,), 0.25, dtype)
    a += dtype(1.0)
    return a


def mla_weights(rng, z, dtype) -> dict:
    """Checkpoint names -> [out, in] weights, N(0, 1/in)."""
    H = z["H"]
    return {
        "q_a_proj": randn(rng, (z["ql"], z["d"]), z["d"] ** -0.5, dtype),
        "q_a_layernorm": norm_weight(rng, z["ql"], dtype),
        "q_b_proj": randn(rng, (H * (z["dn"] + z["dr"]), z["ql"]), z["ql"] ** -0.5, dtype),
        "kv_a_proj_with_mqa": randn(rng, (z["dc"] + z["dr"], z["d"]), z["d"] ** -0.5, dtype),
        "kv_a_layernorm": norm_weight(rng, z["dc"], dtype),
        "kv_b_proj": randn(rng, (H * (z["dn"] + z["dv"]), z["dc"]), z["dc"] ** -0.5, dtype),
        "o_proj": randn(rng, (z["d"], H * z["dv"]), (H * z["dv"]) ** -0.5, dtype),
    }


def ffn_weights(rng, d, inter, dtype) -> dict:
    return {"gate_proj": randn(rng, (inter, d), d ** -0.5, dtype),
            "up_proj": randn(rng, (inter, d), d ** -0.5, dtype),
            "down_proj": randn(rng, (d, inter), inter ** -0.5, dtype)}


# ---------------------------------------------------------------------------------------------
# The refimpl side: refimpl's own functions, on whatever module the arrays come from
# ---------------------------------------------------------------------------------------------

def refimpl_mla(x, w, cos, sin, mask, cfg: Config, scale: float, form: str, cache=None,
                start: int = 0):
    """One MLA block (mla.attention_block, as the model runs it): x [b, s, d] -> u [b, s, d];
    with a cache (c_kv [b, T, d_c], k_rope [b, T, d_R]) the new latents are written at `start`
    and the attention runs over the cache up to start + s."""
    return mla.attention_block(x, w, cfg, cos, sin, mask, scale, form, cache, start)


def refimpl_moe(u, gate_w, bias, experts, shared, cfg: Config):
    """eq. (12) without the residual (moe.moe_ffn): u [T, d] -> (out [T, d], idx [T, K])."""
    seen = {}
    out = moe.moe_ffn(u, gate_w, bias, experts, shared, cfg, lambda name, v: seen.setdefault(name, v))
    return out, seen["topk_idx"]


# ---------------------------------------------------------------------------------------------
# The torch side: the same math, written in torch ops
# ---------------------------------------------------------------------------------------------

def t_rms_norm(x, w, eps):
    return x * (x.square().mean(-1, keepdim=True) + eps).rsqrt() * w


def t_rope(x, cos, sin):
    """Rotate adjacent pairs (x_2i, x_2i+1) by angle i.  x [b, s, (H,) d_R]; cos, sin [s, d_R/2]."""
    if x.dim() == 4:
        cos, sin = cos[:, None], sin[:, None]
    pairs = x.unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    return torch_stack_last(a * cos - b * sin, a * sin + b * cos)


def torch_stack_last(a, b):
    import torch

    return torch.stack((a, b), dim=-1).flatten(-2)


def torch_mla(x, w, cos, sin, mask, z: dict, scale: float, form: str, cache=None, start=0):
    """MLA in torch, same contract as refimpl_mla; mask None means attend to every key."""
    import torch

    b, s, _ = x.shape
    H, dn, dr, dc, dv = z["H"], z["dn"], z["dr"], z["dc"], z["dv"]
    c_q = t_rms_norm(x @ w["q_a_proj"].T, w["q_a_layernorm"], LATENT_NORM_EPS)
    q = (c_q @ w["q_b_proj"].T).view(b, s, H, dn + dr)
    q_nope, q_pe = q.split([dn, dr], dim=-1)
    kv = x @ w["kv_a_proj_with_mqa"].T
    c_kv = t_rms_norm(kv[..., :dc], w["kv_a_layernorm"], LATENT_NORM_EPS)
    q_pe, k_pe = t_rope(q_pe, cos, sin), t_rope(kv[..., dc:], cos, sin)
    if cache is not None:
        cache[0][:, start:start + s] = c_kv
        cache[1][:, start:start + s] = k_pe
        c_kv, k_pe = cache[0][:, :start + s], cache[1][:, :start + s]
    t = c_kv.shape[1]
    w_kv = w["kv_b_proj"].view(H, dn + dv, dc)
    if form == "naive":
        k_nope, v = (c_kv @ w["kv_b_proj"].T).view(b, t, H, dn + dv).split([dn, dv], dim=-1)
        k = torch.cat([k_nope, k_pe[:, :, None, :].expand(b, t, H, dr)], dim=-1)
        scores = torch.einsum("bshe,bthe->bhst", torch.cat([q_nope, q_pe], dim=-1), k) * scale
    else:
        q_lat = torch.einsum("bshn,hnc->bshc", q_nope, w_kv[:, :dn])
        scores = (torch.einsum("bshc,btc->bhst", q_lat, c_kv)
                  + torch.einsum("bshr,btr->bhst", q_pe, k_pe)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    p = scores.softmax(dim=-1)
    if form == "naive":
        o = torch.einsum("bhst,bthv->bshv", p, v)
    else:
        o = torch.einsum("bshc,hvc->bshv", torch.einsum("bhst,btc->bshc", p, c_kv),
                         w_kv[:, dn:])
    return o.reshape(b, s, H * dv) @ w["o_proj"].T


def t_swiglu(x, w):
    import torch.nn.functional as F

    return (F.silu(x @ w["gate_proj"].T) * (x @ w["up_proj"].T)) @ w["down_proj"].T


def torch_moe(u, gate_w, bias, experts, shared, cfg: Config):
    """Sigmoid scores, selection on s + b within the topk_group best groups (group score = sum of
    the top two), weights normalised and scaled, tokens grouped by expert."""
    import torch

    assert cfg.scoring_func == "sigmoid" and cfg.topk_method == "noaux_tc"
    n, d = u.shape
    E, G, K = cfg.n_routed_experts, cfg.n_group, cfg.num_experts_per_tok
    scores = torch.sigmoid(u @ gate_w.T)  # [T, E]
    biased = scores + bias
    group = biased.view(n, G, E // G).topk(2, dim=-1).values.sum(dim=-1)  # [T, G]
    keep = group.sort(dim=-1, descending=True, stable=True).indices[:, :cfg.topk_group]
    group_ok = torch.zeros_like(group, dtype=torch.bool).scatter_(1, keep, True)
    biased = biased.masked_fill(~group_ok.repeat_interleave(E // G, dim=1), float("-inf"))
    idx = biased.sort(dim=-1, descending=True, stable=True).indices[:, :K]  # [T, K]
    g = scores.gather(1, idx)
    if cfg.norm_topk_prob:
        g = g / g.sum(dim=-1, keepdim=True)
    g = (g * cfg.routed_scaling_factor).flatten()
    slot_expert = idx.flatten()
    order = slot_expert.argsort(stable=True)
    counts = torch.bincount(slot_expert, minlength=E).tolist()  # one host sync per layer
    contrib = torch.empty((n * K, d), dtype=u.dtype, device=u.device)
    begin = 0
    for e, c in enumerate(counts):
        if c:
            slots = order[begin:begin + c]
            contrib[slots] = t_swiglu(u[slots // K], experts[e]) * g[slots, None]
            begin += c
    return contrib.view(n, K, d).sum(dim=1) + t_swiglu(u, shared), idx


# ---------------------------------------------------------------------------------------------
# Cases
# ---------------------------------------------------------------------------------------------

def rel_err_torch(a, b) -> float:
    """max |a - b| / max |b|, in float64."""
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def run_pair(dev: Device, ref_fn, torch_fn, warmup, repeats):
    """Time both sides; the cupy side first, its pool emptied before torch runs."""
    ref_times, ref_out = measure(dev.clock_refimpl, ref_fn, warmup, repeats)
    memory = {"refimpl": dev.memory("refimpl")}
    dev.free()
    t_times, t_out = measure(dev.clock_torch, torch_fn, warmup, repeats)
    memory["torch"] = dev.memory("torch")
    return ref_times, ref_out, t_times, t_out, memory


def rope_tables(dev: Device, cfg: Config, positions):
    cos, sin = rope.cos_sin(positions, rope.inv_freq(cfg), rope.cos_sin_factor(cfg), dev.xp)
    return cos, sin


def case_mla_prefill(dev: Device, sz: Sizes, dtype, warmup, repeats) -> dict:
    cfg, z, s = sz.cfg, sz.dims, sz.prefill_tokens
    rng = dev.rng(1)
    w = mla_weights(rng, z, dtype)
    x = randn(rng, (1, s, z["d"]), 1.0, dtype)
    pos = np.arange(s)
    cos, sin = rope_tables(dev, cfg, pos)
    mask = mla.causal_mask(pos, pos, dev.xp)
    scale = rope.softmax_scale(cfg)
    tw = {k: dev.to_torch(v) for k, v in w.items()}
    tx, tcos, tsin = (dev.to_torch(a) for a in (x, cos.astype(dtype), sin.astype(dtype)))
    tmask = dev.torch.ones((s, s), dtype=dev.torch.bool, device=dev.tdev).tril()  # key <= query
    ref_t, ref_out, t_t, t_out, mem = run_pair(
        dev, lambda: refimpl_mla(x, w, cos, sin, mask, cfg, scale, "naive"),
        lambda: torch_mla(tx, tw, tcos, tsin, tmask, z, scale, "naive"), warmup, repeats)
    itemsize = np.dtype(dtype).itemsize
    return {"what": f"MLA block, naive form, {s} tokens, causal", "tokens": s,
            "flops": mla_prefill_flops(z, s), "bytes": mla_prefill_bytes(z, s, itemsize),
            "refimpl": timing(ref_t), "torch": timing(t_t), "memory": mem,
            "rel_err": rel_err_torch(dev.to_torch(ref_out), t_out)}


def case_mla_decode(dev: Device, sz: Sizes, dtype, warmup, repeats) -> dict:
    cfg, z, T = sz.cfg, sz.dims, sz.cache_len
    rng = dev.rng(2)
    w = mla_weights(rng, z, dtype)
    x = randn(rng, (1, 1, z["d"]), 1.0, dtype)
    c_cache = randn(rng, (1, T, z["dc"]), 1.0, dtype)  # normalised latents are O(1)
    r_cache = randn(rng, (1, T, z["dr"]), 1.0, dtype)
    start = T - 1  # the new token is the last of the T the step attends to
    pos = np.array([start])
    cos, sin = rope_tables(dev, cfg, pos)
    mask = mla.causal_mask(pos, np.arange(T), dev.xp)  # [1, T], all True
    scale = rope.softmax_scale(cfg)
    tw = {k: dev.to_torch(v) for k, v in w.items()}
    tx, tcos, tsin = (dev.to_torch(a) for a in (x, cos.astype(dtype), sin.astype(dtype)))
    # each side writes its own copy of the cache (the step writes entry `start`)
    ref_cache = (c_cache, r_cache)
    t_cache = (dev.to_torch(c_cache.copy()), dev.to_torch(r_cache.copy()))
    ref_t, ref_out, t_t, t_out, mem = run_pair(
        dev, lambda: refimpl_mla(x, w, cos, sin, mask, cfg, scale, "absorbed", ref_cache, start),
        lambda: torch_mla(tx, tw, tcos, tsin, None, z, scale, "absorbed", t_cache, start),
        warmup, repeats)
    itemsize = np.dtype(dtype).itemsize
    return {"what": f"MLA block, absorbed form, 1 token against a {T}-token latent cache",
            "cache_len": T, "flops": mla_decode_flops(z, T),
            "bytes": mla_decode_bytes(z, T, itemsize),
            "refimpl": timing(ref_t), "torch": timing(t_t), "memory": mem,
            "rel_err": rel_err_torch(dev.to_torch(ref_out), t_out)}


def case_moe(dev: Device, sz: Sizes, dtype, warmup, repeats) -> dict:
    cfg, z, n = sz.cfg, sz.dims, sz.moe_tokens
    rng = dev.rng(3)
    gate_w = randn(rng, (z["E"], z["d"]), z["d"] ** -0.5, dtype)
    bias = randn(rng, (z["E"],), 0.05, dtype)
    experts = [ffn_weights(rng, z["d"], z["I"], dtype) for _ in range(z["E"])]
    shared = ffn_weights(rng, z["d"], z["Is"], dtype)
    u = randn(rng, (n, z["d"]), 1.0, dtype)
    t_gate, t_bias, t_u = dev.to_torch(gate_w), dev.to_torch(bias), dev.to_torch(u)
    t_experts = [{k: dev.to_torch(v) for k, v in e.items()} for e in experts]
    t_shared = {k: dev.to_torch(v) for k, v in shared.items()}
    ref_t, (ref_out, ref_idx), t_t, (t_out, t_idx), mem = run_pair(
        dev, lambda: refimpl_moe(u, gate_w, bias, experts, shared, cfg),
        lambda: torch_moe(t_u, t_gate, t_bias, t_experts, t_shared, cfg), warmup, repeats)
    # a near tie in s + b can flip between the two float32 gates: compare outputs only on the
    # tokens whose selected expert sets agree, and say how many did
    ref_idx = dev.to_torch(dev.xp.ascontiguousarray(ref_idx))
    same = (ref_idx.sort(dim=-1).values == t_idx.sort(dim=-1).values).all(dim=-1)
    r_out = dev.to_torch(ref_out)
    active = int(ref_idx.unique().numel())
    itemsize = np.dtype(dtype).itemsize
    return {"what": f"DeepSeekMoE layer, {n} tokens, top-{z['K']} of {z['E']} + shared",
            "tokens": n, "active_experts": active, "flops": moe_flops(z, n),
            "bytes": moe_bytes(z, n, active, itemsize),
            "refimpl": timing(ref_t), "torch": timing(t_t), "memory": mem,
            "routing_agree_tokens": int(same.sum()), "routing_tokens": n,
            "rel_err": rel_err_torch(r_out[same], t_out[same]) if bool(same.any()) else float("nan")}


CASE_FUNCS = {"mla_prefill": case_mla_prefill, "mla_decode": case_mla_decode, "moe": case_moe}


# ---------------------------------------------------------------------------------------------
# Ceilings
# ---------------------------------------------------------------------------------------------

def ceilings(dev: Device, sz: Sizes, dtype, warmup, repeats) -> dict:
    """Matrix rate: an n^3 float32 product (TF32 off); bandwidth: a device-to-device copy,
    counting bytes read plus bytes written. Measured through both cupy and torch; the better of
    the two is the ceiling."""
    xp, n = dev.xp, sz.gemm_n
    rng = dev.rng(0)
    a, b = randn(rng, (n, n), 1.0, dtype), randn(rng, (n, n), 1.0, dtype)
    ta, tb = dev.to_torch(a), dev.to_torch(b)
    g_ref, _ = measure(dev.clock_refimpl, lambda: a @ b, warmup, repeats)
    g_t, _ = measure(dev.clock_torch, lambda: ta @ tb, warmup, repeats)
    del a, b, ta, tb
    dev.free()
    m = sz.copy_bytes // np.dtype(dtype).itemsize
    src, dst = randn(rng, (m,), 1.0, dtype), xp.empty((m,), dtype)
    tsrc, tdst = dev.to_torch(src), dev.to_torch(dst)
    c_ref, _ = measure(dev.clock_refimpl, lambda: xp.copyto(dst, src), warmup, repeats)
    c_t, _ = measure(dev.clock_torch, lambda: tdst.copy_(tsrc), warmup, repeats)
    del src, dst, tsrc, tdst
    dev.free()
    flop, moved = 2 * n ** 3, 2 * m * np.dtype(dtype).itemsize
    tf = {"array_module": flop / statistics.median(g_ref) / 1e9,
          "torch": flop / statistics.median(g_t) / 1e9}
    bw = {"array_module": moved / statistics.median(c_ref) / 1e6,
          "torch": moved / statistics.median(c_t) / 1e6}
    return {"matmul": {"n": n, "tflops": tf, "ceiling_tflops": max(tf.values())},
            "copy": {"bytes_read_plus_written": moved, "gbps": bw,
                     "ceiling_gbps": max(bw.values())}}


def derive(r: dict, ceil: dict) -> None:
    """Rates, fractions of the ceilings and the floor times, from the medians."""
    ref_ms, t_ms = r["refimpl"]["median_ms"], r["torch"]["median_ms"]
    peak, bw = ceil["matmul"]["ceiling_tflops"], ceil["copy"]["ceiling_gbps"]
    r["ratio_refimpl_over_torch"] = ref_ms / t_ms
    for side, ms in (("refimpl", ref_ms), ("torch", t_ms)):
        tflops = r["flops"] / ms / 1e9
        gbps = r["bytes"] / ms / 1e6
        r[side].update(tflops=tflops, gbps=gbps, frac_matmul=tflops / peak, frac_copy=gbps / bw)
    floor_compute, floor_memory = r["flops"] / peak / 1e9, r["bytes"] / bw / 1e6
    r["floor_ms"] = {"compute": floor_compute, "memory": floor_memory,
                     "bound": "compute" if floor_compute >= floor_memory else "memory"}


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------

def si(x: float, unit: str) -> str:
    for p, s in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= p:
            return f"{x / p:.3g} {s}{unit}"
    return f"{x:.3g} {unit}"


def markdown(res: dict) -> str:
    c = res["ceilings"]
    side = "cupy" if res["mode"] == "gpu" else "numpy"
    lines = [
        f"## gpu_layers: {res['env']['device']}, {res['dtype']}, "
        f"{'small widths' if res['small'] else 'full width (deepseek-v3)'}",
        "",
        f"Ceilings (TF32 off): matrix {c['matmul']['ceiling_tflops']:.3g} TFLOP/s "
        f"(float32 n={c['matmul']['n']}; {side} {c['matmul']['tflops']['array_module']:.3g}, "
        f"torch {c['matmul']['tflops']['torch']:.3g}), copy {c['copy']['ceiling_gbps']:.3g} GB/s "
        f"read+written ({side} {c['copy']['gbps']['array_module']:.3g}, "
        f"torch {c['copy']['gbps']['torch']:.3g}); "
        f"medians of {res['repeats']} after {res['warmup']} warm-ups.",
        "",
        f"| case | FLOP | bytes | bound | refimpl ({side}) ms | torch ms | refimpl/torch | "
        "refimpl TFLOP/s (% matrix) | refimpl GB/s (% copy) | torch % matrix | torch % copy | "
        "rel err |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in res["cases"].items():
        a, t = r["refimpl"], r["torch"]
        err = f"{r['rel_err']:.1e}"
        if "routing_agree_tokens" in r:
            err += f" ({r['routing_agree_tokens']}/{r['routing_tokens']} routed alike)"
        lines.append(
            f"| {name} | {si(r['flops'], 'FLOP')} | {si(r['bytes'], 'B')} | "
            f"{r['floor_ms']['bound']} | {a['median_ms']:.3f} | {t['median_ms']:.3f} | "
            f"{r['ratio_refimpl_over_torch']:.2f} | {a['tflops']:.3g} ({100 * a['frac_matmul']:.0f}%) | "
            f"{a['gbps']:.3g} ({100 * a['frac_copy']:.0f}%) | {100 * t['frac_matmul']:.0f}% | "
            f"{100 * t['frac_copy']:.0f}% | {err} |")
    for name, err in res.get("errors", {}).items():
        lines.append(f"| {name} | FAILED: {err} |")
    lines += ["", "Targets (issue 6): " + "; ".join(
        f"{k}: {'met' if v['met'] else 'MISSED'} ({v['value']:.2f} {v['want']})"
        for k, v in res["targets"].items())]
    return "\n".join(lines) + "\n"


def targets(res: dict) -> dict:
    out = {}
    for name, r in res["cases"].items():
        v = r["ratio_refimpl_over_torch"]
        out[f"{name} refimpl/torch"] = {"value": v, "want": "<= 1.5", "met": v <= 1.5}
    if "mla_decode" in res["cases"]:
        v = res["cases"]["mla_decode"]["refimpl"]["frac_copy"]
        out["mla_decode fraction of copy bandwidth"] = {"value": v, "want": ">= 0.5",
                                                        "met": v >= 0.5}
    return out


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="tiny widths (the tiny preset)")
    ap.add_argument("--cpu", action="store_true", help="numpy + torch on the CPU, no GPU needed")
    ap.add_argument("--out", default=os.environ.get("OUT") or "out",
                    help="directory for gpu_layers.json and gpu_layers.md (default $OUT or out/)")
    ap.add_argument("--cases", default=",".join(CASES),
                    help=f"comma-separated subset of {','.join(CASES)}")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    bad = [c for c in cases if c not in CASES]
    if bad or args.warmup < 0 or args.repeats < 1:
        ap.error(f"unknown case(s) {bad}" if bad else "need --warmup >= 0 and --repeats >= 1")

    if not args.cpu:
        from refimpl.backend import gpu_available

        ok, why = gpu_available()
        if not ok:
            print(f"gpu_layers: no GPU ({why}); use --cpu for the CPU path", file=sys.stderr)
            return 2
    dev = Device(gpu=not args.cpu)
    dtype = np.float32
    sz = sizes(args.small)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    res = {"mode": "gpu" if dev.gpu else "cpu", "small": args.small, "dtype": "float32",
           "warmup": args.warmup, "repeats": args.repeats, "env": dev.describe(),
           "sizes": {"prefill_tokens": sz.prefill_tokens, "cache_len": sz.cache_len,
                     "moe_tokens": sz.moe_tokens, **sz.dims}, "cases": {}}
    t0 = time.perf_counter()
    failed = []

    def save():  # after every step, so that a crash or a timeout keeps what was measured
        res["wall_s"] = time.perf_counter() - t0
        write_atomic(out_dir / "gpu_layers.json", json.dumps(res, indent=1, default=float))

    res["ceilings"] = ceilings(dev, sz, dtype, args.warmup, max(args.repeats, 3))
    save()
    print(f"ceilings: {json.dumps(res['ceilings'])}", flush=True)
    for name in cases:
        t1 = time.perf_counter()
        try:
            r = CASE_FUNCS[name](dev, sz, dtype, args.warmup, args.repeats)
        except Exception as e:  # noqa: BLE001 - record it, free the memory, measure the rest
            failed.append(name)
            res.setdefault("errors", {})[name] = f"{type(e).__name__}: {e}"
            print(f"{name}: FAILED {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            traceback.print_exc()
            del e
            dev.free()
            save()
            continue
        dev.free()
        derive(r, res["ceilings"])
        r["wall_s"] = time.perf_counter() - t1
        res["cases"][name] = r
        save()
        print(f"{name}: refimpl {r['refimpl']['median_ms']:.3f} ms, torch "
              f"{r['torch']['median_ms']:.3f} ms, rel err {r['rel_err']:.2e} "
              f"({r['wall_s']:.1f} s)", flush=True)
    res["targets"] = targets(res)
    save()
    table = markdown(res)
    write_atomic(out_dir / "gpu_layers.md", table)
    print()
    print(table, end="")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
