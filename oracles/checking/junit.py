"""The check report as JUnit XML (`oracles check ... --junit FILE`), for CI systems that show
test results (Jenkins, GitLab, GitHub Actions' JUnit reporters, Azure Pipelines).

Built from the report dict alone (run_check's, the one `--json` writes), in the structure of
the JUnit XML schemas these systems read (Jenkins' junit-10.xsd, Ant's JUnit task):

    <testsuites name tests failures errors time>
      <testsuite name="oracles.<kind>" tests failures errors skipped time timestamp>   one per kind
        <properties><property name value/>...</properties>     suite, digests, candidate, profile
        <testcase name="<case id>" classname="oracles.<kind>" time>                    one per case
          <failure message type>...</failure> | <error ...> | <skipped message/>, <system-out>

A case's element follows its status: PASS and NOT_FOLLOWED pass (a note in system-out); FAIL,
MISSING and FIXED are failures (FIXED: unless --allow-fixed) and INCONCLUSIVE one unless
--allow-inconclusive, whose message is the first failing output and its numbers; ERROR is an
error; SKIP is skipped with its reason, and KNOWN is skipped with the known entry's reason,
link and the failure it excuses. So a run's failures and errors in the XML are exactly the
cases that make `oracles check` exit 1. Text from files is escaped (untrusted.escape): XML
1.0 has no place for control characters.
"""

from __future__ import annotations

import datetime
import xml.etree.ElementTree as ET

from ..format.untrusted import escape


def _s(x) -> str:
    return escape("" if x is None else x)


def _outputs_text(r: dict) -> str:
    lines = []
    if r.get("pins"):
        lines.append(f"pins: {r['pins']}")
    for o in r.get("outputs", []):
        if o.get("status") == "fail":
            lines.append(f"{o['name']}: {o.get('message', '')}")
    if r.get("compared"):
        c = r["compared"]
        lines.append(f"compared: {c.get('output')} {c.get('positions')} of {c.get('of')} positions")
    if r.get("repro"):
        lines.append(f"reproduce: {r['repro']}")
    return "\n".join(_s(x) for x in lines)


def _element(r: dict, allow_inconclusive: bool, allow_fixed: bool):
    """-> (tag, type, message, text) of a case's result element, or None when it passes."""
    st = r["status"]
    reason = r.get("reason", "")
    if st in ("fail", "missing") or (st == "inconclusive" and not allow_inconclusive) or \
            (st == "fixed" and not allow_fixed):
        return "failure", st.upper(), reason, _outputs_text(r)
    if st == "error":
        return "error", "ERROR", reason, _outputs_text(r)
    if st == "skip":
        return "skipped", "SKIP", reason, ""
    if st == "inconclusive":
        return "skipped", "INCONCLUSIVE", f"inconclusive (allowed): {reason}", _outputs_text(r)
    if st == "known":
        k = r.get("known", {})
        return ("skipped", "KNOWN", f"known {k.get('status', '').upper()}: {k.get('reason', '')} "
                f"({k.get('link', '')}); {reason}", _outputs_text(r))
    return None


def _note(r: dict, allow_fixed: bool) -> str:
    st = r["status"]
    if st == "not_followed":
        return "not followed: another alternative of this convention passes"
    if st == "fixed":
        return f"FIXED (allowed): {r.get('reason', '')}" if allow_fixed else ""
    notes = [o["message"] for o in r.get("outputs", []) if o.get("status") != "fail" and o.get("message")]
    if r.get("not_compared"):
        notes.append(f"{r['not_compared']} not compared")
    if r.get("not_provided"):
        notes.append(f"{len(r['not_provided'])} intermediate(s) not provided")
    return "; ".join(notes)


def render(rep: dict, allow_inconclusive: bool = False, allow_fixed: bool = False,
           timestamp: str | None = None) -> str:
    """The JUnit XML document (a string, UTF-8 declared)."""
    timestamp = timestamp or datetime.datetime.now().replace(microsecond=0).isoformat()
    kinds = {}
    for r in rep["cases"]:
        kinds.setdefault(r["kind"], []).append(r)
    root = ET.Element("testsuites")
    totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "time": 0.0}
    props = [("suite", rep.get("suite")), ("golden", rep.get("golden")),
             ("suite_digest", rep.get("suite_digest")), ("question_digest", rep.get("question_digest")),
             ("candidate", rep.get("candidate")), ("profile", rep.get("profile"))]
    if rep.get("known"):
        props.append(("known", rep["known"].get("file")))
    for kind, results in kinds.items():
        ts = ET.SubElement(root, "testsuite")
        pe = ET.SubElement(ts, "properties")
        for k, v in props:
            if v is not None:
                ET.SubElement(pe, "property", name=k, value=_s(v))
        n = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "time": 0.0}
        for r in results:
            secs = float(r.get("seconds", 0.0) or 0.0)
            tc = ET.SubElement(ts, "testcase", name=_s(r["id"]), classname=_s(f"oracles.{kind}"),
                               time=f"{secs:.3f}")
            n["tests"] += 1
            n["time"] += secs
            el = _element(r, allow_inconclusive, allow_fixed)
            if el is not None:
                tag, typ, message, text = el
                e = ET.SubElement(tc, tag, message=_s(message))
                if tag != "skipped":
                    e.set("type", typ)
                if text:
                    e.text = text
                n[{"failure": "failures", "error": "errors", "skipped": "skipped"}[tag]] += 1
            note = _note(r, allow_fixed)
            if note:
                ET.SubElement(tc, "system-out").text = _s(note)
        ts.attrib.update(name=_s(f"oracles.{kind}"), tests=str(n["tests"]),
                         failures=str(n["failures"]), errors=str(n["errors"]),
                         skipped=str(n["skipped"]), time=f"{n['time']:.3f}", timestamp=timestamp)
        for k in totals:
            totals[k] += n[k]
    root.attrib.update(name=_s(f"oracles check: {rep.get('candidate')} vs {rep.get('suite')} "
                              f"({rep.get('profile')} profile)"),
                       tests=str(totals["tests"]), failures=str(totals["failures"]),
                       errors=str(totals["errors"]), time=f"{totals['time']:.3f}")
    # (junit-10.xsd has no skipped attribute on testsuites: the suites carry it)
    ET.indent(root, space=" ")
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
