"""The checker: a candidate's outputs against a golden suite, with the profile's tolerances.

A candidate is either a directory (CANDIDATE/cases/<id>/outputs.safetensors, the file route for
engines in any language) or a Python adapter (candidates.py). Per case, outputs are compared in
dataflow order (`compare`), then judged (`verdict`): the first output that exceeds its tolerance
is named, with a one-line command that reproduces it. Missing required outputs fail; missing
intermediates are listed as not provided; NaN or Inf never passes; a wrong shape or dtype fails
with what was expected. Results are the values of results.py.
"""

from __future__ import annotations

import dataclasses
import shlex
import time

import ml_dtypes
import numpy as np

from .. import OraclesError
from ..format import metrics, taint, tolerances
from ..format.checkpoint_ref import CheckpointRef
from ..format.golden import Golden
from ..format.profiles import choose, relation
from ..format.schema import matches
from .known import apply as apply_known
from .results import CaseResult, Comparison, Coverage, OutputResult, Report, Verdict
from .routing import CheckpointTensors, explainer
from .worker import CaseError

FLOAT_DTYPES = (np.dtype(np.float64), np.dtype(np.float32), np.dtype(np.float16),
                np.dtype(ml_dtypes.bfloat16))
CONTINUOUS_METRICS, LOGIT_METRICS = metrics.CONTINUOUS_METRICS, metrics.LOGIT_METRICS

MIN_COMPARED = 0.5  # a case judging fewer of its required outputs' positions is INCONCLUSIVE


# ---------------------------------------------------------------------------------------------
# One output: its metrics held to the profile's tolerances
# ---------------------------------------------------------------------------------------------

def metric_failures(values: dict, tols: dict, names) -> list[str]:
    """The tolerance rule applied: each metric of `names` that was measured must be <= its
    tolerance (NaN never is); one phrase per metric that is not."""
    bad = []
    for m in names:
        if m not in values:
            continue
        if m not in tols:
            bad.append(f"{m} {values[m]:.3g}: the suite has no tolerance for it")
        elif not values[m] <= tols[m]["tol"]:
            bad.append(f"{m} {values[m]:.3g} > tol {tols[m]['tol']:.3g}")
    return bad


def compare_output(name: str, kind: str, required: bool, c, e, expected: dict, cand: dict,
                   tols: dict, left_out) -> OutputResult:
    """One output the candidate gave, against its expected value."""
    def failed(message):
        return OutputResult(name, kind, required, status="fail", message=message)
    if not (hasattr(c, "shape") and hasattr(c, "dtype")):
        c = np.asarray(c)
    # shape and dtype first: a file's tensor (format.candidate.Tensor) is read only once they fit
    if tuple(c.shape) != e.shape:
        return failed(f"shape {list(c.shape)}, expected {list(e.shape)}")
    want_int = kind in ("indices", "tokens")
    if want_int and not np.issubdtype(c.dtype, np.integer):
        return failed(f"dtype {c.dtype}, expected an integer dtype (int32/int64)")
    if not want_int and c.dtype not in FLOAT_DTYPES:
        return failed(f"dtype {c.dtype}, expected a float dtype (float64/float32/float16/bfloat16)")
    c = np.asarray(c)
    if not want_int:
        c = c.astype(np.float64)
        if not np.isfinite(c).all():
            n = int((~np.isfinite(c)).sum())
            return failed(f"{n} NaN/Inf value(s): never passes")
    c_idx = None
    if kind == "routing_weights":
        stem = name[: -len("topk_weight")]
        e_idx = expected[stem + "topk_idx"]
        c_idx = cand.get(stem + "topk_idx", e_idx)
        if tuple(np.shape(c_idx)) != e_idx.shape or not np.issubdtype(c_idx.dtype, np.integer):
            c_idx = e_idx  # the index output itself is reported as failing
        c_idx = np.asarray(c_idx)
    vals, names = metrics.compare(name, kind, c, e, expected, tols, left_out, c_idx)
    out = OutputResult(name, kind, required, metrics=vals,
                       tol={m: tols[m]["tol"] for m in names if m in tols})
    if not any(m in vals for m in names):
        n = vals.get("positions")
        out.status = "not_compared"
        out.message = (f"not compared: all {n} positions" if n else
                       "not compared: every token") + " follow forgiven routing differences"
        return out
    bad = metric_failures(vals, tols, names)
    if vals.get("unexplained"):
        bad.append(f"{vals['unexplained']} near-tie token(s) routed to experts that its own router "
                   f"input ({name[: -len('topk_idx')]}ffn_norm) does not select within the "
                   "profile's router arithmetic (not a rounding difference)")
    out.status = "fail" if bad else "pass"
    if bad:
        out.message = "; ".join(bad)
    elif vals.get("forgiven"):
        out.message = f"{vals['forgiven']} near-tie token(s) forgiven"
    return out


