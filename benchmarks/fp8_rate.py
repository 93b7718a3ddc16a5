"""FP8 to float at memory speed (issue 18, item 1): how fast refimpl turns stored e4m3 weights
with 128x128 block scales into float32 and float64, next to this machine's copy rate for the
same output bytes, and what the whole per-layer path costs (reading the stored bytes, checking,
converting, the weight store) when one MoE layer is run the way a decode step runs it.

    python benchmarks/fp8_rate.py --dir /some/scratch/dir [--json out.json] [--md out.md]

Part 1, conversion alone (arrays in memory), for one full-width routed expert projection
(gate_proj, 2048 x 7168) and one attention projection (q_b_proj, 24576 x 1536):
- `before`: the conversion as refimpl did it until this benchmark (kept below, verbatim);
- `fresh`: fp8.dequantize into a new array (every output page is faulted in by the kernel);
- `reused`: fp8.dequantize into an existing array (out=), as the weight store now does with a
  released weight's memory;
- the copy rate: the same output bytes copied from one float array into an existing one
  (np.copyto: read N bytes, write N bytes), and into a new one (`copy fresh`).
Each figure is the best of --repeats runs, the candidates interleaved so that a busy machine
slows them alike.

Part 2, the per-layer path: a safetensors file in the published layout holding one full-width
MoE layer's attention and --experts routed experts, read through refimpl.checkpoint.Checkpoint
and the weight store under a budget, as --steps decode steps read it (the attention, then 8
experts chosen at random per step).  Run twice: with the file in the page cache, and with it
evicted first (posix_fadvise DONTNEED), which is what a 689 GB model on a small machine sees;
the second run reads ahead (MADV_WILLNEED) as Model does.  Reported: values converted per
second over the whole path, and the disk's sequential read rate for the same file.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from refimpl import fp8  # noqa: E402
from refimpl.checkpoint import Checkpoint  # noqa: E402
from refimpl.writer import write_safetensors  # noqa: E402
from refimpl.config import Config  # noqa: E402
from refimpl.memory import format_bytes, peak_rss  # noqa: E402
from refimpl.weights import WeightStore  # noqa: E402

SHAPES = {"expert gate_proj 2048x7168": (2048, 7168), "attention q_b_proj 24576x1536": (24576, 1536)}
LAYER = 3  # a MoE layer of the deepseek-v3 preset


def dequantize_before(q, scale_inv, block=128, dtype=np.float64):
    """refimpl's fp8.dequantize before the lookup-table rewrite (verbatim, for comparison)."""
    out, inp = q.shape
    s = np.asarray(scale_inv, dtype=dtype)
    w = np.empty((out, inp), dtype=dtype)
    table = fp8._E4M3_VALUES
    for i in range(s.shape[0]):
        rows = slice(i * block, min((i + 1) * block, out))
        s_row = np.repeat(s[i], block)[:inp]
        vals = table.astype(dtype)[np.asarray(q[rows]).view(np.uint8)]
        np.multiply(vals, s_row, out=w[rows])
    return w


def random_fp8(shape, seed):
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape, dtype=np.float32) * np.float32(shape[1] ** -0.5)
    return fp8.quantize(w)


def best_of(cands: dict, repeats: int) -> dict:
    """{name: fn} -> {name: best seconds}, the candidates interleaved."""
    best = {k: float("inf") for k in cands}
    for _ in range(repeats):
        for k, f in cands.items():
            t = time.perf_counter()
            f()
            best[k] = min(best[k], time.perf_counter() - t)
    return best


