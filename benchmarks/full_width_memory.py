"""Bounded memory at the FULL DeepSeek-V3 widths (issue 3).

Builds an FP8 checkpoint in the published layout with every width of the deepseek-v3 preset
(hidden 7168, 128 heads, q-lora 1536, kv-lora 512, 256 routed experts of 2048 plus one shared,
dense FFN 18432) but only four layers - one dense, two MoE and the MTP layer - and a small
vocabulary; then, in a fresh process under --max-memory, runs a 1 x T prefill through the
latent cache, refimpl's MTP module teacher-forced over the prefill through its own latent cache
slot (generate.Drafter.extend), and a few speculative decode steps as generate.decode(use_mtp=True)
runs them (an MTP draft, one main forward over [token, draft], verification, the module advanced
through its cache), and reports peak RSS against the budget and against what a full
materialisation of the checkpoint would need.

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
from refimpl import fp8  # noqa: E402
from refimpl.checkpoint import Checkpoint
from refimpl.layout import stored_entries, tensor_plan
from refimpl.writer import random_tensor, write_checkpoint
from refimpl.memory import format_bytes, parse_memory, peak_rss  # noqa: E402
from refimpl.generate import Drafter, verify  # noqa: E402

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
        return a.astype(refimpl.layout.DTYPES[dtypes[name]])

    t0 = time.perf_counter()
    write_checkpoint(out, cfg, entries, produce, shards=shards, store_dtype="bfloat16",
                     fp8_layout=True,
                     progress=lambda k, n: print(f"  wrote shard {k}/{n}", file=sys.stderr, flush=True))
    return time.perf_counter() - t0


def measure(path: str, max_memory: int, dtype: str, n_tokens: int, n_decode: int) -> dict:
    """Runs in a fresh process: load, prefill, MTP, decode; returns the figures."""
    t0 = time.perf_counter()
    model = refimpl.load(path, dtype=dtype, max_memory=max_memory)
    ckpt: Checkpoint = model.weights.source
    t_load = time.perf_counter() - t0
    cfg = model.cfg
    assert model.has_mtp(), "the checkpoint has no complete MTP layer"
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (1, n_tokens))
    # main slots and the MTP module's slot; each speculative step writes at most 2 positions
    cache = model.new_cache(batch=1, max_len=n_tokens + 2 * n_decode + 1, mtp=True)
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
    h0, h = phase("prefill", lambda: model.main_hidden(tokens, cache, trace))
    logits = model.logits(h)
    assert np.isfinite(logits).all()
    out = [int(np.argmax(logits[0, -1]))]
    # the MTP module teacher-forced over the prefill (every input a known token), through its own
    # latent cache slot: what generate.decode(use_mtp=True) does after the prefill
    drafter = Drafter(model, cache)
    mtp_logits = phase("mtp", lambda: drafter.extend(tokens[0].tolist() + out, h0))
    assert mtp_logits[0].shape == (1, n_tokens, cfg.vocab_size) and np.isfinite(mtp_logits[0]).all()
    assert cache.mtp_lengths == [n_tokens]
    drafted = accepted = 0
    for k in range(n_decode):
        # one speculative round of generate.decode(use_mtp=True) with D = 1: draft t_{n+1} from
        # the module, verify [t_n, draft] in one main forward, roll back past a rejected draft,
        # and advance the module over the committed tokens through its latent cache
        def step():
            drafts, dlogits = drafter.draft(1)
            start = cache.length
            x = np.array([[out[-1], *drafts]], dtype=np.int64)
            h0_new, h_new = model.main_hidden(x, cache)
            new = verify(drafts, dlogits, model.logits(h_new)[0], 0.0, None)
            a = len(new) - 1
            cache.length = start + a + 1
            drafter.extend(new, h0_new[:, :a + 1])
            return new, len(drafts), a

        new, d, a = phase(f"decode{k + 1}", step)
        out.extend(new)
        drafted, accepted = drafted + d, accepted + a
    assert cache.mtp_lengths[0] == cache.length == len(drafter.tokens) - 1
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
        "generated": out, "mtp_drafted": drafted, "mtp_accepted": accepted,
        "cache_length": cache.length, "mtp_cache_length": cache.mtp_lengths[0],
        "cpu_count": os.cpu_count(), "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS", "default"),
    }


def report(r: dict) -> str:
    gb = format_bytes
    lines = [f"full-width memory benchmark: {r['dtype']}, 1 x {r['tokens']} prefill, "
             f"MTP module over the prefill (latent cache), {r['decode_steps']} speculative "
             f"decode steps (MTP drafts), {r['cpu_count']} CPUs "
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
             f"| MTP drafts accepted (random weights) | {r['mtp_accepted']} of {r['mtp_drafted']} |",
             f"| latent cache filled: main / MTP module | {r['cache_length']} / "
             f"{r['mtp_cache_length']} positions |",
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