# ---------------------------------------------------------------------------------------------
# One case: compare every output, then the verdict
# ---------------------------------------------------------------------------------------------

def compare(kind: str, outputs: list, expected: dict, cand: dict, tols_all: dict,
            params: dict | None = None, explain=None, conditioner=None) -> Comparison:
    """Every output of the case in dataflow order.  outputs: [{name, type, required}].

    The routing outputs are read first (taint.settle): a forgiven near-tie the candidate
    resolved the other way has the expected values recomputed on its choice by `conditioner`
    (authoring.conditioned.Conditioner) and every position judged, or, without one, what it
    reaches left out (taint.Layout); one its own router input does not explain fails
    (`explain`, routing.explainer). A routing output the candidate does not give (logits only)
    is inferred from its logits with a conditioner, else taken from the golden's margins (every
    near-tie may have gone either way). params: the case's (a schedule's shared prefixes)."""
    scored = [o["name"] for o in outputs if o["required"] and o["type"] in ("logits", "continuous")]
    settled = taint.settle(kind, [(o["name"], o["type"]) for o in outputs], expected, cand,
                           tols_all, params, explain, conditioner, scored)
    left_out, expected = settled.taint, settled.expected
    results, not_provided = [], []
    for o in outputs:
        name = o["name"]
        if name in cand:
            results.append(compare_output(name, o["type"], o["required"], cand[name],
                                          expected[name], expected, cand, tols_all[name], left_out))
        elif o["required"]:
            results.append(OutputResult(name, o["type"], True, status="fail",
                                        message="missing (a required output)"))
        else:
            not_provided.append(name)
    left = [(o.name, o.metrics["not_compared"], o.metrics["positions"])
            for o in results if (o.metrics or {}).get("not_compared")]
    note = None
    if left:
        name, n, of = max(left, key=lambda x: x[1] / x[2])
        note = (f"{n} of {of} position(s) of {name} (the most of {len(left)} output(s)) "
                "downstream of a forgiven routing difference")
    conditioned = None
    if settled.source:
        conditioned = {"forced": settled.forced, "recomputations": settled.recomputations,
                       "routing": settled.source, **({"note": settled.note} if settled.note else {})}
    assumed = any(not f.reported for f in left_out.flips)
    return Comparison(results, not_provided, assumed, note, conditioned)


def coverage(out: OutputResult) -> Coverage | None:
    """How much of a required output that passed (or was left out) was compared; None when it
    has no token positions."""
    v = out.metrics or {}
    n, of, exact = v.get("compared"), v.get("positions"), v.get("exact_tie_positions", 0)
    if out.status == "not_compared" and of is None:
        n, of = 0, 1
    if of is None:
        return None
    # positions left out because of exact ties decided the other way (a tie-break convention)
    # do not count against the case; near-tie ones do
    return Coverage(out.name, n, of, exact, n / (of - exact) if of > exact else 1.0)


