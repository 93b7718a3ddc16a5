"""The checker: a candidate's outputs against a golden suite, with the profile's tolerances.

A candidate is either a directory (CANDIDATE/cases/<id>/outputs.safetensors, the file route for
engines in any language) or a Python adapter (adapters.py). Per case, outputs are compared in
dataflow order; the first output that exceeds its tolerance is named, with a one-line command
that reproduces it. Missing required outputs fail; missing intermediates are listed as not
provided; NaN or Inf never passes; a wrong shape or dtype fails with what was expected.
"""

from __future__ import annotations

import os
import queue
import shlex
import threading
import weakref

import ml_dtypes
import numpy as np

from . import OraclesError, metrics, taint as taint_mod, tolerance, untrusted
from .golden import Golden, read_tensors
from .schema import CAUSAL_KINDS, matches
from .untrusted import escape

FLOAT_DTYPES = (np.dtype(np.float64), np.dtype(np.float32), np.dtype(np.float16),
                np.dtype(ml_dtypes.bfloat16))
CONTINUOUS_METRICS, LOGIT_METRICS = metrics.CONTINUOUS_METRICS, metrics.LOGIT_METRICS


DEFAULT_CASE_TIMEOUT = 600.0  # seconds per call into an adapter (supports, run); --case-timeout
MIN_COMPARED = 0.5  # a case judging fewer of its required outputs' positions is INCONCLUSIVE


class CaseError(Exception):
    """What went wrong running one case in a candidate (it raised, exited, returned something
    that is not outputs, or did not return in time): the case's one-line ERROR reason."""


class AdapterTimeout(Exception):
    """A call into an adapter did not return in time (the worker thread is abandoned)."""


