"""The checker: a candidate's outputs against a golden suite, with the profile's tolerances.

A candidate is either a directory (CANDIDATE/cases/<id>/outputs.safetensors, the file route for
engines in any language) or a Python adapter (adapters.py). Per case, outputs are compared in
dataflow order; the first output that exceeds its tolerance is named, with a one-line command
that reproduces it. Missing required outputs fail; missing intermediates are listed as not
provided; NaN or Inf never passes; a wrong shape or dtype fails with what was expected.
"""

from __future__ import annotations

import os
import shlex

import ml_dtypes
import numpy as np

from . import OraclesError, metrics, tolerance
from .golden import Golden, read_tensors
from .schema import CAUSAL_KINDS, matches

FLOAT_DTYPES = (np.dtype(np.float64), np.dtype(np.float32), np.dtype(np.float16),
                np.dtype(ml_dtypes.bfloat16))
CONTINUOUS_METRICS, LOGIT_METRICS = metrics.CONTINUOUS_METRICS, metrics.LOGIT_METRICS


class DirCandidate:
    """The file route: CANDIDATE/cases/<id>/outputs.safetensors."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        if not os.path.isdir(self.path):
            raise OraclesError(f"{self.path}: candidate directory not found")
        self.label = self.path

    def supports(self, case_id, load):
        return True

    def outputs(self, case_id, load):
        p = os.path.join(self.path, "cases", case_id, "outputs.safetensors")
        if not os.path.exists(p):
            return None
        return read_tensors(p)


class AdapterCandidate:
    """A Python engine: `factory()` returns an object with supports(case) and run(case)."""

    def __init__(self, adapter, label: str):
        self.adapter, self.label = adapter, label

    def supports(self, case_id, load):
        ok = self.adapter.supports(load())
        return True if ok is True else (str(ok) if ok else "not supported")

    def outputs(self, case_id, load):
        out = self.adapter.run(load())
        if not isinstance(out, dict):
            raise TypeError(f"run() returned {type(out).__name__}, not a dict of arrays")
        return {k: _as_numpy(v) for k, v in out.items()}


def _as_numpy(v):
    if hasattr(v, "detach"):  # a torch tensor
        v = v.detach().cpu()
        if str(v.dtype) == "torch.bfloat16":
            v = v.float()
        v = v.numpy()
    return np.asarray(v)


# ---------------------------------------------------------------------------------------------

def _metric_failures(values: dict, tols: dict, names) -> list[str]:
    bad = []
    for m in names:
        if m in values and m in tols and not values[m] <= tols[m]["tol"]:
            bad.append(f"{m} {values[m]:.3g} > tol {tols[m]['tol']:.3g}")
    return bad


def _check_output(out: dict, c, e, expected: dict, cand: dict, tols: dict, taint) -> None:
    """Fill `out` (status, metrics, message) for one output."""
    name, kind = out["name"], out["type"]
    c = np.asarray(c)
    if c.shape != e.shape:
        out.update(status="fail", message=f"shape {list(c.shape)}, expected {list(e.shape)}")
        return
    want_int = kind in ("indices", "tokens")
    if want_int and not np.issubdtype(c.dtype, np.integer):
        out.update(status="fail", message=f"dtype {c.dtype}, expected an integer dtype (int32/int64)")
        return
    if not want_int and c.dtype not in FLOAT_DTYPES:
        out.update(status="fail", message=f"dtype {c.dtype}, expected a float dtype "
                                          "(float64/float32/float16/bfloat16)")
        return
    if not want_int:
        c = c.astype(np.float64)
        if not np.isfinite(c).all():
            n = int((~np.isfinite(c)).sum())
            out.update(status="fail", message=f"{n} NaN/Inf value(s): never passes")
            return
    c_idx = None
    if kind == "routing_weights":
        stem = name[: -len("topk_weight")]
        e_idx = expected[stem + "topk_idx"]
        c_idx = np.asarray(cand.get(stem + "topk_idx", e_idx))
        if c_idx.shape != e_idx.shape or not np.issubdtype(c_idx.dtype, np.integer):
            c_idx = e_idx  # the index output itself is reported as failing
    vals, names = metrics.compare(name, kind, c, e, expected, tols, taint, c_idx)
    out["metrics"] = vals
    out["tol"] = {m: tols[m]["tol"] for m in names if m in tols}
    bad = _metric_failures(vals, tols, names)
    out["status"] = "fail" if bad else "pass"
    if bad:
        out["message"] = "; ".join(bad)
    elif vals.get("forgiven"):
        out["message"] = f"{vals['forgiven']} near-tie token(s) forgiven"


def check_case(golden: Golden, entry: dict, candidate, profile: str) -> dict:
    cid = entry["id"]
    res = {"id": cid, "kind": entry["kind"], "pins": entry["pins"],
           "conventions": entry.get("conventions", {}), "outputs": [], "not_provided": []}
    cache = {}

    def load():
        if "case" not in cache:
            cache["case"] = golden.load_case(cid)
        return cache["case"]

    ok = candidate.supports(cid, load)
    if ok is not True:
        res.update(status="skip", reason=ok)
        return res
    try:
        cand = candidate.outputs(cid, load)
    except OraclesError:
        raise
    except Exception as e:  # noqa: BLE001 - an engine crashing on a case fails that case
        res.update(status="fail", reason=f"candidate raised {type(e).__name__}: {e}",
                   first_failure=None)
        return res
    if cand is None:
        res.update(status="missing", reason="no outputs.safetensors for this case",
                   first_failure=None)
        return res
    expected = golden.expected(cid)
    tols_all = entry["tolerances"].get(profile)
    if tols_all is None:
        raise OraclesError(f"case {cid}: the manifest has no tolerances for profile {profile!r}")
    res.update(judge(entry["kind"], entry["outputs"], expected, cand, tols_all))
    return res


def judge(kind: str, outputs: list, expected: dict, cand: dict, tols_all: dict) -> dict:
    """Compare a candidate's outputs with the expected ones, in dataflow order.
    outputs: [{name, type, required}] -> {status, first_failure, reason, outputs, not_provided}."""
    res = {"outputs": [], "not_provided": []}
    first = None
    taint = metrics.Taint(causal=kind in CAUSAL_KINDS)
    for o in outputs:
        name = o["name"]
        out = {"name": name, "type": o["type"], "required": o["required"]}
        if name not in cand:
            if o["required"]:
                out.update(status="fail", message="missing (a required output)")
            else:
                res["not_provided"].append(name)
                continue
        else:
            _check_output(out, cand[name], expected[name], expected, cand, tols_all[name], taint)
        res["outputs"].append(out)
        if out["status"] == "fail" and first is None:
            first = out
    if taint.count():
        res["not_compared"] = f"{taint.count()} token(s) downstream of a forgiven routing difference"
    res["status"] = "fail" if first else "pass"
    res["first_failure"] = first["name"] if first else None
    if first:
        res["reason"] = f"{first['name']}: {first['message']}"
    return res


def run_check(golden_path: str, candidate, profile: str = "float32", only: str | None = None,
              repro_base: str | None = None, progress=None) -> dict:
    """Check every case (matching `only`) -> the report (a JSON-able dict)."""
    if profile not in tolerance.PROFILES:
        raise OraclesError(f"profile {profile!r} is not one of {', '.join(tolerance.PROFILES)}")
    golden = Golden(golden_path)
    entries = [e for e in golden.manifest["cases"] if matches(e["id"], only)]
    if not entries:
        raise OraclesError(f"{golden_path}: no case matches --only {only!r}")
    results = []
    it = progress(entries, desc="checking", unit="case") if progress else entries
    for entry in it:
        r = check_case(golden, entry, candidate, profile)
        if r["status"] in ("fail", "missing") and repro_base:
            r["repro"] = f"{repro_base} --only {shlex.quote(r['id'])} --profile {profile}"
        results.append(r)
    _mark_alternatives(results)
    counts = {s: sum(r["status"] == s for r in results)
              for s in ("pass", "fail", "missing", "skip", "not_followed")}
    return {"golden": golden_path, "suite": golden.manifest.get("suite"), "candidate": candidate.label,
            "profile": profile, "counts": counts, "ok": counts["fail"] == 0 and counts["missing"] == 0,
            "conventions": conventions_summary(results), "cases": results}


def _mark_alternatives(results) -> None:
    """Conventions cases: when one alternative of a topic passes, the others are conventions
    this candidate does not follow (status not_followed), not failures. When none passes, they
    all stay failures."""
    passed = {t for r in results if r["status"] == "pass" for t in r.get("conventions", {})}
    for r in results:
        if r["status"] == "fail" and any(t in passed for t in r.get("conventions", {})):
            r["status"] = "not_followed"
            r.pop("repro", None)


def conventions_summary(results) -> dict:
    """topic -> {alternative: passed?} for the conventions suite's labelled cases."""
    out = {}
    for r in results:
        for topic, alt in r.get("conventions", {}).items():
            if r["status"] in ("pass", "fail", "not_followed"):
                out.setdefault(topic, {})[alt] = r["status"] == "pass"
    return out


