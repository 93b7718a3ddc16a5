#!/usr/bin/env python3
"""What a prefill and a decode step of the whole 61-layer DeepSeek-V3 cost, on paper: bytes of
weights read, FLOPs, and the time each implies on one H200 (weights streamed from the host) and
on an 8 x H200 node (layers placed across the GPUs, activations passed between them).

Everything is counted from the config and the tensor plan (refimpl.layout.tensor_plan), so
the parameter totals are exactly spec section 8's. The hardware numbers are assumptions,
each a flag; the defaults are the H200 datasheet (141 GB HBM3e at 4.8 TB/s), PCIe Gen5 x16 at a
practical 50 GB/s host to device, NVLink 4 at 450 GB/s per direction per GPU, and matrix rates
for the precisions: fp8 1580 and bf16 790 TFLOP/s (790 is the bf16 rate measured on this
workplace's H200, fp8 taken as twice that), float32 and float64 50 TFLOP/s (plain float32 has
no tensor cores; float64 uses Hopper's FP64 tensor cores; replace both with the matrix ceiling
benchmarks/gpu_layers.py measures). docs/gpu.md explains the results.

    python benchmarks/full_model_cost.py [--context 32768] [--prompt 4096] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from refimpl import Config  # noqa: E402
from refimpl.layout import tensor_plan  # noqa: E402

FP8_BLOCK = 128


def stored_bytes(name: str, shape: tuple) -> int:
    """Bytes in the published FP8 checkpoint (spec section 7): linear weights e4m3 (1 B) plus a float32
    scale per 128 x 128 block; embedding, lm_head, norms and the gate weight bf16; the gate bias
    float32."""
    n = math.prod(shape)
    if name.endswith("e_score_correction_bias"):
        return 4 * n
    if len(shape) == 1 or "embed_tokens" in name or "lm_head" in name or name.endswith("mlp.gate.weight"):
        return 2 * n
    blocks = math.ceil(shape[0] / FP8_BLOCK) * math.ceil(shape[1] / FP8_BLOCK)
    return n + 4 * blocks


def inventory(cfg: Config) -> dict:
    """Parameters and stored bytes: total, routed experts, and what ONE token reads (every
    matrix it passes through; K routed experts per MoE layer; one embedding row)."""
    inv = {k: 0 for k in ("params", "bytes", "routed_params", "routed_bytes", "active_params",
                          "active_bytes", "active_matrix_params")}
    e_per_layer = cfg.n_routed_experts
    for name, shape in tensor_plan(cfg, mtp=False).items():
        n, b = math.prod(shape), stored_bytes(name, shape)
        inv["params"] += n
        inv["bytes"] += b
        if ".mlp.experts." in name:
            inv["routed_params"] += n
            inv["routed_bytes"] += b
            share = cfg.num_experts_per_tok / e_per_layer  # K of E experts per token
        elif "embed_tokens" in name:
            share = 1 / shape[0]  # one row
        else:
            share = 1.0
        inv["active_params"] += n * share
        inv["active_bytes"] += b * share
        if len(shape) == 2 and "embed_tokens" not in name:
            inv["active_matrix_params"] += n * share
    inv["moe_layers"] = sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers))
    inv["resident_bytes"] = inv["bytes"] - inv["routed_bytes"]  # all but the routed experts
    return inv


def attention_flops_decode(cfg: Config, context: int) -> float:
    """Absorbed MLA, one query over `context` keys, all layers: 2 H L (d_c + d_R) + 2 H L d_c."""
    per_layer = 2 * cfg.num_attention_heads * context * (2 * cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    return cfg.num_hidden_layers * per_layer


def attention_flops_prefill(cfg: Config, n: int) -> float:
    """Naive MLA, causal (N (N+1) / 2 query-key pairs), all layers: q.k over d_h + d_R, p.v over
    d_v (the kv_b expansion is among the matrices)."""
    pairs = n * (n + 1) / 2
    per_layer = 2 * cfg.num_attention_heads * pairs * (cfg.qk_head_dim + cfg.v_head_dim)
    return cfg.num_hidden_layers * per_layer


def distinct_experts(cfg: Config, tokens: int) -> float:
    """Expected experts of one layer that at least one of `tokens` tokens selects, if routing
    were uniform: E (1 - (1 - K/E)^T)."""
    e, k = cfg.n_routed_experts, cfg.num_experts_per_tok
    return e * (1 - (1 - k / e) ** tokens)


def costs(cfg: Config, a) -> dict:
    inv = inventory(cfg)
    hbm, host, link = a.hbm_tbps * 1e12, a.host_gbps * 1e9, a.nvlink_gbps * 1e9
    rate = {"fp8": a.fp8_tflops * 1e12, "bf16": a.bf16_tflops * 1e12,
            "float32": a.fp32_tflops * 1e12, "float64": a.fp64_tflops * 1e12}
    L, N, d = a.context, a.prompt, cfg.hidden_size
    cache_vals = cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)  # per token
    routed_active = inv["routed_bytes"] * cfg.num_experts_per_tok / cfg.n_routed_experts
    out = {"inventory": inv, "assumptions": vars(a)}

    # ---- decode, batch 1, one token at context L ----
    dec_flops = 2 * inv["active_matrix_params"] + attention_flops_decode(cfg, L)
    dec = {"flops": dec_flops, "weight_bytes": inv["active_bytes"],
           "cache_bytes_bf16": cache_vals * L * 2, "cache_bytes_float32": cache_vals * L * 4}
    # one GPU: the resident part (all but routed experts) stays in HBM; whatever of the routed
    # experts fits beside it is cached, the rest crosses the host link when a token needs it
    hbm_free = a.hbm_gb * 1e9 - inv["resident_bytes"] - a.reserve_gb * 1e9
    hit = max(0.0, min(1.0, hbm_free / inv["routed_bytes"]))
    streamed = routed_active * (1 - hit)
    dec["one_gpu"] = {"expert_cache_fraction": hit, "host_bytes": streamed,
                      "host_s": streamed / host,
                      "hbm_s": (inv["active_bytes"] + dec["cache_bytes_bf16"]) / hbm,
                      "flops_s_fp8": dec_flops / rate["fp8"]}
    dec["one_gpu"]["step_s"] = max(dec["one_gpu"]["host_s"], dec["one_gpu"]["hbm_s"])
    hop_bytes = d * 2  # one hidden state, bf16
    dec["node"] = {"gpus": a.gpus, "bytes_per_gpu": inv["bytes"] / a.gpus,
                   "hbm_s": (inv["active_bytes"] + dec["cache_bytes_bf16"]) / hbm,
                   "hop_bytes": hop_bytes, "hops_s": (a.gpus - 1) * hop_bytes / link}
    dec["node"]["step_s"] = dec["node"]["hbm_s"] + dec["node"]["hops_s"]
    # refimpl in float32 on the node, FP8 kept resident and dequantised on the device per layer:
    # every active weight is read as FP8, written and read again as float32
    deq = inv["active_bytes"] + 2 * 4 * inv["active_matrix_params"] + dec["cache_bytes_float32"]
    dec["node_refimpl_float32"] = {"hbm_bytes": deq, "step_s": deq / hbm + dec["node"]["hops_s"]}
    out["decode"] = dec

    # ---- prefill of N tokens ----
    pre_flops = 2 * inv["active_matrix_params"] * N + attention_flops_prefill(cfg, N)
    experts_touched = distinct_experts(cfg, N)
    pre = {"tokens": N, "flops": pre_flops, "experts_touched_per_layer": experts_touched,
           "routed_bytes_read": inv["routed_bytes"] * experts_touched / cfg.n_routed_experts,
           "hidden_bytes_per_hop_bf16": N * d * 2, "hidden_bytes_per_hop_float32": N * d * 4}
    pre["compute_s"] = {k: pre_flops / v for k, v in rate.items()}
    pre["one_gpu"] = {"host_s": pre["routed_bytes_read"] * (1 - hit) / host}
    pre["one_gpu"]["step_s_fp8"] = max(pre["one_gpu"]["host_s"], pre["compute_s"]["fp8"])
    pre["one_gpu"]["step_s_float32"] = max(pre["one_gpu"]["host_s"], pre["compute_s"]["float32"])
    hops = (a.gpus - 1) * N * d * 2 / link
    pre["node"] = {"hops_s_bf16": hops,
                   "step_s_fp8_sequential": pre["compute_s"]["fp8"] + hops,
                   "step_s_fp8_pipelined": pre["compute_s"]["fp8"] / a.gpus + hops / a.gpus,
                   "step_s_float32_sequential": pre["compute_s"]["float32"] + 2 * hops,
                   "step_s_float32_pipelined": (pre["compute_s"]["float32"] + 2 * hops) / a.gpus}
    out["prefill"] = pre
    return out


def fmt(x: float, unit: str) -> str:
    for p, s in ((1e15, "P"), (1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= p:
            return f"{x / p:.3g} {s}{unit}"
    return f"{x:.3g} {unit}"


def ms(s: float) -> str:
    if s < 1e-3:
        return f"{s * 1e6:.3g} us"
    return f"{s * 1e3:.3g} ms" if s < 1 else f"{s:.3g} s"


def report(c: dict) -> str:
    inv, dec, pre, a = c["inventory"], c["decode"], c["prefill"], c["assumptions"]
    one, node = dec["one_gpu"], dec["node"]
    return "\n".join([
        f"Model: {inv['params']:,} parameters, {fmt(inv['bytes'], 'B')} as the FP8 checkpoint "
        f"(routed experts {fmt(inv['routed_bytes'], 'B')}, the rest {fmt(inv['resident_bytes'], 'B')}); "
        f"one token reads {inv['active_params'] / 1e9:.2f} B parameters = "
        f"{fmt(inv['active_bytes'], 'B')} of weights ({inv['active_matrix_params'] / 1e9:.2f} B in matrices).",
        "",
        "| step | FLOP | bytes | one H200, weights streamed | 8 x H200, layers placed |",
        "|---|---|---|---|---|",
        f"| decode, batch 1, context {a['context']} | {fmt(dec['flops'], 'FLOP')} | weights "
        f"{fmt(dec['weight_bytes'], 'B')} + latent cache {fmt(dec['cache_bytes_bf16'], 'B')} (bf16) | "
        f"{ms(one['step_s'])}: {fmt(one['host_bytes'], 'B')} of experts over the host link "
        f"({100 * one['expert_cache_fraction']:.0f}% of experts cached in HBM) | "
        f"{ms(node['step_s'])} (HBM {ms(node['hbm_s'])}, {a['gpus'] - 1} hops of "
        f"{fmt(node['hop_bytes'], 'B')} {ms(node['hops_s'])}); refimpl float32 dequantising on "
        f"the device: {ms(dec['node_refimpl_float32']['step_s'])} |",
        f"| prefill, {pre['tokens']} tokens | {fmt(pre['flops'], 'FLOP')} | all weights once "
        f"({pre['experts_touched_per_layer']:.0f} of 256 experts per layer touched); hidden "
        f"{fmt(pre['hidden_bytes_per_hop_bf16'], 'B')} per hop (bf16) | "
        f"host link {ms(pre['one_gpu']['host_s'])}; compute fp8 {ms(pre['compute_s']['fp8'])}, "
        f"float32 {ms(pre['compute_s']['float32'])} | fp8 {ms(pre['node']['step_s_fp8_sequential'])} "
        f"stage after stage, {ms(pre['node']['step_s_fp8_pipelined'])} pipelined; refimpl float32 "
        f"{ms(pre['node']['step_s_float32_sequential'])} / "
        f"{ms(pre['node']['step_s_float32_pipelined'])} |",
        "",
        f"Assumptions: HBM {a['hbm_gb']} GB at {a['hbm_tbps']} TB/s, host link {a['host_gbps']} GB/s, "
        f"NVLink {a['nvlink_gbps']} GB/s per direction, {a['reserve_gb']} GB of HBM kept for "
        f"activations and cache, matrix rates fp8 {a['fp8_tflops']}, bf16 {a['bf16_tflops']}, "
        f"float32 {a['fp32_tflops']}, float64 {a['fp64_tflops']} TFLOP/s; uniform routing.",
    ]) + "\n"


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--context", type=int, default=32768, help="decode: tokens already cached")
    ap.add_argument("--prompt", type=int, default=4096, help="prefill: prompt tokens")
    ap.add_argument("--gpus", type=int, default=8)
    ap.add_argument("--hbm-gb", type=float, default=141.0)
    ap.add_argument("--hbm-tbps", type=float, default=4.8)
    ap.add_argument("--host-gbps", type=float, default=50.0)
    ap.add_argument("--nvlink-gbps", type=float, default=450.0)
    ap.add_argument("--reserve-gb", type=float, default=20.0)
    ap.add_argument("--fp8-tflops", type=float, default=1580.0)
    ap.add_argument("--bf16-tflops", type=float, default=790.0)
    ap.add_argument("--fp32-tflops", type=float, default=50.0)
    ap.add_argument("--fp64-tflops", type=float, default=50.0)
    ap.add_argument("--json", help="also write the numbers here")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    a = parse_args(argv)
    c = costs(Config.preset("deepseek-v3"), a)
    print(report(c), end="")
    if a.json:
        Path(a.json).write_text(json.dumps(c, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