def verdict(comparison: Comparison, any_required: bool, min_compared: float = MIN_COMPARED) -> Verdict:
    """FAIL at the first failing output; INCONCLUSIVE when the case judged less than
    `min_compared` of its required outputs' token positions, or none at all; else PASS."""
    first = next((o for o in comparison.outputs if o.status == "fail"), None)
    judged = [o for o in comparison.outputs if o.required and o.status in ("pass", "not_compared")]
    checked = sum(o.status == "pass" for o in judged)
    worst = None  # the least-compared required output
    any_position = False  # some required output compared at least one position
    for o in judged:
        cov = coverage(o)
        any_position |= o.status == "pass" and (cov is None or cov.positions > 0)
        if cov is not None and (worst is None or cov.fraction < worst.fraction):
            worst = cov
    if first:
        return Verdict("fail", first.name, f"{first.name}: {first.message}", checked, worst)
    if worst is not None and worst.fraction < min_compared:
        return Verdict("inconclusive", None,
                       f"{worst.output}: only {worst.positions} of {worst.of} positions compared "
                       f"(minimum {min_compared:.0%}); the rest follow near-tie routing the "
                       "candidate " + ("did not report" if comparison.assumed else "resolved the other way"),
                       checked, worst)
    if not any_position and any_required:
        return Verdict("inconclusive", None, "no position of any required output was compared",
                       checked, worst)
    return Verdict("pass", None, None, checked, worst)


def judged(header: dict, comparison: Comparison, v: Verdict) -> CaseResult:
    """A case's result from its comparison and verdict."""
    return CaseResult(**header, outputs=comparison.outputs, not_provided=comparison.not_provided,
                      not_compared=comparison.not_compared, conditioned=comparison.conditioned,
                      checked=v.checked, compared=v.compared, first_failure=v.first_failure,
                      status=v.status, reason=v.reason)


def judge(kind: str, outputs: list, expected: dict, cand: dict, tols_all: dict,
          min_compared: float = MIN_COMPARED, params: dict | None = None, explain=None,
          conditioner=None) -> dict:
    """compare, then verdict, as the report's JSON holds them: {outputs, not_provided,
    [not_compared], [conditioned], checked, [compared], first_failure, status, [reason]}."""
    comparison = compare(kind, outputs, expected, cand, tols_all, params, explain, conditioner)
    v = verdict(comparison, any(o["required"] for o in outputs), min_compared)
    d = judged({"id": "", "kind": kind, "pins": "", "conventions": {}}, comparison, v).as_dict()
    return {k: d[k] for k in d if k not in ("id", "kind", "pins", "conventions")}


def _header(entry: dict) -> dict:
    return {"id": entry["id"], "kind": entry["kind"], "pins": entry["pins"],
            "conventions": entry.get("conventions", {})}


def check_case(golden: Golden, entry: dict, candidate, profile: str,
               min_compared: float = MIN_COMPARED, conditioner=None) -> CaseResult:
    """One case. With the profile, a near-tie the candidate resolved in a way its own reported
    router input does not explain fails (routing.explainer, on the case's checkpoint).
    conditioner(entry, load, expected) -> an authoring.conditioned.Conditioner or None: the
    expected values follow the candidate's routing (compare)."""
    cid = entry["id"]
    tols_all = entry["tolerances"].get(profile)
    if tols_all is None:
        raise OraclesError(f"case {cid!r}: the manifest has no tolerances for profile {profile!r}")
    required = golden.required(cid)
    cache = {}

    def load():
        if "case" not in cache:
            cache["case"] = golden.load_case(cid)
        return cache["case"]

    try:
        ok = candidate.supports(cid, load)
        if ok is not True:
            return CaseResult(**_header(entry), status="skip", reason=ok)
        cand = candidate.outputs(cid, load)
    except CaseError as e:
        return CaseResult(**_header(entry), status="error", reason=str(e))
    if cand is None:
        return CaseResult(**_header(entry), status="missing",
                          reason="no outputs.safetensors for this case")
    outputs = [{**o, "required": o["required"] or o["name"] in required} for o in entry["outputs"]]

    def model():
        if "model" not in cache:
            case = load()
            weights = case.weights
            if isinstance(weights, CheckpointRef):  # a user's checkpoint: its gate tensors only
                weights = CheckpointTensors(weights.path)
            cache["model"] = None if weights is None or case.config is None else \
                (weights, case.config)
        return cache["model"]
    expected = golden.expected(cid)
    cond = None if conditioner is None else conditioner(entry, load, expected)
    comparison = compare(entry["kind"], outputs, expected, cand, tols_all, entry.get("params"),
                         explainer(cand, model, profile), cond)
    return judged(_header(entry), comparison,
                  verdict(comparison, any(o["required"] for o in outputs), min_compared))