def conversion(repeats: int) -> dict:
    res = {}
    for label, shape in SHAPES.items():
        q, s = random_fp8(shape, 0)
        n = q.size
        for dtype in (np.float32, np.float64):
            dt = np.dtype(dtype)
            assert np.array_equal(fp8.dequantize(q, s, dtype=dt).view(np.uint8),
                                  dequantize_before(q, s, dtype=dt).view(np.uint8))
            src = np.ones(shape, dt)
            dst, out = np.zeros(shape, dt), np.zeros(shape, dt)
            t = best_of({
                "copy": lambda: np.copyto(dst, src),
                "copy fresh": lambda: src.copy(),
                "before": lambda: dequantize_before(q, s, dtype=dt),
                "fresh": lambda: fp8.dequantize(q, s, dtype=dt),
                "reused": lambda: fp8.dequantize(q, s, dtype=dt, out=out),
            }, repeats)
            res[f"{label} {dt.name}"] = {
                "values": n, "output_bytes": n * dt.itemsize, "seconds": t,
                "values_per_s": {k: n / v for k, v in t.items()},
                "of_copy": {"before": t["copy fresh"] / t["before"],
                            "fresh": t["copy fresh"] / t["fresh"],
                            "reused": t["copy"] / t["reused"]}}
    return res


# ---- part 2: the per-layer path -------------------------------------------------------------

def layer_tensors(cfg: Config, experts: int) -> dict:
    """name -> shape of one MoE layer's FP8 projections: the attention and `experts` experts."""
    from refimpl.layout import attention_shapes, ffn_shapes

    shapes = {f"model.layers.{LAYER}.self_attn.{k}": v for k, v in attention_shapes(cfg).items()
              if k.endswith("proj.weight") or k.endswith("mqa.weight")}
    for e in range(experts):
        shapes.update({f"model.layers.{LAYER}.mlp.experts.{e}.{k}": v
                       for k, v in ffn_shapes(cfg.hidden_size, cfg.moe_intermediate_size).items()})
    return shapes


def build(path: str, cfg: Config, experts: int) -> None:
    """config.json and one safetensors file of the layer's FP8 weights with their scales (a few
    distinct random matrices per shape, so that it is written in seconds)."""
    os.makedirs(path, exist_ok=True)
    cfg.to_json(os.path.join(path, "config.json"))
    pool, tensors = {}, {}
    for k, (name, shape) in enumerate(layer_tensors(cfg, experts).items()):
        key = (shape, k % 3)
        if key not in pool:
            pool[key] = random_fp8(shape, k)
        tensors[name], tensors[name + "_scale_inv"] = pool[key]
    write_safetensors(os.path.join(path, "model.safetensors"), tensors)


