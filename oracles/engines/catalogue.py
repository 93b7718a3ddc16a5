"""The mutant catalogue against a suite in every profile: which cases each mutant fails (or
leaves INCONCLUSIVE) per profile, each mutant run once per case and its outputs judged against
every profile's tolerances (docs/conformance.md section 6 is made with it).

    python -m oracles.engines.catalogue GOLDEN [--only GLOB] [--mutants a,b] [--json OUT]

ALLOWED lists the profiles that allow a mutant by definition (a precision choice the profile
emulates), with the reason; every other (mutant, profile) pair must fail some case.
"""

from __future__ import annotations

import argparse
import json
import sys

from ..authoring.conditioned import conditioner_for
from ..authoring.mutants import MUTANTS
from ..checking.check import run_check
from ..format import tolerances as tolerance
from ..format.golden import Golden
from .reference import RefimplAdapter

# mutant -> {profile: why the profile allows it}
_BF16_BASED = ("bf16", "fp8", "bf16_f32_experts", "fp8_kv")
ALLOWED = {
    "bf16_gate_bias": {p: "the gate bias rounded to bf16 is within the bf16 rounding these "
                          "profiles emulate (a bias difference below one bf16 ulp decides "
                          "gate.bias_below_bf16 only)" for p in _BF16_BASED},
    "bf16_gate": {p: "a bf16 gate is the bf16 rounding these profiles emulate (it still fails "
                     "gate.logits_below_88, where its renormalisation is 0/0)" for p in _BF16_BASED},
    "fp8_dequant_to_bf16": {p: "FP8 weights dequantised into bf16 are bf16 weights, which these "
                               "profiles emulate" for p in _BF16_BASED},
}


class _Cached:
    """A candidate whose outputs are computed once per case and reused for every profile."""

    def __init__(self, adapter, label):
        self.adapter, self.label, self.cache = adapter, label, {}

    def supports(self, case_id, load):
        return True

    def outputs(self, case_id, load):
        if case_id not in self.cache:
            self.cache[case_id] = self.adapter.run(load())
        return self.cache[case_id]


def sweep(golden: str, mutants=None, only=None, profiles=tolerance.PROFILES,
          conditioning: bool = True) -> dict:
    """{mutant: {profile: {"fail": [case ids], "inconclusive": [case ids]}}}, judged as `oracles
    check` judges (the reference recomputed on the mutant's routing where it resolved a forgiven
    near-tie the other way; conditioning=False: those positions left out instead)."""
    out = {}
    golden = Golden(golden)  # opened and verified once for every mutant and profile
    for name in mutants or MUTANTS:
        cand = _Cached(RefimplAdapter("float32", MUTANTS[name]), name)
        out[name] = {}
        for p in profiles:
            rep = run_check(golden, cand, p, only=only, allow_inconclusive=True,
                            conditioner=conditioner_for if conditioning else None)
            out[name][p] = {s: [r["id"] for r in rep["cases"] if r["status"] == s]
                            for s in ("fail", "inconclusive")}
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m oracles.engines.catalogue")
    ap.add_argument("golden")
    ap.add_argument("--only")
    ap.add_argument("--mutants")
    ap.add_argument("--json")
    ap.add_argument("--no-conditioning", action="store_true")
    a = ap.parse_args(argv)
    res = sweep(a.golden, a.mutants.split(",") if a.mutants else None, a.only,
                conditioning=not a.no_conditioning)
    print("| mutant | " + " | ".join(tolerance.PROFILES) + " |")
    print("|---|" + "---|" * len(tolerance.PROFILES))
    missed = []
    for name, per in res.items():
        cells = []
        for p in tolerance.PROFILES:
            f, i = len(per[p]["fail"]), len(per[p]["inconclusive"])
            allowed = MUTANTS[name].allowed or p in ALLOWED.get(name, {})
            cells.append(f"{f} ({i})" + (" allowed" if allowed else ""))
            if not f and not allowed:
                missed.append((name, p))
        print(f"| `{name}` | " + " | ".join(cells) + " |")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(res, fh, indent=1)
    for name, p in missed:
        print(f"not caught: {name} under {p}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
