"""Bounded memory at the FULL DeepSeek-V3 widths (issue 3).

Builds an FP8 checkpoint in the published layout with every width of the deepseek-v3 preset
(hidden 7168, 128 heads, q-lora 1536, kv-lora 512, 256 routed experts of 2048 plus one shared,
dense FFN 18432) but only four layers - one dense, two MoE and the MTP layer - and a small
vocabulary; then, in a fresh process under --max-memory, runs a 1 x T prefill through the
latent cache, the MTP layer over the prefill, and a few greedy decode steps, and reports peak RSS
against the budget and against what a full materialisation of the checkpoint would need.

    python benchmarks/full_width_memory.py --dir /some/scratch/dir [--max-memory 6GB]

The checkpoint takes about 34 GB of disk (three MoE layers of 256 experts in FP8).  To write it
in minutes, FP8 tensors of one shape come from a pool of a few quantised random matrices (chosen
by a hash of the name); every byte is still on disk and read back, and every expert is a
separate tensor.  Everything else is refimpl's own random_tensor.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
import zlib

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import refimpl  # noqa: E402
from refimpl import fp8, mla, rope  # noqa: E402
from refimpl.checkpoint import (Checkpoint, random_tensor, stored_entries, tensor_plan,  # noqa: E402
                                write_checkpoint)
from refimpl.memory import format_bytes, parse_memory, peak_rss  # noqa: E402
from refimpl.norm import rms_norm  # noqa: E402
from refimpl.ops import linear  # noqa: E402

POOL = 4  # distinct quantised matrices per FP8 shape


def bench_config(vocab: int) -> refimpl.Config:
    """deepseek-v3 widths; layer 0 dense, layers 1-2 MoE, layer 3 the MTP module."""
    return refimpl.Config.preset("deepseek-v3").replace(
        num_hidden_layers=3, first_k_dense_replace=1, num_nextn_predict_layers=1, vocab_size=vocab)


def build(out: str, cfg: refimpl.Config, shards: int) -> float:
    entries = stored_entries(tensor_plan(cfg), fp8=True, store_dtype="bfloat16")
    dtypes = {n: d for n, d, _ in entries}
    shapes = {n: s for n, _, s in entries}
    pool: dict = {}

    def pooled(name):
        base = name[:-len("_scale_inv")] if name.endswith("_scale_inv") else name
        shape = shapes[base]
        key = (shape, zlib.crc32(base.encode()) % POOL)
        if key not in pool:
            rng = np.random.default_rng(list(key[0]) + [key[1]])
            w = rng.standard_normal(shape, dtype=np.float32) * np.float32(shape[1] ** -0.5)
            pool[key] = fp8.quantize(w)
        q, s = pool[key]
        return s if name.endswith("_scale_inv") else q

    def produce(name):
        if dtypes[name] in ("F8_E4M3",) or name.endswith("_scale_inv"):
            return pooled(name)
        a = random_tensor(name, shapes[name], seed=0)
        return a.astype(refimpl.checkpoint.DTYPES[dtypes[name]])

    t0 = time.perf_counter()
    write_checkpoint(out, cfg, entries, produce, shards=shards, store_dtype="bfloat16",
                     fp8_layout=True,
                     progress=lambda k, n: print(f"  wrote shard {k}/{n}", file=sys.stderr, flush=True))
    return time.perf_counter() - t0


def mtp_over_prefill(model, tokens, h_final):
    """The MTP module (SPEC.md section 6) over the prefill, to execute its full-width tensors:
    h' = eh_proj [enorm(Emb(t_{i+1})) ; hnorm(h_i)], one decoder layer, shared_head.  (A stand-in
    until the model's own MTP path lands; only its memory and time are measured here.)"""
    cfg, w = model.cfg, model.weights
    n = cfg.num_hidden_layers
    p = f"model.layers.{n}."
    emb = w.rows("model.embed_tokens.weight", tokens[:, 1:])  # [1, T-1, d]
    x = np.concatenate([rms_norm(emb, w.get(p + "enorm.weight"), cfg.rms_norm_eps),
                        rms_norm(h_final[:, :-1], w.get(p + "hnorm.weight"), cfg.rms_norm_eps)], axis=-1)
    h = linear(x, w.get(p + "eh_proj.weight"))  # eq. (21), embedding first: [1, T-1, d]
    positions = np.arange(h.shape[1])
    cos, sin = rope.cos_sin(positions, model.inv_freq, model.cos_sin_factor, np)
    mask = mla.causal_mask(positions, positions, np)
    h = model.decoder_layer(n, h, cos, sin, mask, 0, None, None)  # eq. (22)
    h = rms_norm(h, w.get(p + "shared_head.norm.weight"), cfg.rms_norm_eps)
    return w.linear(h, p + "shared_head.head.weight")  # eq. (23), logits [1, T-1, vocab]


