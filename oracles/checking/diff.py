"""`oracles diff OLD.json NEW.json`: what changed between two check reports of the same suite
(two engine versions, two engine options, before and after a fix).

Each case's status is read as passing (PASS, NOT_FOLLOWED, FIXED), failing (FAIL, MISSING,
ERROR, INCONCLUSIVE, KNOWN: a known failure still fails) or not checked (SKIP). A case

- **regressed** when it was not failing in OLD (passing or skipped) and fails in NEW;
- was **fixed** when it failed in OLD and passes in NEW;
- **moved** when one of its outputs' error / tolerance (the largest metric over its tolerance,
  report_html.output_ratio) grew or shrank by more than `--factor` (default 10) between the
  two, counting any ratio below 1/1000 as 1/1000 (an output within a thousandth of its
  tolerance has not moved in any way that matters);
- **still fails, differently** when it fails in both at another first output or status;
- is **no longer checked** (skipped in NEW, not in OLD) or **newly checked** (the reverse).

Each line names the case and its first failing output with its numbers. Exit 1 when a case
regressed, 0 otherwise; 2 when a report is unreadable, is not a check report, or the two
checked different suites (their question digests differ, or, for suites without one, their
manifest digests) or with different profiles: one line naming the file and why.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from refimpl import jsonfile

from .. import OraclesError
from ..format.untrusted import escape
from .report_html import output_ratio

PASSING = ("pass", "not_followed", "fixed")
FAILING = ("fail", "missing", "error", "inconclusive", "known")
DEFAULT_FACTOR = 10.0
RATIO_FLOOR = 1e-3


@dataclass
class Change:
    id: str
    kind: str
    old: str  # status in OLD
    new: str  # status in NEW
    detail: str  # the first failing output and its numbers (NEW's, else OLD's)
    output: str | None = None  # moved: the output that moved most
    old_ratio: float | None = None
    new_ratio: float | None = None


@dataclass
class Diff:
    old: str
    new: str
    factor: float
    regressed: list = field(default_factory=list)
    fixed: list = field(default_factory=list)
    moved: list = field(default_factory=list)
    changed: list = field(default_factory=list)  # failing in both, at another output or status
    no_longer_checked: list = field(default_factory=list)
    newly_checked: list = field(default_factory=list)
    only_in_old: list = field(default_factory=list)
    only_in_new: list = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def read_report(path: str) -> dict:
    rep = jsonfile.load(path, OraclesError, allow_nonfinite=True)
    shown = escape(path)
    if not isinstance(rep, dict) or not isinstance(rep.get("cases"), list):
        raise OraclesError(f"{shown}: not an oracles check report (no 'cases' list; write one "
                           "with oracles check --json)")
    for i, r in enumerate(rep["cases"]):
        if not (isinstance(r, dict) and isinstance(r.get("id"), str) and isinstance(r.get("status"), str)
                and isinstance(r.get("outputs", []), list)):
            raise OraclesError(f"{shown}: cases[{i}] is not a case result (id, status, outputs)")
    for key in ("suite_digest", "profile"):
        if not isinstance(rep.get(key), str):
            raise OraclesError(f"{shown}: not an oracles check report (no {key!r})")
    return rep


def _same_suite(old: dict, new: dict, po: str, pn: str) -> None:
    qo, qn = old.get("question_digest"), new.get("question_digest")
    if qo and qn:
        if qo != qn:
            raise OraclesError(f"{escape(po)} and {escape(pn)} checked different suites (question "
                               f"digests {escape(qo)[:16]}... and {escape(qn)[:16]}...)")
    elif old["suite_digest"] != new["suite_digest"]:
        raise OraclesError(f"{escape(po)} and {escape(pn)} checked different suites (suite digests "
                           f"{escape(old['suite_digest'])[:16]}... and {escape(new['suite_digest'])[:16]}...)")
    if old["profile"] != new["profile"]:
        raise OraclesError(f"{escape(po)} and {escape(pn)} were checked with different profiles "
                           f"({escape(old['profile'])} and {escape(new['profile'])}): errors over "
                           "tolerances are not comparable")


def _detail(r: dict) -> str:
    return str(r.get("reason") or r.get("first_failure") or "")


def _ratios(r: dict) -> dict:
    out = {}
    for o in r.get("outputs", []):
        if isinstance(o, dict) and isinstance(o.get("name"), str) and o.get("status") in ("pass", "fail"):
            try:
                out[o["name"]] = output_ratio(o)
            except (TypeError, ValueError):
                continue
    return out


def _moved(ro: dict, rn: dict, factor: float):
    """The output whose error / tolerance moved most, if beyond factor -> (name, old, new)."""
    best = None
    a, b = _ratios(ro), _ratios(rn)
    for name in a:
        if name not in b:
            continue
        x, y = max(a[name], RATIO_FLOOR), max(b[name], RATIO_FLOOR)
        if math.isinf(x) or math.isinf(y):
            continue
        f = max(x / y, y / x)
        if f > factor and (best is None or f > best[0]):
            best = (f, name, a[name], b[name])
    return best


def diff(old_path: str, new_path: str, factor: float = DEFAULT_FACTOR) -> Diff:
    if not (factor > 1 and math.isfinite(factor)):
        raise OraclesError(f"--factor {factor!r}: must be a number above 1")
    old, new = read_report(old_path), read_report(new_path)
    _same_suite(old, new, old_path, new_path)
    d = Diff(old_path, new_path, factor)
    o_cases = {r["id"]: r for r in old["cases"]}
    n_cases = {r["id"]: r for r in new["cases"]}
    d.only_in_old = [c for c in o_cases if c not in n_cases]
    d.only_in_new = [c for c in n_cases if c not in o_cases]
    for cid, rn in n_cases.items():
        ro = o_cases.get(cid)
        if ro is None:
            continue
        so, sn = ro["status"], rn["status"]
        kind = str(rn.get("kind", ""))
        if sn in FAILING and so not in FAILING:
            d.regressed.append(Change(cid, kind, so, sn, _detail(rn)))
        elif so in FAILING and sn in PASSING:
            d.fixed.append(Change(cid, kind, so, sn, _detail(ro)))
        elif so in FAILING and sn in FAILING and (so, ro.get("first_failure")) != (sn, rn.get("first_failure")):
            d.changed.append(Change(cid, kind, so, sn, _detail(rn)))
        elif sn == "skip" and so != "skip":
            d.no_longer_checked.append(Change(cid, kind, so, sn, _detail(rn)))
        elif so == "skip" and sn != "skip":
            d.newly_checked.append(Change(cid, kind, so, sn, _detail(rn)))
        m = _moved(ro, rn, factor)
        if m is not None:
            d.moved.append(Change(cid, kind, so, sn, _detail(rn) or _detail(ro), m[1], m[2], m[3]))
    return d


def format_diff(d: Diff) -> str:
    lines = []

    def section(title, changes, fmt):
        if changes:
            lines.append(f"{title} ({len(changes)}):")
            lines.extend("  " + escape(fmt(c)) for c in changes)

    arrow = (lambda c: f"{c.id}  {c.old.upper()} -> {c.new.upper()}" + (f"  {c.detail}" if c.detail else ""))
    section("regressed", d.regressed, arrow)
    section("fixed", d.fixed, lambda c: f"{c.id}  {c.old.upper()} -> {c.new.upper()}  (was: {c.detail})")
    section(f"moved beyond {d.factor:g}x in error / tolerance", d.moved,
            lambda c: (f"{c.id}  {c.output}: {c.old_ratio:.3g} -> {c.new_ratio:.3g} "
                       f"({'worse' if max(c.new_ratio, RATIO_FLOOR) > max(c.old_ratio, RATIO_FLOOR) else 'better'})"
                       f"  {c.old.upper()} -> {c.new.upper()}" + (f"  {c.detail}" if c.detail else "")))
    section("still failing, differently", d.changed, arrow)
    section("no longer checked", d.no_longer_checked, arrow)
    section("newly checked", d.newly_checked, arrow)
    if d.only_in_old:
        lines.append(escape(f"only in {d.old}: {', '.join(d.only_in_old)}"))
    if d.only_in_new:
        lines.append(escape(f"only in {d.new}: {', '.join(d.only_in_new)}"))
    lines.append(escape(f"{d.old} -> {d.new}: {len(d.regressed)} regressed, {len(d.fixed)} fixed, "
                        f"{len(d.moved)} moved beyond {d.factor:g}x"))
    return "\n".join(lines)