class DirCandidate:
    """The file route: CANDIDATE/cases/<id>/outputs.safetensors (a regular file inside
    CANDIDATE, checked like a golden suite's files)."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        if not os.path.isdir(self.path):
            raise OraclesError(f"{self.path}: candidate directory not found")
        self.label = self.path

    def supports(self, case_id, load):
        """True, or the reason in CANDIDATE/cases/<id>/skip.txt (an engine that cannot run the
        case, e.g. cannot express its schedule, says so there): its first line, printable
        characters only, at most 200."""
        p = os.path.join(self.path, "cases", case_id, "skip.txt")
        if not os.path.isfile(p):
            return True
        with open(p, "rb") as f:
            line = f.read(4096).decode("utf-8", "replace").splitlines()[:1]
        reason = "".join(ch for ch in (line[0] if line else "") if ch.isprintable()).strip()[:200]
        return reason or "skipped (empty skip.txt)"

    def outputs(self, case_id, load):
        p = untrusted.inside(self.path, f"cases/{case_id}/outputs.safetensors",
                             f"candidate outputs of case {case_id!r}", missing_ok=True)
        if p is None:
            return None
        return read_tensors(p)


class _Worker:
    """One daemon thread that makes every call into an adapter (import, factory, supports, run),
    so that the checker can stop waiting for one that never returns. All calls run on this same
    thread, in order: engines that keep per-thread state (CUDA contexts, MLX streams) see one
    thread. A Python thread cannot be killed: after a timeout the worker is abandoned (`stuck`)
    and no further call is made; the process exits without waiting for it."""

    def __init__(self):
        self.jobs = queue.Queue()
        self.stuck = None
        threading.Thread(target=self._loop, name="oracles-adapter", daemon=True).start()

    def _loop(self):
        while True:
            job = self.jobs.get()
            if job is None:  # close(): the candidate is gone
                return
            fn, box, done = job
            try:
                box["value"] = fn()
            except BaseException as e:  # noqa: BLE001 - SystemExit included; handed to the caller
                box["error"] = e
            done.set()
            del job, fn, box, done  # hold nothing of the candidate between calls

    def close(self) -> None:
        self.jobs.put(None)

    def call(self, fn, timeout: float, what: str):
        """fn() on the worker -> its value; its exception re-raised here; AdapterTimeout when it
        does not return within `timeout` seconds."""
        if self.stuck:
            raise AdapterTimeout(f"not run: {self.stuck}")
        box, done = {}, threading.Event()
        self.jobs.put((fn, box, done))
        if not done.wait(timeout):
            self.stuck = f"{what} did not return within {timeout:g} s"
            raise AdapterTimeout(self.stuck)
        if "error" in box:
            raise box["error"]
        return box["value"]


def call_adapter(worker, fn, timeout, what):
    """fn() with the timeout (worker None or timeout 0: inline, no timeout). KeyboardInterrupt
    (the user's) propagates; everything else, SystemExit included, becomes a CaseError."""
    try:
        return worker.call(fn, timeout, what) if worker is not None else fn()
    except KeyboardInterrupt:
        raise
    except AdapterTimeout as e:
        raise CaseError(f"timed out: {e}") from None
    except SystemExit as e:
        raise CaseError(f"{what} called sys.exit({_text(e.code)}): an adapter must return or raise") from None
    except BaseException as e:  # noqa: BLE001 - an engine crashing on a case fails that case
        raise CaseError(f"{what} raised {type(e).__name__}: {_text(e)}") from None


def _text(x, limit: int = 2000) -> str:
    """str(x) from an adapter, whatever its __str__ does, cut to `limit` characters."""
    try:
        t = str(x)
    except Exception:  # noqa: BLE001
        t = f"<{type(x).__name__} whose str() raised>"
    return t if len(t) <= limit else t[:limit] + f"... ({len(t) - limit} more characters)"


def _verdict(ok):
    """supports()'s answer -> True, or the reason to skip (on the adapter's thread: any
    __bool__ or __str__ it runs is the adapter's)."""
    if ok is True or (isinstance(ok, np.bool_) and bool(ok)):
        return True
    return _text(ok) if ok else "not supported"


class AdapterCandidate:
    """A Python engine: `factory()` returns an object with supports(case) and run(case). Every
    call runs on one worker thread with a per-call timeout (`timeout` seconds; 0 runs calls
    inline in the calling thread, without a timeout)."""

    def __init__(self, adapter, label: str, timeout: float = DEFAULT_CASE_TIMEOUT, worker=None):
        self.adapter, self.label, self.timeout = adapter, label, timeout
        self.worker = worker if worker is not None or not timeout else _Worker()
        if self.worker is not None:  # its thread ends with the candidate (unless it is stuck)
            weakref.finalize(self, self.worker.close)

    @property
    def stuck(self):
        return self.worker.stuck if self.worker is not None else None

    def _call(self, fn, what):
        return call_adapter(self.worker, fn, self.timeout, what)

    def supports(self, case_id, load):
        case, adapter = load(), self.adapter
        return self._call(lambda: _verdict(adapter.supports(case)), "supports()")

    def outputs(self, case_id, load):
        case, adapter = load(), self.adapter
        out = self._call(lambda: _as_outputs(adapter.run(case)), "run()")
        for k, v in out.items():
            if not isinstance(k, str):
                raise CaseError(f"run() returned an output named {k!r}, not a string")
            if v.dtype.kind not in "biuf" and v.dtype != ml_dtypes.bfloat16:
                raise CaseError(f"run() returned output {k!r} as {v.dtype} values, not numbers")
        return out


def _as_outputs(out):
    """run()'s result -> {name: numpy array} (on the adapter's thread: torch calls stay there)."""
    if not isinstance(out, dict):
        raise TypeError(f"run() returned {type(out).__name__}, not a dict of arrays")
    res = {}
    for k, v in out.items():
        try:
            res[k] = _as_numpy(v)
        except Exception as e:  # noqa: BLE001 - a value that is no array
            raise TypeError(f"output {k!r}: {type(v).__name__} is not an array ({e})") from None
    return res


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
        if m not in values:
            continue
        if m not in tols:
            bad.append(f"{m} {values[m]:.3g}: the suite has no tolerance for it")
        elif not values[m] <= tols[m]["tol"]:
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
    if not any(m in vals for m in names):
        n = vals.get("positions")
        out.update(status="not_compared", message=(f"not compared: all {n} positions" if n else
                   "not compared: every token") + " follow forgiven routing differences")
        return
    bad = _metric_failures(vals, tols, names)
    if vals.get("unexplained"):
        bad.append(f"{vals['unexplained']} near-tie token(s) routed to experts that its own router "
                   f"input ({name[: -len('topk_idx')]}ffn_norm) does not select within the "
                   "profile's router arithmetic (not a rounding difference)")
    out["status"] = "fail" if bad else "pass"
    if bad:
        out["message"] = "; ".join(bad)
    elif vals.get("forgiven"):
        out["message"] = f"{vals['forgiven']} near-tie token(s) forgiven"


def check_case(golden: Golden, entry: dict, candidate, profile: str,
               min_compared: float = MIN_COMPARED, conditioner=None) -> dict:
    cid = entry["id"]
    res = {"id": cid, "kind": entry["kind"], "pins": entry["pins"],
           "conventions": entry.get("conventions", {}), "outputs": [], "not_provided": []}
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
            res.update(status="skip", reason=ok)
            return res
        cand = candidate.outputs(cid, load)
    except CaseError as e:
        res.update(status="error", reason=str(e), first_failure=None)
        return res
    if cand is None:
        res.update(status="missing", reason="no outputs.safetensors for this case",
                   first_failure=None)
        return res
    outputs = [{**o, "required": o["required"] or o["name"] in required} for o in entry["outputs"]]
    def model():
        case = load()
        return None if case.weights is None or case.config is None else (case.weights, case.config)
    expected = golden.expected(cid)
    cond = None if conditioner is None else conditioner(entry, load, expected)
    res.update(judge(entry["kind"], outputs, expected, cand, tols_all, min_compared,
                     params=entry.get("params"), profile=profile, model=model, conditioner=cond))
    return res


def judge(kind: str, outputs: list, expected: dict, cand: dict, tols_all: dict,
          min_compared: float = MIN_COMPARED, params: dict | None = None,
          profile: str | None = None, model=None, conditioner=None) -> dict:
    """Compare a candidate's outputs with the expected ones, in dataflow order.
    outputs: [{name, type, required}] -> {status, first_failure, reason, outputs, not_provided,
    checked, compared}. The routing outputs are read first (taint.collect): a forgiven near-tie
    the candidate resolved the other way leaves out what it reaches (taint.Layout); a routing
    output the candidate does not give (logits only) is taken from the golden's margins: every
    near-tie token may have gone either way. A case that judged less than `min_compared` of its
    required outputs' token positions is INCONCLUSIVE, never PASS. params: the case's (a
    schedule's shared prefixes carry a difference from one request to another). model() ->
    (checkpoint tensors, Config) or None: with the profile, a near-tie the candidate resolved
    in a way its own reported router input does not explain fails (routing.explainer).
    conditioner (conditioned.Conditioner, or None): the expected values are recomputed with the
    candidate's routing where it resolved a forgiven near-tie the other way, and every
    position is judged (taint.settle); without one, what such a difference reaches is left out."""
    res = {"outputs": [], "not_provided": []}
    first = None
    explain = None
    if model is not None and profile is not None:
        from .routing import explainer
        cache = {}

        def once():
            if "m" not in cache:
                cache["m"] = model()
            return cache["m"]
        explain = explainer(cand, once, profile)
    scored = [o["name"] for o in outputs if o["required"] and o["type"] in ("logits", "continuous")]
    settled = taint_mod.settle(kind, [(o["name"], o["type"]) for o in outputs], expected, cand,
                               tols_all, params, explain, conditioner, scored)
    taint, expected = settled.taint, settled.expected
    assumed = any(not f.reported for f in taint.flips)
    if settled.source:
        res["conditioned"] = {"forced": settled.forced, "recomputations": settled.recomputations,
                              "routing": settled.source, **({"note": settled.note} if settled.note else {})}
    worst = None  # (fraction, compared, positions, exact, name) of the least-compared required output
    checked = 0
    any_position = False  # some required output compared at least one position
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
        if o["required"] and out["status"] in ("pass", "not_compared"):
            v = out.get("metrics", {})
            if out["status"] == "pass":
                checked += 1
            n, of, exact = v.get("compared"), v.get("positions"), v.get("exact_tie_positions", 0)
            if out["status"] == "not_compared" and of is None:
                n, of = 0, 1
            any_position |= out["status"] == "pass" and (of is None or n > 0)
            if of is not None:
                # positions left out because of exact ties decided the other way (a tie-break
                # convention) do not count against the case; near-tie ones do
                f = n / (of - exact) if of > exact else 1.0
                if worst is None or f < worst[0]:
                    worst = (f, n, of, exact, name)
    left = [(o["name"], o["metrics"]["not_compared"], o["metrics"]["positions"])
            for o in res["outputs"] if o.get("metrics", {}).get("not_compared")]
    if left:
        name, n, of = max(left, key=lambda x: x[1] / x[2])
        res["not_compared"] = (f"{n} of {of} position(s) of {name} (the most of {len(left)} "
                               "output(s)) downstream of a forgiven routing difference")
    res["checked"] = checked
    if worst is not None:
        res["compared"] = {"output": worst[4], "positions": worst[1], "of": worst[2],
                           "exact_tie_positions": worst[3], "fraction": round(worst[0], 6)}
    res["first_failure"] = first["name"] if first else None
    if first:
        res["status"] = "fail"
        res["reason"] = f"{first['name']}: {first['message']}"
    elif worst is not None and worst[0] < min_compared:
        res["status"] = "inconclusive"
        res["reason"] = (f"{worst[4]}: only {worst[1]} of {worst[2]} positions compared (minimum "
                         f"{min_compared:.0%}); the rest follow near-tie routing the candidate "
                         + ("did not report" if assumed else "resolved the other way"))
    elif not any_position and any(o["required"] for o in outputs):
        res["status"] = "inconclusive"
        res["reason"] = "no position of any required output was compared"
    else:
        res["status"] = "pass"
    return res


STATUSES = ("pass", "fail", "missing", "error", "inconclusive", "skip", "not_followed")


def run_check(golden_path: str, candidate, profile: str = "float32", only: str | None = None,
              repro_base: str | None = None, progress=None, expect_digest: str | None = None,
              allow_empty: bool = False, allow_inconclusive: bool = False,
              min_compared: float = MIN_COMPARED, conditioner=None, mode: str | None = None,
              any_profile: bool = False) -> dict:
    """Check every case (matching `only`) -> the report (a JSON-able dict). ok is False when a
    case fails, is missing or errs, when one is inconclusive (unless allow_inconclusive), and
    when no required output was compared at all (unless allow_empty). conditioner(entry,
    load, expected) -> a conditioned.Conditioner or None: the expected values follow the candidate's
    routing where it resolved a forgiven near-tie the other way (conditioned.conditioner_for,
    which `oracles check` passes; it runs refimpl's forward pass). mode: the profile that
    emulates the mode the candidate ran in (engine.json, the adapter's `mode`), when known: a
    profile emulating FP8 weights or an FP8 KV cache the run did not have is refused unless
    any_profile, and the report says how the profile relates to the mode (profiles.py)."""
    from .profiles import refused, relation

    if profile not in tolerance.PROFILES:
        raise OraclesError(f"profile {profile!r} is not one of {', '.join(tolerance.PROFILES)}")
    why = refused(profile, mode)
    if why and not any_profile:
        raise OraclesError(f"--profile {profile}: {why}; check it with --profile {mode} (the "
                           "profile of its mode), or pass --any-profile to judge it anyway "
                           "(the report then says it is not this run's verdict)")
    golden = Golden(golden_path, expect_digest=expect_digest)
    entries = [e for e in golden.manifest["cases"] if matches(e["id"], only)]
    if not entries:
        raise OraclesError(f"{golden_path}: no case matches --only {only!r}")
    for e in entries:  # every case's contract, before running anything
        golden.required(e["id"])
    results = []
    it = progress(entries, desc="checking", unit="case") if progress else entries
    for entry in it:
        stuck = getattr(candidate, "stuck", None)
        if stuck:
            r = {"id": entry["id"], "kind": entry["kind"], "pins": entry["pins"],
                 "conventions": entry.get("conventions", {}), "outputs": [], "not_provided": [],
                 "status": "error", "first_failure": None,
                 "reason": f"not run: the adapter is stuck ({stuck})"}
        else:
            r = check_case(golden, entry, candidate, profile, min_compared, conditioner)
        if r["status"] in ("fail", "missing", "error", "inconclusive") and repro_base and not stuck:
            r["repro"] = f"{repro_base} --only {shlex.quote(r['id'])} --profile {profile}"
        results.append(r)
    _mark_alternatives(results)
    counts = {s: sum(r["status"] == s for r in results) for s in STATUSES}
    checked = sum(r.get("checked", 0) for r in results)
    empty = checked == 0
    ok = (counts["fail"] == 0 and counts["missing"] == 0 and counts["error"] == 0
          and (allow_inconclusive or counts["inconclusive"] == 0) and (allow_empty or not empty))
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
    return {"golden": golden_path, "suite": golden.manifest.get("suite"),
            "suite_digest": golden.digest, "candidate": candidate.label,
            "profile": profile, "counts": counts, "checked_outputs": checked, "ok": ok,
            "conditioning": conditioner is not None, "mode": mode,
            **({"profile_vs_mode": versus} if versus else {}),
            "min_compared": min_compared, "notes": notes,
            "conventions": conventions_summary(results), "cases": results}


def _mark_alternatives(results) -> None:
    """Conventions cases: when one alternative of a topic passes, the others are conventions
    this candidate does not follow (status not_followed), not failures; so are the ones too
    close to call in this profile (inconclusive: the passing one decides the label). When none
    passes, they all stay failures (or inconclusive)."""
    passed = {t for r in results if r["status"] == "pass" for t in r.get("conventions", {})}
    for r in results:
        if r["status"] in ("fail", "inconclusive") and any(t in passed for t in r.get("conventions", {})):
            if r["status"] == "inconclusive":
                r["reason"] = "inconclusive: " + r["reason"]
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
    """The text report. Everything that came from a file (case ids, kinds, reasons, names) is
    escaped (untrusted.escape): one report line per case, whatever the suite holds."""
    rows = [("case", "kind", "result", "first failing output / note")]
    for r in rep["cases"]:
        note = r.get("reason", "")
        if r["status"] == "pass":
            fg = [o.get("message") for o in r["outputs"] if o.get("message")]
            note = "; ".join(fg)
            if r.get("not_compared"):
                note = (note + "; " if note else "") + r["not_compared"] + " not compared"
            if r.get("conditioned"):
                cd = r["conditioned"]
                note = (note + "; " if note else "") + (
                    f"reference recomputed on its routing at {cd['forced']} token(s) "
                    f"({cd['routing']})")
            if r["not_provided"]:
                note = (note + "; " if note else "") + f"{len(r['not_provided'])} intermediate(s) not provided"
        rows.append(tuple(escape(x) for x in (r["id"], r["kind"], r["status"].upper(), note)))
    w = [max(len(row[i]) for row in rows) for i in range(3)]
    lines = [f"{a:<{w[0]}}  {b:<{w[1]}}  {c:<{w[2]}}  {d}" for a, b, c, d in rows]
    lines.insert(1, "-" * min(120, sum(w) + 6 + max(len(r[3]) for r in rows)))
    repro = [r for r in rep["cases"] if r.get("repro")]
    if repro:
        lines.append("")
        lines.append("reproduce:")
        lines += [f"  {escape(r['repro'])}" for r in repro]
    if rep["conventions"]:
        lines.append("")
        lines.append("conventions this candidate follows:")
        for topic, alts in rep["conventions"].items():
            passed = [a for a, ok in alts.items() if ok]
            lines.append(escape(f"  {topic}: {', '.join(passed) if passed else 'none of ' + ', '.join(alts)}"))
    c = rep["counts"]
    lines.append("")
    lines.append(f"suite digest (sha256 of manifest.json): {rep['suite_digest']}")
    lines += [f"oracles: {escape(n)}" for n in rep.get("notes", [])]
    extra = [f"{c[s]} {label}" for s, label in (("error", "error(s)"), ("inconclusive", "inconclusive"),
                                                 ("not_followed", "alternative(s) not followed")) if c[s]]
    lines.append(escape(f"{rep['candidate']} vs {rep['suite']} ({rep['profile']} profile): {c['pass']} passed, "
                        f"{c['fail']} failed, {c['missing']} missing, {c['skip']} skipped")
                 + "".join(f", {x}" for x in extra))
    return "\n".join(lines)