# ---------------------------------------------------------------------------------------------
# A suite: every case, then the report
# ---------------------------------------------------------------------------------------------

# known and fixed: with --known (known.py)
STATUSES = ("pass", "fail", "missing", "error", "inconclusive", "skip", "not_followed", "known",
            "fixed")


def check_suite(golden_path: str, candidate, profile: str = "float32", only: str | None = None,
                repro_base: str | None = None, progress=None, expect_digest: str | None = None,
                allow_empty: bool = False, allow_inconclusive: bool = False,
                min_compared: float = MIN_COMPARED, known=None, allow_fixed: bool = False,
                engine_options: dict | None = None, today=None, checkpoint: str | None = None,
                conditioner=None, mode: str | None = None, any_profile: bool = False) -> Report:
    """Check every case (matching `only`) -> the Report. ok is False when a case fails, is
    missing or errs, when one is inconclusive (unless allow_inconclusive), and when no required
    output was compared at all (unless allow_empty). known: a known.KnownFile whose entries turn
    failures into KNOWN and passes into FIXED (which fail the run unless allow_fixed).
    conditioner: see check_case (authoring.conditioned.conditioner_for, which `oracles check`
    passes; it runs refimpl's forward pass). mode: the profile that emulates the mode the
    candidate ran in (engine.json, the adapter's `mode`), when known: a profile emulating FP8
    weights or an FP8 KV cache the run did not have is refused unless any_profile, and the
    report says how the profile relates to the mode (format.profiles).
    golden_path may also be a suite already opened (format.golden.Golden, verified when it was
    opened): a sweep over profiles or mutants opens and verifies it once (catalogue.sweep); its
    opening options (expect_digest, checkpoint) were given when it was opened."""
    if profile not in tolerances.PROFILES:
        raise OraclesError(f"profile {profile!r} is not one of {', '.join(tolerances.PROFILES)}")
    choose(profile, mode, any_profile)  # (refused: one emulating FP8 the run did not have)
    if isinstance(golden_path, Golden):
        if expect_digest is not None or checkpoint is not None:
            raise ValueError("expect_digest and checkpoint are given when a suite is opened")
        golden, golden_path = golden_path, golden_path.path
    else:
        golden = Golden(golden_path, expect_digest=expect_digest, checkpoint=checkpoint)
    entries = [e for e in golden.manifest["cases"] if matches(e["id"], only)]
    if not entries:
        raise OraclesError(f"{golden_path}: no case matches --only {only!r}")
    if hasattr(candidate, "bind"):  # an adapter process: the same suite, the cases in this order
        candidate.bind(golden, [e["id"] for e in entries])
    for e in entries:  # every case's contract, before running anything
        golden.required(e["id"])
    results = []
    it = progress(entries, desc="checking", unit="case") if progress else entries
    for entry in it:
        stuck = getattr(candidate, "stuck", None)
        if stuck:
            r = CaseResult(**_header(entry), status="error",
                           reason=f"not run: the adapter is stuck ({stuck})")
        else:
            t0 = time.perf_counter()
            r = check_case(golden, entry, candidate, profile, min_compared, conditioner)
            r = dataclasses.replace(r, seconds=round(time.perf_counter() - t0, 3))
        if r.status in ("fail", "missing", "error", "inconclusive") and repro_base and not stuck:
            r = dataclasses.replace(r, repro=repro_line(repro_base, r.id, profile))
        results.append(r)
    results = mark_alternatives(results)
    known_section = None
    if known is not None:
        results, known_section = apply_known(known, results, profile, engine_options, today)
    counts = {s: sum(r.status == s for r in results) for s in STATUSES}
    checked = sum(r.checked or 0 for r in results)
    empty = checked == 0
    ok = (counts["fail"] == 0 and counts["missing"] == 0 and counts["error"] == 0
          and (allow_inconclusive or counts["inconclusive"] == 0) and (allow_empty or not empty)
          and (allow_fixed or counts["fixed"] == 0))
    notes = []
    if empty:
        notes.append("nothing was checked: no case compared a required output ("
                      + ", ".join(f"{counts[s]} {s}" for s in STATUSES if counts[s]) + ")"
                      + ("" if allow_empty else "; pass --allow-empty to accept that"))
    versus = relation(profile, mode)
    if versus and profile != mode:
        notes.append(f"profile {profile}: {versus}")
    if counts["inconclusive"]:
        notes.append(f"{counts['inconclusive']} case(s) inconclusive: too few positions compared"
                     + ("" if allow_inconclusive else "; pass --allow-inconclusive to accept that"))
    if golden.pinned == "question":
        notes.append("pinned by the question digest: the expected values and tolerances are tied "
                     "to it by `oracles verify`, not by the digest")
    if known_section is not None:
        notes += known_section["notes"] + known_section["unmatched_notes"]
        if counts["known"]:
            notes.append(f"{counts['known']} known failure(s) (--known {known.path}): not failing the run")
        if counts["fixed"]:
            notes.append(f"{counts['fixed']} known failure(s) now pass (FIXED): remove their entries"
                         + ("" if allow_fixed else " or pass --allow-fixed"))
    made = {k: golden.manifest.get(k) for k in ("format", "generator", "refimpl")}
    return Report(golden_path, golden.manifest.get("suite"), golden.digest, candidate.label,
                  profile, counts, checked, ok, min_compared, notes, conventions_summary(results),
                  results, golden.question_digest, golden.pinned, made, known_section,
                  conditioner is not None, mode, versus)


