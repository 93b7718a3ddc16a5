"""`oracles verify GOLDEN`: regenerate a suite's answers on this machine and compare.

A suite's question digest (format/digest.py) pins what it asks; its answers, the expected values and
the calibrated tolerances, are computed by refimpl and differ between machines in their last
bits. `verify` recomputes every case from the suite's own files (inputs, params, config,
checkpoint: Golden.load_case, the question), exactly as `oracles generate` computed it
(golden.compute: the float64 truth and one emulated run per tolerance profile), and compares
with what the suite stores, at these levels (docs/conformance.md section 8 has the measurements
they rest on):

- continuous outputs, logits and the expected-only margins: the checker's own metrics
  (metrics.py) with the stored values as the expected and the regenerated ones as the candidate:
  max_rel = max |new - stored| / rms(stored) <= LEVEL, norm <= LEVEL, nmse <= LEVEL^2, and for
  logits no decided argmax may differ (top1 0, a position counting as decided when its top-2
  gap exceeds TIE times the largest logit, at least 1). LEVEL = 1e-9: the largest difference
  measured between two machines is 3.3e-11 (`rope_apply.v3`, cos and sin of angles near 1e5
  radians, where one ulp of numpy's power() moves the angle by 1e-11), the next 1.1e-13; the
  tightest tolerance the checker applies (float32: norm 1e-6, max_rel 2e-5) is 1000 times
  above, so values that agree at LEVEL judge every candidate alike.
- routing (`*.topk_idx`) and token streams (`tokens`): exact, as expert sets per token and as
  the stream. A last-bit difference can change a decision only where the two candidates it
  decides between are within rounding of each other: a token whose stored margin is at most
  TIE times the largest |router score| of that output (for tokens: TIE, in logits) may be
  decided the other way; it and everything downstream of it are left out, as the checker does
  for near-ties (metrics.Taint); a different decision at a larger margin is a difference. The
  largest margin change measured between two machines is 6.7e-15. A case where fewer than half
  of the positions could be compared is UNVERIFIED, never OK.
- tolerances: each stored tolerance (and forgiveness margin) within a factor TOL_FACTOR of the
  one calibrated here. Calibration runs the case in float32, bf16, fp8 and the engine modes,
  whose BLAS kernels round differently on other machines: measured, the same suite's tolerances
  differ by up to 4.5 times (float32 norm of `gate.logits_below_88`'s router scores, OpenBLAS's
  Prescott kernel against its Haswell one). TOL_FACTOR = 8.

Exit 0 when every case verifies, 1 when a case differs beyond these levels, is unverified or
cannot be regenerated here, 2 on bad input.
"""

from __future__ import annotations

import math
import platform
import time
from dataclasses import asdict, dataclass, field

import ml_dtypes  # noqa: F401 - (its version is the suite's record, not verify's)
import numpy as np

import refimpl

from .. import OraclesError
from ..format import metrics, taint as taint_mod, tolerances
from ..format.golden import OWN_CONVENTIONS, OWN_CONVENTIONS_BEFORE, Golden
from ..format.schema import CAUSAL_KINDS, matches, output_type
from ..format.untrusted import escape
from .mutants import MUTANTS
from .writer import compute

LEVEL = 1e-9
TIE = 1e-11
TOL_FACTOR = 8.0
MIN_COMPARED = 0.5


@dataclass
class Difference:
    """One thing that differs beyond its level."""
    what: str  # "value" | "tolerance" | "names" | "shape"
    where: str  # output name, or profile/output/metric
    message: str


@dataclass
class CaseVerdict:
    id: str
    kind: str
    status: str  # ok | differs | unverified | error
    reason: str = ""  # the first difference, or why it could not be verified
    differences: list = field(default_factory=list)  # [Difference]
    largest: dict | None = None  # the largest value difference / LEVEL seen: {output, metric, value}
    tolerance_ratio: float = 1.0  # the largest stored / recalibrated tolerance ratio (or inverse)
    not_compared: int = 0  # positions left out after a float64 near-tie went otherwise (all outputs)
    seconds: float = 0.0


@dataclass
class VerifyReport:
    golden: str
    suite: str | None
    suite_digest: str
    question_digest: str | None
    made_with: dict  # the suite's own record: format, refimpl, generator, numpy, platform
    here: dict  # this machine: refimpl, numpy, platform
    levels: dict
    cases: list  # [CaseVerdict]
    counts: dict
    ok: bool
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return asdict(self)


