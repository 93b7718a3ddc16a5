"""Pipeline stages (issue 18, item 5): a two-stage pipeline with microbatches against one
process, and a plan table for the 671B model from measured per-layer costs.

    python benchmarks/pipeline.py throughput [--batch 8 --seq 64 --microbatches 4]
    python benchmarks/pipeline.py layer-cost [--json out.json]
    python benchmarks/pipeline.py plan --layer-cost out.json

throughput: batched prefill of --batch sequences through a model of --layers layers at --hidden
width, (a) in one process with 1 BLAS thread and with 2, (b) as two Ray stage actors of 1 BLAS
thread each, the batch split into --microbatches parts that flow through the stages together.
Prints tokens per second and the pipeline's speedup over each single-process run.  Needs the
cluster extra (Ray).

layer-cost: one full-width DeepSeek-V3 MoE decoder layer (hidden 7168, 128 heads, 256 experts of
2048, one shared) decoding one token against a 1024-token latent cache in float32, its
weights resident (the attention, the gate, the shared expert and the 8 routed experts the token
picks are materialised on a first step and timed on the next ones), and the conversion of its
active weights from bf16 and from FP8 to float32 - the per-layer costs of a stage that keeps
its layers resident.

plan: the table of docs/full-model.md section 5 from those costs: how many hosts of 512 GB hold
the model in float32 or bf16 (each stage its share of layers, resident), and the time per
decode token (the stages run one after another for one token: the sum of the layer costs, plus
the conversion of bf16 weights, plus one hop per stage); and 8 H200s with FP8 resident from
the datasheet and refimpl's byte counts (no GPU measured here).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import refimpl  # noqa: E402
from refimpl import fp8, stages  # noqa: E402
from refimpl.layout import layer_plan, tensor_plan  # noqa: E402
from refimpl.writer import random_tensor  # noqa: E402


def bench_config(layers: int, hidden: int) -> refimpl.Config:
    """A DeepSeek-V3-shaped model small enough for this machine: `layers` layers (the first
    dense), 16 experts of hidden/2 in 4 groups."""
    return refimpl.Config.preset("tiny").replace(
        hidden_size=hidden, intermediate_size=2 * hidden, moe_intermediate_size=hidden // 2,
        num_hidden_layers=layers, first_k_dense_replace=1, n_routed_experts=16, n_group=4,
        topk_group=2, num_experts_per_tok=4, num_attention_heads=8, q_lora_rank=hidden // 2,
        kv_lora_rank=hidden // 4, vocab_size=4096, num_nextn_predict_layers=0)


def _time(fn, repeats=3):
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def single(args, threads: int) -> float:
    """Seconds for the batched prefill in a fresh process with `threads` BLAS threads."""
    import subprocess

    env = dict(os.environ, OPENBLAS_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    cmd = [sys.executable, __file__, "_single", "--layers", str(args.layers), "--hidden",
           str(args.hidden), "--batch", str(args.batch), "--seq", str(args.seq)]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout
    return float(out.strip().splitlines()[-1])


def _tokens(cfg, args):
    return np.random.default_rng(0).integers(0, cfg.vocab_size, (args.batch, args.seq))


def _weights(cfg):
    return {n: random_tensor(n, s, 0) for n, s in tensor_plan(cfg, mtp=False).items()}


def cmd_single(args) -> int:
    cfg = bench_config(args.layers, args.hidden)
    model = refimpl.Model.from_arrays(cfg, _weights(cfg))
    tokens = _tokens(cfg, args)
    model.forward(tokens[:1, :8])  # materialise the weights
    print(_time(lambda: model.forward(tokens)))
    return 0


def cmd_throughput(args) -> int:
    from refimpl.cluster import RayStages

    cfg = bench_config(args.layers, args.hidden)
    tokens = _tokens(cfg, args)
    n_tok = tokens.size
    res = {"date": time.strftime("%Y-%m-%d %H:%M"), "load_average": os.getloadavg(),
           "config": {"layers": args.layers, "hidden": args.hidden}, "batch": args.batch,
           "seq": args.seq, "microbatches": args.microbatches}
    res["one_process_1_thread_s"] = single(args, 1)
    res["one_process_2_threads_s"] = single(args, 2)
    os.environ["OPENBLAS_NUM_THREADS"] = os.environ["OMP_NUM_THREADS"] = "1"  # each stage: 1
    ex = RayStages()
    w = _weights(cfg)
    plan = stages.plan_stages(cfg, 2, "float64")
    pipe = stages.Pipeline.start(stages.source_of(w, cfg), plan, ex)
    pipe.forward_microbatches(tokens[:2, :8], 2)  # warm
    res["pipeline_s"] = _time(lambda: pipe.forward_microbatches(tokens, args.microbatches))
    res["pipeline_1_microbatch_s"] = _time(lambda: pipe.forward_microbatches(tokens, 1))
    ex.shutdown()
    res["load_average_end"] = os.getloadavg()
    for k in [k for k in res if k.endswith("_s")]:
        res[k.replace("_s", "_tokens_per_s")] = n_tok / res[k]
    res["speedup_vs_1_thread"] = res["one_process_1_thread_s"] / res["pipeline_s"]
    res["speedup_vs_2_threads"] = res["one_process_2_threads_s"] / res["pipeline_s"]
    print(json.dumps(res, indent=1))
    return 0


# ---- per-layer costs at full width -------------------------------------------------------------

class _LazyLayer:
    """One full-width MoE layer's tensors, made when first asked (random, well scaled)."""

    def __init__(self, cfg, layer):
        self.config, self.plan = cfg, layer_plan(cfg, layer)

    def names(self):
        return list(self.plan)

    def __contains__(self, name):
        return name in self.plan

    def shape(self, name):
        return self.plan[name]

    def weight(self, name, dtype=np.float64, out=None):
        shape = self.plan[name]
        rng = np.random.default_rng(abs(hash(name)) % 2**32)
        if len(shape) == 1:
            return rng.uniform(0.5, 1.5, shape).astype(dtype)
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(shape[1] ** -0.5)).astype(dtype)