def measure(path: str, max_memory: int, dtype: str, n_tokens: int, n_decode: int) -> dict:
    """Runs in a fresh process: load, prefill, MTP, decode; returns the figures."""
    t0 = time.perf_counter()
    model = refimpl.load(path, dtype=dtype, max_memory=max_memory)
    ckpt: Checkpoint = model.weights.source
    t_load = time.perf_counter() - t0
    cfg = model.cfg
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (1, n_tokens))
    cache = model.new_cache(batch=1, max_len=n_tokens + n_decode)
    store = model.weights
    phases = {}

    def phase(name, fn):
        r0, b0, m0 = store.read_bytes, store.materialised_bytes, store.materialised
        t = time.perf_counter()
        out = fn()
        phases[name] = {"seconds": time.perf_counter() - t, "stored_bytes_read": store.read_bytes - r0,
                        "bytes_materialised": store.materialised_bytes - b0,
                        "tensors_materialised": store.materialised - m0, "peak_rss": peak_rss()}
        return out

    trace = {}
    h = phase("prefill", lambda: model.hidden_states(tokens, cache, trace))
    logits = model.logits(h)
    assert np.isfinite(logits).all()
    mtp_logits = phase("mtp", lambda: mtp_over_prefill(model, tokens, h))
    assert np.isfinite(mtp_logits).all()
    nxt = int(np.argmax(logits[0, -1]))
    for k in range(n_decode):
        step = phase(f"decode{k + 1}", lambda: model.forward(np.array([[nxt]]), cache=cache))
        nxt = int(np.argmax(step[0, -1]))
    itemsize = np.dtype(dtype).itemsize
    params = sum(math.prod(ckpt.shape(n)) for n in ckpt.names() if not n.endswith("_scale_inv"))
    experts_used = {layer: len(set(trace[f"layers.{layer}.topk_idx"].reshape(-1).tolist()))
                    for layer in range(cfg.num_hidden_layers) if cfg.is_moe_layer(layer)}
    return {
        "dtype": dtype, "tokens": n_tokens, "decode_steps": n_decode,
        "max_memory": max_memory, "weight_budget": store.max_bytes,
        "peak_rss": peak_rss(), "store_peak_bytes": store.peak_bytes,
        "full_materialisation_bytes": params * itemsize, "checkpoint_params": params,
        "checkpoint_bytes_on_disk": sum(os.path.getsize(os.path.join(path, f))
                                        for f in os.listdir(path) if f.endswith(".safetensors")),
        "load_seconds": t_load, "phases": phases, "experts_routed_in_prefill": experts_used,
        "layer_types_executed": ["dense (layer 0)", "moe (layers 1, 2)", "mtp (layer 3)"],
        "cpu_count": os.cpu_count(), "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS", "default"),
    }


def report(r: dict) -> str:
    gb = format_bytes
    lines = [f"full-width memory benchmark: {r['dtype']}, 1 x {r['tokens']} prefill, "
             f"MTP over the prefill, {r['decode_steps']} decode steps, {r['cpu_count']} CPUs "
             f"(BLAS threads: {r['blas_threads']})",
             "",
             "| figure | value |", "|---|---|",
             f"| --max-memory | {gb(r['max_memory'])} |",
             f"| weight budget (after baseline and reserve) | {gb(r['weight_budget'])} |",
             f"| **peak RSS** | **{gb(r['peak_rss'])}** "
             f"({100 * r['peak_rss'] / r['max_memory']:.0f}% of the budget) |",
             f"| most weight bytes held at once | {gb(r['store_peak_bytes'])} |",
             f"| full materialisation in {r['dtype']} | {gb(r['full_materialisation_bytes'])} "
             f"({r['checkpoint_params']:,} parameters) |",
             f"| checkpoint on disk (FP8 layout) | {gb(r['checkpoint_bytes_on_disk'])} |",
             f"| load (headers only) | {r['load_seconds']:.2f} s |",
             f"| experts routed in the prefill, per MoE layer | {r['experts_routed_in_prefill']} |",
             "", "| phase | seconds | stored bytes read | bytes materialised | tensors | peak RSS so far |",
             "|---|---|---|---|---|---|"]
    for name, p in r["phases"].items():
        lines.append(f"| {name} | {p['seconds']:.1f} | {gb(p['stored_bytes_read'])} | "
                     f"{gb(p['bytes_materialised'])} | {p['tensors_materialised']} | {gb(p['peak_rss'])} |")
    ok = r["peak_rss"] < r["max_memory"]
    lines += ["", f"peak RSS {'UNDER' if ok else 'OVER'} the budget; every full-width layer type "
                  f"executed: {', '.join(r['layer_types_executed'])}"]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", required=True, help="scratch directory for the ~34 GB checkpoint")
    ap.add_argument("--max-memory", default="6GB")
    ap.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--decode", type=int, default=3)
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None,
                    help="BLAS threads for the measuring process (default: the library's own)")
    ap.add_argument("--json", help="also write the figures to this file")
    ap.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    path = os.path.join(args.dir, "ckpt")
    budget = parse_memory(args.max_memory)
    if args.measure:  # the child: nothing else in this process
        print(json.dumps(measure(path, budget, args.dtype, args.tokens, args.decode)))
        return 0
    if not os.path.exists(os.path.join(path, "model.safetensors.index.json")):
        print(f"building the full-width checkpoint in {path} ...", file=sys.stderr)
        took = build(path, bench_config(args.vocab), args.shards)
        print(f"  built in {took:.0f} s", file=sys.stderr)
    cmd = [sys.executable, os.path.abspath(__file__), "--measure", "--dir", args.dir,
           "--max-memory", args.max_memory, "--dtype", args.dtype, "--tokens", str(args.tokens),
           "--decode", str(args.decode)]
    env = dict(os.environ)
    if args.threads:
        env.update(OPENBLAS_NUM_THREADS=str(args.threads), OMP_NUM_THREADS=str(args.threads),
                   MKL_NUM_THREADS=str(args.threads))
    child = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if child.returncode:
        print(child.stderr, file=sys.stderr)
        return child.returncode
    r = json.loads(child.stdout.strip().splitlines()[-1])
    print(report(r))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)
    return 0 if r["peak_rss"] < r["max_memory"] else 1


if __name__ == "__main__":
    sys.exit(main())