def evict(path: str) -> None:
    """Drop a file's clean pages from the page cache (no privileges needed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def disk_rate(path: str) -> float:
    """Sequential read rate of `path` after evicting it (bytes per second)."""
    evict(path)
    n, t = 0, time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(16 << 20)
        while (k := f.readinto(buf)):
            n += k
    return n / (time.perf_counter() - t)


def run_path(path: str, cfg: Config, dtype, experts: int, steps: int, budget: int, cold: bool,
             read_ahead: bool) -> dict:
    """`steps` decode-like passes over the layer through a fresh Checkpoint and weight store."""
    if cold:
        evict(os.path.join(path, "model.safetensors"))
    ckpt = Checkpoint(path)
    store = WeightStore(ckpt, np, dtype, max_bytes=budget)
    attn = [n for n in layer_tensors(cfg, 0)]
    rng = np.random.default_rng(1)
    values = 0
    t = time.perf_counter()
    for _ in range(steps):
        chosen = rng.choice(experts, size=min(8, experts), replace=False)
        names = attn + [f"model.layers.{LAYER}.mlp.experts.{e}.{k}.weight" for e in chosen
                        for k in ("gate_proj", "up_proj", "down_proj")]
        if read_ahead:
            store.prefetch(names)
        for name in names:
            values += store.get(name).size
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "values": values, "values_per_s": values / seconds,
            "stored_bytes_read": store.read_bytes, "materialised": store.materialised,
            "reused": store.reused, "peak_rss": peak_rss()}


def per_layer_path(directory: str, experts: int, steps: int, budget: int) -> dict:
    cfg = Config.preset("deepseek-v3")
    path = os.path.join(directory, "fp8_layer")
    if not os.path.exists(os.path.join(path, "model.safetensors")):
        build(path, cfg, experts)
    res = {"file_bytes": os.path.getsize(os.path.join(path, "model.safetensors")),
           "disk_read_bytes_per_s": disk_rate(os.path.join(path, "model.safetensors")),
           "experts": experts, "steps": steps, "budget": budget, "runs": {}}
    for dtype in (np.float32, np.float64):
        name = np.dtype(dtype).name
        run_path(path, cfg, dtype, experts, 1, budget, cold=False, read_ahead=False)  # warm up
        res["runs"][f"{name} page cache"] = run_path(path, cfg, dtype, experts, steps, budget,
                                                     cold=False, read_ahead=False)
        res["runs"][f"{name} from disk"] = run_path(path, cfg, dtype, experts, steps, budget,
                                                    cold=True, read_ahead=False)
        res["runs"][f"{name} from disk, read ahead"] = run_path(path, cfg, dtype, experts, steps,
                                                                budget, cold=True, read_ahead=True)
    return res


def report(r: dict) -> str:
    lines = [f"FP8 to float, {r['date']}, {r['cpu_count']} CPUs, load average "
             f"{r['load_average'][0]:.1f} / {r['load_average'][1]:.1f} / {r['load_average'][2]:.1f} "
             f"(1 / 5 / 15 min) at the start, {r['load_end'][0]:.1f} at the end",
             "", "Conversion alone (best of runs; million values per second, and the fraction of "
             "the copy rate for the same output bytes):", "",
             "| tensor, dtype | copy | before | fresh array | reused array | before / fresh / reused of copy |",
             "|---|---|---|---|---|---|"]
    for k, v in r["conversion"].items():
        vs, oc = v["values_per_s"], v["of_copy"]
        lines.append(f"| {k} | {vs['copy'] / 1e6:.0f} (fresh {vs['copy fresh'] / 1e6:.0f}) | "
                     f"{vs['before'] / 1e6:.0f} | {vs['fresh'] / 1e6:.0f} | {vs['reused'] / 1e6:.0f} | "
                     f"{oc['before']:.2f} / {oc['fresh']:.2f} / {oc['reused']:.2f} |")
    p = r.get("path")
    if p:
        lines += ["", f"The per-layer path: one MoE layer's attention and 8 of {p['experts']} "
                      f"experts per step, {p['steps']} steps, weight budget "
                      f"{format_bytes(p['budget'])}; file {format_bytes(p['file_bytes'])}, disk "
                      f"read {p['disk_read_bytes_per_s'] / 1e6:.0f} MB/s sequential:", "",
                  "| run | seconds | million values/s | stored bytes read | tensors (reused memory) | peak RSS |",
                  "|---|---|---|---|---|---|"]
        for k, v in p["runs"].items():
            lines.append(f"| {k} | {v['seconds']:.2f} | {v['values_per_s'] / 1e6:.0f} | "
                         f"{format_bytes(v['stored_bytes_read'])} | {v['materialised']} "
                         f"({v['reused']}) | {format_bytes(v['peak_rss'])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", help="scratch directory for part 2's layer file (about 1 GB with 16 "
                                  "experts); without it only part 1 runs")
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--budget", default="2GB", help="weight budget of the store in part 2")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json")
    ap.add_argument("--md")
    args = ap.parse_args(argv)
    from refimpl.memory import parse_memory

    r = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu_count": os.cpu_count(),
         "load_average": os.getloadavg(), "numpy": np.__version__,
         "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS", "default"),
         "conversion": conversion(args.repeats)}
    if args.dir:
        r["path"] = per_layer_path(args.dir, args.experts, args.steps, parse_memory(args.budget))
    r["load_end"] = os.getloadavg()
    text = report(r)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