def cmd_layer_cost(args) -> int:
    from refimpl.layer import AttentionContext, LatentCache, decoder_layer
    from refimpl.weights import WeightStore
    from refimpl import mla, rope

    cfg = refimpl.Config.preset("deepseek-v3")
    layer = cfg.first_k_dense_replace  # a MoE layer
    store = WeightStore(_LazyLayer(cfg, layer), np, np.float32)
    T = args.context
    cache_c = [None] * cfg.num_hidden_layers
    cache_k = [None] * cfg.num_hidden_layers
    cache_c[layer] = np.random.default_rng(1).standard_normal((1, T + 1, cfg.kv_lora_rank)).astype(np.float32)
    cache_k[layer] = np.random.default_rng(2).standard_normal((1, T + 1, cfg.qk_rope_head_dim)).astype(np.float32)
    cache = LatentCache(cache_c, cache_k, length=T)
    inv = rope.inv_freq(cfg)
    cos, sin = rope.cos_sin(np.array([T]), inv, rope.cos_sin_factor(cfg))
    step = AttentionContext(cos, sin, mla.causal_mask(np.array([T]), np.arange(T + 1), np), T,
                rope.softmax_scale(cfg), "absorbed", cache)
    h = np.random.default_rng(3).standard_normal((1, 1, cfg.hidden_size)).astype(np.float32)
    decoder_layer(h, store, cfg, layer, step)  # materialises what this token uses
    resident = store.resident_bytes
    t_layer = _time(lambda: decoder_layer(h, store, cfg, layer, step), args.repeats)
    active = sum(a.size for a in store._resident.values())
    # converting the active weights of one layer per step: bf16 -> float32, and FP8 -> float32
    w = next(a for n, a in store._resident.items() if n.endswith("experts.0.gate_proj.weight")
             or ".experts." in n)
    import ml_dtypes
    wb = w.astype(ml_dtypes.bfloat16)
    out = np.empty(w.shape, np.float32)
    t_bf16 = _time(lambda: np.copyto(out, wb, casting="unsafe"), args.repeats) / w.size
    q, s = fp8.quantize(w)
    t_fp8 = _time(lambda: fp8.dequantize(q, s, dtype=np.float32, out=out), args.repeats) / w.size
    res = {"date": time.strftime("%Y-%m-%d %H:%M"), "load_average": os.getloadavg(),
           "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS", "default"),
           "context": T, "layer_decode_s": t_layer, "active_values": active,
           "resident_bytes": resident, "bf16_to_f32_s_per_value": t_bf16,
           "fp8_to_f32_s_per_value": t_fp8}
    print(json.dumps(res, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)
    return 0


def cmd_plan(args) -> int:
    """The 671B plan table (docs/full-model.md section 5)."""
    from refimpl.accounting import summary

    with open(args.layer_cost) as f:
        lc = json.load(f)
    cfg = refimpl.Config.preset("deepseek-v3")
    info = summary(cfg)
    total = info["total_params_with_mtp"]
    active = info["active_params_per_token_without_embedding"]
    L = cfg.num_hidden_layers
    host = args.host_memory * 1e9
    rows = []
    import ml_dtypes

    usable = host - args.reserve * 1e9
    for dtype, size in (("float32", 4), ("bf16 (float32 compute)", 2)):
        store = np.float32 if size == 4 else ml_dtypes.bfloat16
        n_hosts = math.ceil(total * size / usable)
        while max(p.nbytes for p in stages.plan_stages(cfg, n_hosts, store)) > usable:
            n_hosts += 1  # contiguous layers of 45 GB (float32) do not split evenly
        plan = stages.plan_stages(cfg, n_hosts, store)
        per_layer = lc["layer_decode_s"]
        convert = active * lc["bf16_to_f32_s_per_value"] if size == 2 else 0.0
        hop = n_hosts * args.hop_ms / 1e3
        tok = L * per_layer + convert + hop
        biggest = max(p.nbytes for p in plan)
        rows.append((f"{n_hosts} CPU hosts of {args.host_memory:.0f} GB, {dtype} resident",
                     f"{biggest / 1e9:.0f} GB", f"{tok:.1f} s",
                     f"{L} x {per_layer:.3f} s layers" + (f" + {convert:.1f} s bf16->f32" if convert else "")
                     + f" + {n_hosts} hops"))
    # 8 x H200, FP8 resident (673 GB / 8 = 84 GB each), converted to float32 per layer per step:
    # each active value read as 1 byte, written and read as 4 (dequantised, then multiplied)
    hbm = args.hbm_tbps * 1e12
    t_gpu = active * (1 + 4 + 4) / hbm + 8 * args.nvlink_hop_us / 1e6
    rows.append(("8 x H200, FP8 resident, float32 per layer per step", "84 GB",
                 f"{t_gpu * 1e3:.0f} ms", f"{active / 1e9:.1f} B active values x 9 bytes at "
                 f"{args.hbm_tbps} TB/s (estimate: no GPU measured)"))
    print("| cluster | largest stage | per decode token | from |\n|---|---|---|---|")
    for r in rows:
        print("| " + " | ".join(r) + " |")
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name in ("throughput", "_single"):
        p = sub.add_parser(name)
        p.add_argument("--layers", type=int, default=4)
        p.add_argument("--hidden", type=int, default=1024)
        p.add_argument("--batch", type=int, default=8)
        p.add_argument("--seq", type=int, default=64)
        p.add_argument("--microbatches", type=int, default=4)
    p = sub.add_parser("layer-cost")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json")
    p = sub.add_parser("plan")
    p.add_argument("--layer-cost", required=True)
    p.add_argument("--host-memory", type=float, default=512)
    p.add_argument("--reserve", type=float, default=48, help="GB per host not for weights")
    p.add_argument("--hop-ms", type=float, default=0.2)
    p.add_argument("--hbm-tbps", type=float, default=4.3)
    p.add_argument("--nvlink-hop-us", type=float, default=10)
    args = ap.parse_args(argv)
    return {"throughput": cmd_throughput, "_single": cmd_single, "layer-cost": cmd_layer_cost,
            "plan": cmd_plan}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