def format_report(rep: dict) -> str:
    rows = [("case", "kind", "result", "first failing output / note")]
    for r in rep["cases"]:
        note = r.get("reason", "")
        if r["status"] == "pass":
            fg = [o.get("message") for o in r["outputs"] if o.get("message")]
            note = "; ".join(fg)
            if r.get("not_compared"):
                note = (note + "; " if note else "") + r["not_compared"] + " not compared"
            if r["not_provided"]:
                note = (note + "; " if note else "") + f"{len(r['not_provided'])} intermediate(s) not provided"
        rows.append((r["id"], r["kind"], r["status"].upper(), note))
    w = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f"{a:<{w[0]}}  {b:<{w[1]}}  {c:<{w[2]}}  {d}" for a, b, c, d in rows]
    lines.insert(1, "-" * min(120, sum(w) + 6 + max(len(r[3]) for r in rows)))
    repro = [r for r in rep["cases"] if r.get("repro")]
    if repro:
        lines.append("")
        lines.append("reproduce:")
        lines += [f"  {r['repro']}" for r in repro]
    if rep["conventions"]:
        lines.append("")
        lines.append("conventions this candidate follows:")
        for topic, alts in rep["conventions"].items():
            passed = [a for a, ok in alts.items() if ok]
            lines.append(f"  {topic}: {', '.join(passed) if passed else 'none of ' + ', '.join(alts)}")
    c = rep["counts"]
    lines.append("")
    lines.append(f"{rep['candidate']} vs {rep['suite']} ({rep['profile']} profile): {c['pass']} passed, "
                 f"{c['fail']} failed, {c['missing']} missing, {c['skip']} skipped"
                 + (f", {c['not_followed']} alternative(s) not followed" if c["not_followed"] else ""))
    return "\n".join(lines)
