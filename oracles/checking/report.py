"""The text report of a check (the JSON report is the report itself; report_html.py renders
it as a page)."""

from __future__ import annotations

from ..format.untrusted import escape


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
        elif r["status"] == "known":
            note = f"{note} [known: {r['known']['reason']}]"
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
    if rep.get("question_digest"):
        lines.append(f"question digest (what the suite asks, the same on every machine): "
                     f"{rep['question_digest']}" + (" (pinned)" if rep.get("pinned") == "question" else ""))
    lines += [f"oracles: {escape(n)}" for n in rep.get("notes", [])]
    extra = [f"{c[s]} {label}" for s, label in (("error", "error(s)"), ("inconclusive", "inconclusive"),
                                                 ("not_followed", "alternative(s) not followed"),
                                                 ("known", "known"), ("fixed", "fixed"))
             if c.get(s)]
    lines.append(escape(f"{rep['candidate']} vs {rep['suite']} ({rep['profile']} profile): {c['pass']} passed, "
                        f"{c['fail']} failed, {c['missing']} missing, {c['skip']} skipped")
                 + "".join(f", {x}" for x in extra))
    return "\n".join(lines)