STATUSES = ("ok", "differs", "unverified", "error")


def _expected_under(entry: dict):
    """The mutant a case's expected values follow (None: this project's conventions)."""
    under = entry.get("expected_under", OWN_CONVENTIONS)
    if under == OWN_CONVENTIONS or under in OWN_CONVENTIONS_BEFORE:
        return None
    if under not in MUTANTS:
        raise OraclesError(f"its expected values follow {under!r}, which this refimpl does not know")
    return under


def _levels(kind: str, name: str, stored: dict) -> dict:
    """The verification 'tolerances' of one output, in the checker's tolerance format."""
    t = {m: {"tol": LEVEL} for m in ("max_rel", "norm")}
    t["nmse"] = {"tol": LEVEL ** 2}
    if kind == "logits":
        t["top1"] = {"tol": 0.0}
        t["logit_eps"] = TIE * max(1.0, float(np.max(np.abs(stored[name]))) if stored[name].size else 1.0)
    elif kind in ("indices", "routing_weights"):
        stem = name[: -len("topk_idx")] if kind == "indices" else name[: -len("topk_weight")]
        scores = stored.get(stem + "router_scores")
        scale = float(np.max(np.abs(scores))) if scores is not None and scores.size else 1.0
        t = {"mismatch": {"tol": 0.0}} if kind == "indices" else t
        t["margin_eps"] = TIE * scale
    elif kind == "tokens":
        t = {"mismatch": {"tol": 0.0}, "logit_eps": TIE}
    return t


JUDGED = ("nmse", "max_rel", "norm", "top1", "mismatch")


def compare_values(kind: str, entry: dict, stored: dict, new: dict) -> tuple[list, dict | None, int, tuple | None]:
    """Stored against regenerated values of one case -> (differences, largest, not_compared,
    least compared (fraction, output, compared, positions) or None)."""
    diffs, largest, least = [], None, None
    names = [o["name"] for o in entry["outputs"]]
    aux = [n for n in stored if n not in names]
    missing = [n for n in list(names) + aux if n not in new]
    extra = [n for n in new if n not in stored]
    if missing or extra:
        diffs.append(Difference("names", (missing + extra)[0],
                                (f"this refimpl does not compute {missing[0]!r}" if missing else
                                 f"this refimpl computes {extra[0]!r}, which the suite does not store")))
        return diffs, None, 0, None
    # the margins after the outputs they belong to: topk_margin after its topk_idx, the rest last
    order = []
    for n in names:
        order.append(n)
        if n.endswith("topk_idx") and n[: -len("topk_idx")] + "topk_margin" in aux:
            order.append(n[: -len("topk_idx")] + "topk_margin")
    order += [a for a in aux if a not in order]
    # what a float64 near-tie decided otherwise reaches is left out (format/taint.py), read from
    # every routing output before any value is compared
    levels = {n: _levels(output_type(n), n, stored) for n in names}
    taint = taint_mod.Taint(kind, list(names) + aux, entry.get("params"))
    taint_mod.collect(taint, [(n, output_type(n)) for n in names if stored[n].shape == new[n].shape],
                      stored, new, levels)
    stream_compared = None
    left_out = 0
    for name in order:
        e, c = stored[name], new[name]
        if e.shape != c.shape:
            diffs.append(Difference("shape", name, f"{name}: shape {list(c.shape)} here, "
                                                   f"{list(e.shape)} in the suite"))
            continue
        typ = output_type(name) if name in names else "margin"
        if typ == "margin":
            if name == "tokens_margin" and stream_compared is not None:
                e, c = e.reshape(-1)[:stream_compared], c.reshape(-1)[:stream_compared]
            else:
                lead = taint.lead(name, e.shape) if kind in CAUSAL_KINDS else e.ndim
                e, c = taint.select(e, name, lead), taint.select(c, name, lead)
            d = _margin_difference(name, e, c, stored, diffs)
            if d is not None and (largest is None or d["ratio"] > largest["ratio"]):
                largest = d
            continue
        if typ in ("continuous", "logits") and np.array_equal(e, c):
            continue  # identical (the relative metrics of an all-zero tensor are not defined)
        tols = levels[name]
        c_idx = None
        if typ == "routing_weights":
            c_idx = new[name[: -len("topk_weight")] + "topk_idx"]
        vals, judged = metrics.compare(name, typ, c, e, stored, tols, taint, c_idx)
        if typ == "tokens":
            stream_compared = vals.get("compared")
        for m in judged:
            if m not in JUDGED or m not in vals:
                continue
            v, tol = vals[m], tols[m]["tol"]
            ratio = v / tol if tol > 0 else (math.inf if v > 0 else 0.0)
            if largest is None or ratio > largest["ratio"]:
                largest = {"output": name, "metric": m, "value": v, "ratio": ratio}
            if not v <= tol:
                diffs.append(Difference("value", name, f"{name}: {m} {v:.3g} > {tol:.3g}"))
        left_out += vals.get("not_compared", 0)
        n, of = vals.get("compared"), vals.get("positions")
        if of:
            frac = n / of
            if least is None or frac < least[0]:
                least = (frac, name, n, of)
    return diffs, largest, left_out, least


