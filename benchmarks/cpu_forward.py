"""CPU speed of refimpl against transformers, on the same random weights.

One small DeepSeek-V3 config (hidden 1024, 4 layers of which the first is dense, 32 routed
experts in 4 groups keeping 2, top-4, 1 shared expert, 8 heads, q_lora 384, kv_lora 256,
nope 64, rope 32, v 64, vocab 8192, YaRN on). The model is built in transformers with random
well-scaled weights, saved with save_pretrained (float32) and loaded with refimpl.load, so both
run the same numbers. Each row is run once to warm up (refimpl materialises its weights, torch
plans its kernels), then timed in --runs rounds that interleave the rows, so load from other
processes hits them alike; the tables give the median (and the min) of wall time, and the median
of process CPU time:

  prefill   one forward over 1 x --prefill tokens
  decode    --decode greedy steps of one token after a (untimed) prefill of --prompt tokens:
            refimpl through its latent cache (model.new_cache + one-token forwards), transformers
            through its own cache (model(..., cache=..., use_cache=True))

Rows: refimpl float64, refimpl float32, transformers float32 (eager attention, default experts
implementation). Threads: torch.set_num_threads(N) and numpy's BLAS set to N too, through
threadpoolctl when installed, else OpenBLAS's own set_num_threads found in the loaded library;
if neither works, run with OMP_NUM_THREADS=N OPENBLAS_NUM_THREADS=N in the environment.

    python benchmarks/cpu_forward.py [--threads 2] [--runs 3] [--prefill 512] [--decode 64]

On machines that set OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE (to work around old OpenBLAS
builds), those slow a current numpy down; for a benchmark run unset both in that command only:
`env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/cpu_forward.py`. The script prints
the BLAS kernel numpy runs, so the table says what it measured.

On a shared machine whose cores are busy, more threads than free cores make OpenBLAS and OpenMP
spin-wait and the wall times scatter by 5x or more between rounds; there, --threads 1 and the
CPU-time table give a comparison that holds.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import refimpl  # noqa: E402

CONFIG = dict(
    vocab_size=8192, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=512,
    num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=8, num_key_value_heads=8,
    q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
    n_routed_experts=32, n_group=4, topk_group=2, num_experts_per_tok=4, n_shared_experts=1,
    routed_scaling_factor=2.5, norm_topk_prob=True, rms_norm_eps=1e-6,
    max_position_embeddings=4096 * 40, num_nextn_predict_layers=0, tie_word_embeddings=False,
    rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                     "original_max_position_embeddings": 4096, "beta_fast": 32.0,
                     "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
)


# ---- threads and BLAS ------------------------------------------------------------------------

def _openblas_libs():
    """ctypes handles of the OpenBLAS libraries loaded in this process (numpy's)."""
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f if "openblas" in line.lower()
                            and line.split()[-1].startswith("/")})
    except OSError:
        return []
    return [ctypes.CDLL(p) for p in paths]


def _blas_call(lib, suffixes, restype=None, *args):
    for name in suffixes:
        fn = getattr(lib, name, None)
        if fn is not None:
            fn.restype = restype
            return fn(*args)
    return None


def set_threads(n: int) -> str:
    """Same thread count for torch and numpy's BLAS -> a line saying what numpy runs."""
    import torch

    torch.set_num_threads(n)
    try:
        from threadpoolctl import threadpool_info, threadpool_limits

        threadpool_limits(n)
        info = [f"{d.get('internal_api')} {d.get('version')} {d.get('architecture')} "
                f"threads={d.get('num_threads')}" for d in threadpool_info()]
        return "threadpoolctl: " + "; ".join(info)
    except ImportError:
        pass
    lines = []
    for lib in _openblas_libs():
        pre = ("scipy_openblas_", "openblas_")
        _blas_call(lib, [p + "set_num_threads64_" for p in pre] + [p + "set_num_threads" for p in pre],
                   None, ctypes.c_int(n))
        core = _blas_call(lib, [p + "get_corename64_" for p in pre] + [p + "get_corename" for p in pre],
                          ctypes.c_char_p)
        cfg = _blas_call(lib, [p + "get_config64_" for p in pre] + [p + "get_config" for p in pre],
                         ctypes.c_char_p)
        got = _blas_call(lib, [p + "get_num_threads64_" for p in pre] +
                         [p + "get_num_threads" for p in pre], ctypes.c_int)
        lines.append(f"{os.path.basename(lib._name)}: kernel {core and core.decode()}, "
                     f"{cfg and cfg.decode()}, threads={got}")
    if not lines:
        return ("numpy BLAS threads not set (no threadpoolctl, no OpenBLAS found): "
                "set OMP_NUM_THREADS / OPENBLAS_NUM_THREADS")
    return "OpenBLAS (ctypes): " + "; ".join(lines)