def repro_line(base: str, cid: str, profile: str) -> str:
    """The command that reproduces one case: `base` (`oracles check GOLDEN CANDIDATE` and the
    options that change the verdict, cli.repro_base) with the case and the profile it was
    judged by."""
    return f"{base} --only {shlex.quote(cid)} --profile {profile}"


def run_check(*args, **kwargs) -> dict:
    """check_suite(...) as the JSON report (`oracles check --json`): a dict."""
    return check_suite(*args, **kwargs).as_dict()


def mark_alternatives(results: list) -> list:
    """Conventions cases: when one alternative of a topic passes, the others are conventions
    this candidate does not follow (status not_followed), not failures; so are the ones too
    close to call in this profile (inconclusive: the passing one decides the label). When none
    passes, they all stay failures (or inconclusive)."""
    passed = {t for r in results if r.status == "pass" for t in r.conventions}
    out = []
    for r in results:
        if r.status in ("fail", "inconclusive") and any(t in passed for t in r.conventions):
            reason = "inconclusive: " + r.reason if r.status == "inconclusive" else r.reason
            r = dataclasses.replace(r, status="not_followed", reason=reason, repro=None)
        out.append(r)
    return out


def conventions_summary(results) -> dict:
    """topic -> {alternative: passed?} for the conventions suite's labelled cases."""
    out = {}
    for r in results:
        for topic, alt in r.conventions.items():
            if r.status in ("pass", "fail", "not_followed"):
                out.setdefault(topic, {})[alt] = r.status == "pass"
    return out