def _margin_difference(name, e, c, stored, diffs) -> dict | None:
    """A margin (the gap a routing or token decision was taken by) decides forgiveness only by
    comparison with a profile's margin_eps (1e-6 and up): it is compared in absolute terms, at
    TIE times the scale of what it separates (router scores; logits: 1)."""
    if not e.size:
        return None
    stem = name[: -len("topk_margin")] if name.endswith("topk_margin") else None
    scores = stored.get(stem + "router_scores") if stem is not None else None
    scale = float(np.max(np.abs(scores))) if scores is not None and scores.size else 1.0
    tol = TIE * scale
    v = float(np.max(np.abs(c.astype(np.float64) - e.astype(np.float64))))
    if not v <= tol:
        diffs.append(Difference("value", name, f"{name}: max |difference| {v:.3g} > {tol:.3g}"))
    return {"output": name, "metric": "max_abs", "value": v, "ratio": v / tol if tol > 0 else
            (math.inf if v > 0 else 0.0)}


def compare_tolerances(stored: dict, here: dict) -> tuple[list, float, list]:
    """Stored against recalibrated tolerances -> (differences, largest ratio, notes)."""
    diffs, worst, notes = [], 1.0, []
    for profile in tolerances.PROFILES:
        if profile not in stored or profile not in here:
            if profile in here:
                notes.append(f"the suite has no tolerances for profile {profile}")
            continue
        for out, t_here in here[profile].items():
            t_st = stored[profile].get(out, {})
            for m, v in t_here.items():
                got = t_st.get(m)
                a = v["tol"] if isinstance(v, dict) else v
                b = got["tol"] if isinstance(got, dict) else got
                where = f"{profile}/{out}/{m}"
                if isinstance(a, str) or isinstance(b, str) or a is None or b is None:
                    if a != b:
                        diffs.append(Difference("tolerance", where, f"tolerance {where}: {b!r} in "
                                                                    f"the suite, {a!r} here"))
                    continue
                r = max(a, b) / min(a, b) if min(a, b) > 0 else (1.0 if a == b else math.inf)
                worst = max(worst, r)
                if r > TOL_FACTOR:
                    diffs.append(Difference("tolerance", where, f"tolerance {where}: {b:.3g} in the "
                                                                f"suite, {a:.3g} calibrated here "
                                                                f"({r:.3g} times apart > {TOL_FACTOR:g})"))
    return diffs, worst, notes