# ---- the model ---------------------------------------------------------------------------------

def build_transformers(seed: int):
    """DeepseekV3ForCausalLM float32, eager attention, every weight random and well-scaled."""
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    cfg = DeepseekV3Config(**CONFIG, attn_implementation="eager")
    model = DeepseekV3ForCausalLM(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            if name.endswith("e_score_correction_bias"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.05)
            elif name.endswith("norm.weight"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif name.endswith("embed_tokens.weight"):
                t.copy_(torch.randn(t.shape, generator=g))
            else:  # [..., out, in]: N(0, 1/in)
                t.copy_(torch.randn(t.shape, generator=g) * t.shape[-1] ** -0.5)
    return model.float().eval()


# ---- timing ------------------------------------------------------------------------------------

def clock():
    """(wall, process CPU) now. CPU time is what a busy shared machine cannot inflate (with one
    thread); wall time is what a user sees."""
    return time.perf_counter(), time.process_time()


def since(t0):
    w, c = clock()
    return w - t0[0], c - t0[1]


def refimpl_prefill(model, tokens):
    return lambda: model.forward(tokens)


def refimpl_decode(model, prompt, steps, out):
    def run():
        cache = model.new_cache(batch=1, max_len=prompt.shape[1] + steps)
        logits = model.forward(prompt, cache=cache)
        tok = int(np.argmax(logits[0, -1]))
        t0 = clock()
        toks = [tok]
        for _ in range(steps):
            logits = model.forward(np.array([[tok]]), cache=cache)
            tok = int(np.argmax(logits[0, -1]))
            toks.append(tok)
        out["tokens"], out["time"] = toks, since(t0)
    return run


def hf_prefill(model, tokens):
    import torch

    ids = torch.from_numpy(tokens)

    def run():
        with torch.no_grad():
            return model(input_ids=ids, use_cache=False).logits
    return run


def hf_decode(model, prompt, steps, out):
    import torch

    ids = torch.from_numpy(prompt)

    def run():
        with torch.no_grad():
            res = model(input_ids=ids, use_cache=True)
            cache = res.cache
            tok = int(res.logits[0, -1].argmax())
            t0 = clock()
            toks = [tok]
            for _ in range(steps):
                res = model(input_ids=torch.tensor([[tok]]), cache=cache, use_cache=True)
                cache = res.cache
                tok = int(res.logits[0, -1].argmax())
                toks.append(tok)
        out["tokens"], out["time"] = toks, since(t0)
    return run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--prefill", type=int, default=512, help="prefill length (batch 1)")
    ap.add_argument("--prompt", type=int, default=32, help="prompt before the timed decode")
    ap.add_argument("--decode", type=int, default=64, help="greedy decode steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=("prefill", "decode"), default=None)
    args = ap.parse_args(argv)

    import torch
    import transformers

    blas = set_threads(args.threads)
    print(f"threads {args.threads}; torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"transformers {transformers.__version__}, numpy {np.__version__}")
    print(blas)
    env = {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OMP_NUM_THREADS",
                                       "OPENBLAS_NUM_THREADS") if k in os.environ}
    print(f"environment: {env or 'none of OPENBLAS_CORETYPE, OPENBLAS_L2_SIZE, OMP/OPENBLAS_NUM_THREADS set'}")

    hf = build_transformers(args.seed)
    rng = np.random.default_rng(args.seed)
    tokens = rng.integers(0, CONFIG["vocab_size"], size=(1, args.prefill))
    prompt = tokens[:, :args.prompt]
    names = ("refimpl float64", "refimpl float32", "transformers float32 eager")
    cols = [c for c in ("prefill", "decode") if args.only in (None, c)]
    with tempfile.TemporaryDirectory() as d:
        hf.save_pretrained(d, safe_serialization=True)
        models = {names[0]: refimpl.load(d, dtype="float64"),
                  names[1]: refimpl.load(d, dtype="float32")}
        outs = {n: {} for n in names}
        jobs = {}
        for n in names:
            m = models.get(n)
            jobs[n, "prefill"] = refimpl_prefill(m, tokens) if m else hf_prefill(hf, tokens)
            jobs[n, "decode"] = (refimpl_decode(m, prompt, args.decode, outs[n]) if m
                                 else hf_decode(hf, prompt, args.decode, outs[n]))
        for (n, c), job in jobs.items():  # warm-up
            if c in cols:
                job()
        # Rounds interleave the rows, so load from other processes hits them alike.
        times = {key: [] for key in jobs}
        for r in range(args.runs):
            for (n, c), job in jobs.items():
                if c not in cols:
                    continue
                t0 = clock()
                job()
                times[n, c].append(outs[n]["time"] if c == "decode" else since(t0))
            print(f"  round {r + 1} (wall s / cpu s): " + ", ".join(
                f"{n} {c} {t[-1][0]:.2f}/{t[-1][1]:.2f}" for (n, c), t in times.items() if t),
                flush=True)
        rows = {n: {c: statistics.median(w for w, _ in times[n, c]) for c in cols} for n in names}
        mins = {n: {c: min(w for w, _ in times[n, c]) for c in cols} for n in names}
        cpus = {n: {c: statistics.median(u for _, u in times[n, c]) for c in cols} for n in names}
        if "prefill" in cols:  # the same model: logits agree (a sanity check, not a test)
            want = np.asarray(models[names[0]].forward(tokens))
            got32 = np.asarray(models[names[1]].forward(tokens), dtype=np.float64)
            with torch.no_grad():
                got_hf = hf(input_ids=torch.from_numpy(tokens)).logits.double().numpy()
            for n, got in ((names[1], got32), (names[2], got_hf)):
                err = np.abs(got - want).max() / np.abs(want).max()
                print(f"  {n} vs refimpl float64, prefill logits: rel err {err:.1e}")
        if "decode" in cols:
            ref = outs[names[0]]["tokens"]
            for n in names[1:]:
                toks = outs[n]["tokens"]
                same = next((i for i, (a, b) in enumerate(zip(toks, ref)) if a != b), len(ref))
                print(f"  {n}: greedy tokens equal to refimpl float64's for {same} of {len(ref)}")

    base, bmin = rows[names[2]], mins[names[2]]
    heads = {"prefill": f"prefill 1x{args.prefill}", "decode": f"decode {args.decode} steps"}
    print(f"\nmedian of {args.runs} interleaved rounds after a warm-up (min in brackets), "
          f"seconds; ratio = time / transformers time")
    print("| implementation | " + " | ".join(f"{heads[c]} (s) | ratio" for c in cols) + " |")
    print("|---|" + "---:|---:|" * len(cols))
    for n in names:
        cells = " | ".join(f"{rows[n][c]:.3f} ({mins[n][c]:.3f}) | {rows[n][c] / base[c]:.2f} "
                           f"({mins[n][c] / bmin[c]:.2f})" for c in cols)
        print(f"| {n} | {cells} |")
    print("\nprocess CPU time (all threads, spin-waits included), median, seconds")
    print("| implementation | " + " | ".join(f"{heads[c]} (cpu s) | ratio" for c in cols) + " |")
    print("|---|" + "---:|---:|" * len(cols))
    for n in names:
        cells = " | ".join(f"{cpus[n][c]:.3f} | {cpus[n][c] / cpus[names[2]][c]:.2f}" for c in cols)
        print(f"| {n} | {cells} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
