"""Each bug of the mutant catalogue run in refimpl's bf16 and fp8_kv emulations (an engine in that
mode with that bug) and judged by the profile of that mode as `oracles check` judges it
(conditioned): how many cases it fails and which of the cases the float32-run mutant fails under
float32 it does not (issue 16: every bug class caught in float32 is caught in bf16).

    python -m oracles.engines.catalogue GOLDEN --json catalogue.json
    python benchmarks/mutants_in_precision.py GOLDEN catalogue.json
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from oracles.authoring.conditioned import conditioner_for  # noqa: E402
from oracles.authoring.mutants import MUTANTS  # noqa: E402
from oracles.checking.check import run_check  # noqa: E402
from oracles.engines.catalogue import ALLOWED, _Cached  # noqa: E402
from oracles.engines.reference import RefimplAdapter  # noqa: E402

d, cat = sys.argv[1], json.load(open(sys.argv[2]))
missed = []
for name, m in MUTANTS.items():
    if m.allowed:
        continue
    for prof in ("bf16", "fp8_kv"):
        if prof in ALLOWED.get(name, {}):
            continue
        rep = run_check(d, _Cached(RefimplAdapter(prof, m), name), prof, allow_inconclusive=True,
                        conditioner=conditioner_for)
        f = {r["id"] for r in rep["cases"] if r["status"] == "fail"}
        i = [r["id"] for r in rep["cases"] if r["status"] == "inconclusive"]
        f32 = set(cat[name]["float32"]["fail"])
        print(f"{name} {prof}-run: {len(f)} fail, {len(i)} inconclusive; float32-run under float32: {len(f32)}; "
              f"caught in float32 only: {sorted(f32 - f)[:4]}", flush=True)
        if not f:
            missed.append((name, prof))
print("no case failed:", missed)
