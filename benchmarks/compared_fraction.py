"""How much of each case an honest run in each profile's precision gets judged (issue 16 item 7).

For every suite and profile, refimpl's own emulation of that profile (oracles.adapters
RefimplAdapter(profile): the run the profile was calibrated from, an honest candidate by
construction) is checked against the suite, and the distribution of the compared fraction over
its model cases is printed (the fraction of the least-compared required output's token positions,
1.0 where nothing was left out), with the INCONCLUSIVE and FAIL counts (FAIL must be 0). Then
the same figures for the real engines from the engine matrix's rows (docs/engines.json, written
by `python -m oracles.engines.matrix`, which records them per row).

    python benchmarks/compared_fraction.py [--suites default,engine,scenarios] [--profiles ...]
        [--work DIR] [--no-conditioning] [--engines-json docs/engines.json]
        [--reports REPORT.json ...]

--work keeps the generated suites (regenerated only when missing); --no-conditioning measures the
checker that leaves out what a forgiven routing difference reaches instead of recomputing the
reference on the candidate's routing (`oracles check --no-conditioning`). --reports prints the
same row for reports written by `oracles check ... --json REPORT.json` (a real engine's run
judged outside the matrix) and nothing else (--suites "" to skip the emulations).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from oracles.authoring.conditioned import conditioner_for  # noqa: E402
from oracles.authoring.writer import generate  # noqa: E402
from oracles.checking.candidates import AdapterCandidate  # noqa: E402
from oracles.checking.check import run_check  # noqa: E402
from oracles.engines.matrix import compared_fractions  # noqa: E402
from oracles.engines.reference import RefimplAdapter  # noqa: E402
from oracles.format.tolerances import PROFILES  # noqa: E402

HEAD = "| suite | candidate | profile | model cases | min | p10 | median | below 0.9 | conditioned | inconclusive | failed |"


def row(suite, who, profile, dist, inconclusive, failed) -> str:
    d = dist
    return (f"| {suite} | {who} | {profile} | {d.get('cases', 0)} | {d.get('min', '-')} | "
            f"{d.get('p10', '-')} | {d.get('median', '-')} | {d.get('below_0.9', '-')} | "
            f"{d.get('conditioned', '-')} | {len(inconclusive)}"
            + (f" ({', '.join(inconclusive)})" if inconclusive else "") + f" | {failed} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--suites", default="default,engine,scenarios")
    p.add_argument("--profiles", default=",".join(PROFILES))
    p.add_argument("--work", help="directory for the suites (default: a temporary one)")
    p.add_argument("--no-conditioning", action="store_true")
    p.add_argument("--engines-json", default=os.path.join(ROOT, "docs", "engines.json"))
    p.add_argument("--reports", nargs="*", default=[], metavar="REPORT",
                   help="reports of `oracles check --json`: one row each")
    args = p.parse_args(argv)
    cond = None if args.no_conditioning else conditioner_for
    print(HEAD)
    print("|" + "---|" * (HEAD.count("|") - 1))
    with contextlib.ExitStack() as stack:
        work = args.work or stack.enter_context(tempfile.TemporaryDirectory(prefix="compared-"))
        os.makedirs(work, exist_ok=True)
        for suite in filter(None, args.suites.split(",")):
            gdir = os.path.join(work, suite)
            if not os.path.exists(gdir):
                generate(gdir, suite)
            for profile in args.profiles.split(","):
                t = time.perf_counter()
                cand = AdapterCandidate(RefimplAdapter(profile), f"refimpl {profile}", 0)
                rep = run_check(gdir, cand, profile, conditioner=cond, mode=profile)
                inc = [r["id"] for r in rep["cases"] if r["status"] == "inconclusive"]
                print(row(suite, "refimpl emulation", profile, compared_fractions(rep), inc,
                          rep["counts"]["fail"]) + f" <!-- {time.perf_counter() - t:.0f} s -->",
                      flush=True)
    for path in args.reports:
        with open(path, encoding="utf-8") as f:
            rep = json.load(f)
        info = rep.get("engine") or {}
        opts = ",".join(f"{k}={v}" for k, v in (info.get("options") or {}).items() if k != "converter")
        who = (f"{info.get('engine', rep.get('candidate', '?'))} {info.get('version', '')} ({opts})"
               + (", --no-conditioning" if rep.get("conditioning") is False else ""))
        inc = [r["id"] for r in rep["cases"] if r["status"] == "inconclusive"]
        print(row(rep.get("suite", "?"), who, rep["profile"], compared_fractions(rep), inc,
                  rep["counts"]["fail"]))
    if args.reports:
        return 0
    if os.path.exists(args.engines_json):
        for r in json.load(open(args.engines_json, encoding="utf-8")):
            if "compared" not in r:
                continue
            opts = ",".join(f"{k}={v}" for k, v in r["options"].items() if k != "converter")
            group = f", {r['cases']} cases" if r.get("cases") else ""  # scenario / model rows
            print(row(r["suite"], f"{r['engine']} {r['version']} ({opts}){group}, {r['date']}", r["profile"],
                      r["compared"], r.get("inconclusive_cases", []), r["failed"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
