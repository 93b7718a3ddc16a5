"""oracles search from scratch (no fixed suite) against the mutant catalogue, the clean reference
and real engines (issue 23; docs/conformance.md section 12): per candidate, the examples judged
until the first divergence, the shrink calls, the time, the first failing output and the shrunk
case (the axes where it differs from the baseline example of its kind), checked again against
the candidate and against the clean reference.

    python benchmarks/search_catalogue.py --rows mutants [--max-examples 200] [--seed 0]
    python benchmarks/search_catalogue.py --rows engines
    python benchmarks/search_catalogue.py --only rsf_twice,rms_norm_eps_ignored

Writes benchmarks/results/search_<rows>.jsonl (one line per candidate, appended as each ends)
and prints the markdown table of docs/conformance.md section 12. Scratch cases go to $TMPDIR
(a tmpfs there saves the per-example fsyncs of the golden writer).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from oracles.authoring import search as S  # noqa: E402
from oracles.authoring.mutants import MUTANTS  # noqa: E402
from oracles.checking.candidates import load_adapter, make_candidate  # noqa: E402
from oracles.checking.check import run_check  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
REFERENCE = "oracles.adapters:refimpl_float32"


def mutant_rows():
    rows = [(REFERENCE, "adapter", REFERENCE, {}, "float32")]
    rows += [(n, "adapter", f"oracles.mutants:{n}", {}, "float32")
             for n, m in MUTANTS.items() if not m.allowed]
    return rows


def engine_rows():
    """Real engines, unpatched and with the issue's public bug classes patched into transformers
    (benchmarks/search_engines.py). Each further row of an engine pins away what the row before
    it found (docs/conformance.md section 12): transformers reads mscale 0.0 as "no mscale";
    MLX-LM does not renormalise a single expert's weight (top_k 1) and masks dropped groups with
    0.0 (biased scores below zero). MLX-LM loads an FP8 checkpoint in bf16 (docs/engines.md), so
    its rows draw no FP8 layout."""
    no_fp8 = {"fp8": False}
    return [
        ("transformers", "engine", "transformers", {}, "float32"),
        ("transformers; mscale 1.0", "engine", "transformers", {"mscale": 1.0}, "float32"),
        ("transformers + group_score_top_k_over_m", "adapter",
         "benchmarks.search_engines:hf_group_score_top_k_over_m", {"mscale": 1.0}, "float32"),
        ("transformers + yarn_factor_from_ratio", "adapter",
         "benchmarks.search_engines:hf_yarn_factor_from_ratio", {"mscale": 1.0}, "float32"),
        ("transformers + rms_norm_eps_ignored", "adapter",
         "benchmarks.search_engines:hf_rms_norm_eps_ignored", {"mscale": 1.0}, "float32"),
        ("mlx", "engine", "mlx", no_fp8, "float32"),
        ("mlx; top_k 2", "engine", "mlx", {**no_fp8, "num_experts_per_tok": 2}, "float32"),
        ("mlx; top_k 2; small bias", "engine", "mlx",
         {**no_fp8, "num_experts_per_tok": 2, "bias": "small"}, "float32"),
        # bf16: near-tie draws are rejected, not forgiven
        ("transformers bf16; mscale 1.0", "engine", "transformers dtype=bfloat16",
         {"mscale": 1.0}, "bf16"),
        ("mlx bf16 (float32 experts); top_k 2; small bias", "engine",
         "mlx dtype=bfloat16 expert_dtype=float32",
         {**no_fp8, "num_experts_per_tok": 2, "bias": "small"}, "bf16_f32_experts"),
    ]


def candidate(how, spec):
    if how == "adapter":
        return load_adapter(spec), f"--adapter {spec}"
    from oracles import engines

    name, *options = spec.split()
    built = {}

    def factory():
        built["adapter"], built["info"] = engines.load_engine(name, engines.parse_options(options))
        return built["adapter"]
    cand = make_candidate(factory, f"--engine {name}")
    cand.label = engines.label(built["info"])
    return cand, f"--engine {name}" + "".join(f" --engine-option {o}" for o in options)


def run_row(name, how, spec, pins, profile, max_examples, seed):
    cand, repro = candidate(how, spec)
    out = tempfile.mkdtemp(prefix="search-bench-")
    settings = S.Settings(profile=profile, max_examples=max_examples, seed=seed, database=None,
                          pins=pins)
    t, c = time.perf_counter(), time.process_time()
    rep = S.search(cand, out, settings, check=run_check, repro=repro)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    row = {"name": name, "candidate": rep["candidate"], "profile": profile, "pins": pins,
           "max_examples": max_examples, "seed": seed, "wall_s": round(wall, 1),
           "cpu_s": round(cpu, 1), "examples": rep["examples"], "kinds": rep["kinds"],
           "problem": rep["problem"], "divergence": None}
    d = rep["divergence"]
    if d:
        diff = d["off_baseline"]
        ref = run_check(d["suite"], load_adapter(REFERENCE), profile)
        row["divergence"] = {
            "first_failure": d["first_failure"], "reason": d["reason"], "kind": d["axes"]["kind"],
            "shrunk_diff": diff, "schedule": d.get("schedule"), "axes": d["axes"],
            "tokens": d["axes"].get("input_ids") or d["axes"].get("request_ids"),
            "rechecked": d["rechecked"]["status"], "reference": "pass" if ref["ok"] else "FAIL"}
    return row


def _v(v):
    return json.dumps(v) if isinstance(v, (str, bool)) or v is None else str(v)


def table(rows) -> str:
    lines = ["| candidate | found at example | shrink calls | time (wall / CPU) | first failing output "
             "| shrunk case: kind, and the axes off the baseline | rechecked / reference |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ex, d = r["examples"], r["divergence"]
        t = f"{r['wall_s']:.0f} s / {r['cpu_s']:.0f} s"
        if d is None:
            what = r["problem"] or f"nothing in {ex['judged']} examples"
            lines.append(f"| {r['name']} | - | - | {t} | - | {what} | - |")
            continue
        diff = ", ".join(f"{k}={_v(v)}" for k, v in d["shrunk_diff"].items()) or "none"
        shape = ""
        toks = d["tokens"]
        if toks:
            n = "+".join(str(len(t)) for t in toks)
            shape = f" ({n} token{'' if n == '1' else 's'}"
            shape += f"; {d['schedule']})" if d.get("schedule") else ")"
        lines.append(f"| {r['name']} | {ex['to_first_failure']} | {ex['shrink_calls']} | {t} | "
                     f"`{d['first_failure']}` | {d['kind']}{shape}: {diff} | "
                     f"{d['rechecked']} / {d['reference']} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--rows", choices=("mutants", "engines"), default="mutants")
    p.add_argument("--only", help="comma-separated row names")
    p.add_argument("--max-examples", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--table", action="store_true", help="only print the table of the results file")
    args = p.parse_args(argv)
    path = os.path.join(RESULTS, f"search_{args.rows}.jsonl")
    if not args.table:
        rows = mutant_rows() if args.rows == "mutants" else engine_rows()
        only = set(args.only.split(",")) if args.only else None
        os.makedirs(RESULTS, exist_ok=True)
        for name, how, spec, pins, profile in rows:
            if only and name not in only:
                continue
            row = run_row(name, how, spec, pins, profile, args.max_examples, args.seed)
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
            print(json.dumps(row), flush=True)
    with open(path, encoding="utf-8") as f:
        latest = {}
        for line in f:
            r = json.loads(line)
            latest[r["name"]] = r
    print(table(latest.values()))


if __name__ == "__main__":
    main()