def verify_case(golden: Golden, cid: str) -> CaseVerdict:
    entry = golden.cases[cid]
    t0 = time.perf_counter()
    verdict = CaseVerdict(cid, entry["kind"], "ok")
    try:
        case = golden.load_case(cid)
        case.expect_under = _expected_under(entry)
        truth, aux, tols = compute(case)
    except OraclesError as e:
        verdict.status, verdict.reason = "error", f"cannot be regenerated here: {e}"
        return verdict
    except Exception as e:  # noqa: BLE001 - refimpl refusing a stored question is this case's verdict
        verdict.status = "error"
        verdict.reason = f"regenerating it raised {type(e).__name__}: {e}"
        return verdict
    stored = golden.expected(cid)
    diffs, largest, tainted, least = compare_values(entry["kind"], entry, stored, {**truth, **aux})
    tdiffs, ratio, _ = compare_tolerances(entry["tolerances"], tols)
    verdict.differences = diffs + tdiffs
    verdict.largest = largest
    verdict.tolerance_ratio = ratio
    verdict.not_compared = tainted
    verdict.seconds = round(time.perf_counter() - t0, 3)
    if verdict.differences:
        verdict.status, verdict.reason = "differs", verdict.differences[0].message
        if len(verdict.differences) > 1:
            verdict.reason += f" (and {len(verdict.differences) - 1} more)"
    elif least is not None and least[0] < MIN_COMPARED:
        verdict.status = "unverified"
        verdict.reason = (f"{least[1]}: only {least[2]} of {least[3]} positions compared: the rest "
                          "follow float64 near-ties that went the other way here")
    elif tainted:
        verdict.reason = f"{tainted} token position(s) after a float64 near-tie not compared"
    return verdict


def run_verify(golden_path: str, only: str | None = None, expect_digest: str | None = None,
               progress=None) -> VerifyReport:
    t0 = time.perf_counter()
    golden = Golden(golden_path, expect_digest=expect_digest)
    ids = [cid for cid in golden.cases if matches(cid, only)]
    if not ids:
        raise OraclesError(f"{golden_path}: no case matches --only {only!r}")
    it = progress(ids, desc="verifying", unit="case") if progress else ids
    verdicts = [verify_case(golden, cid) for cid in it]
    counts = {s: sum(v.status == s for v in verdicts) for s in STATUSES}
    m = golden.manifest
    made = {k: m.get(k) for k in ("format", "generator", "refimpl", "numpy", "ml_dtypes", "python",
                                  "platform")}
    here = {"refimpl": refimpl.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "platform": f"{platform.system()} {platform.machine()}"}
    levels = {"value_max_rel": LEVEL, "value_norm": LEVEL, "value_nmse": LEVEL ** 2, "tie": TIE,
              "tolerance_factor": TOL_FACTOR, "min_compared": MIN_COMPARED}
    return VerifyReport(golden_path, m.get("suite"), golden.digest, golden.question_digest, made,
                        here, levels, verdicts, counts, ok=counts["ok"] == len(verdicts),
                        seconds=round(time.perf_counter() - t0, 3))


def format_verify(rep: VerifyReport) -> str:
    rows = [("case", "kind", "result", "largest difference / level; first difference")]
    for v in rep.cases:
        note = v.reason
        if v.status == "ok":
            big = (f"{v.largest['output']} {v.largest['metric']} {v.largest['value']:.2g}"
                   if v.largest and v.largest["value"] else "identical")
            note = big + (f"; tolerances within {v.tolerance_ratio:.3g}x" if v.tolerance_ratio > 1 else "") \
                + (f"; {v.reason}" if v.reason else "")
        rows.append(tuple(escape(x) for x in (v.id, v.kind, v.status.upper(), note)))
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{a:<{w[0]}}  {b:<{w[1]}}  {c:<{w[2]}}  {d}" for a, b, c, d in rows]
    lines.insert(1, "-" * min(120, sum(w) + 6 + max(len(r[3]) for r in rows)))
    made = rep.made_with
    lines += ["", escape(f"suite made with {made.get('generator')} (refimpl {made.get('refimpl')}, "
                         f"format {made.get('format')}), numpy {made.get('numpy')}, "
                         f"{made.get('platform')}; regenerated here with refimpl "
                         f"{rep.here['refimpl']}, numpy {rep.here['numpy']}, {rep.here['platform']}"),
              f"levels: values max_rel and norm <= {LEVEL:g}, nmse <= {LEVEL ** 2:g}; decisions exact "
              f"unless a margin <= {TIE:g} x scale; tolerances within {TOL_FACTOR:g}x",
              f"suite digest (sha256 of manifest.json): {rep.suite_digest}",
              f"question digest (what the suite asks): {rep.question_digest or 'none (a format ' + str(made.get('format')) + ' suite)'}"]
    c = rep.counts
    lines.append(escape(f"verify {rep.golden}: {c['ok']} verified, {c['differs']} differ, "
                        f"{c['unverified']} unverified, {c['error']} could not be regenerated"))
    return "\n".join(lines)
