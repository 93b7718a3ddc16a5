"""The check report as one self-contained HTML page (`oracles check ... --html REPORT.html`).

Built from the report dict that check.run_check returns (the same one `--json` writes), so it
needs nothing else: no refimpl, no network, no JavaScript. One file with inline CSS and inline
SVG:

- a header: suite, suite digest, golden directory, candidate (engine), profile, verdict, counts;
- the summary table: one row per case (id, kind, result, first failing output or note);
- for each failing or inconclusive case, a chart of error / tolerance per output in dataflow
  order on a log scale: the 1.0 line is the tolerance, the first divergence is marked, outputs
  that failed without a metric (missing, wrong shape or dtype, NaN) sit on the top edge, exact
  outputs on the bottom edge; then the reproduce command and the per-output table.

Everything that comes from a file (case ids, names, reasons, paths, commands) is HTML-escaped.
"""

from __future__ import annotations

import hashlib
import html
import json
import math
import os

from refimpl.atomic import write_text

from .. import OraclesError

# statuses that get a chart (the ones a person has to look into)
CHARTED = ("fail", "inconclusive", "known")
STATUS_COLOURS = {"pass": "#1e7b34", "fail": "#b3261e", "missing": "#b35c00", "skip": "#6b6b6b",
                  "not_followed": "#4a6b8a", "inconclusive": "#9a6a00", "error": "#7b1fa2",
                  "known": "#6b5b95", "fixed": "#b3261e"}
FAIL_COLOUR = "#d0021b"  # failing outputs in the chart (and its legend swatch)
PASS_COLOUR = "#1f5fbf"
LOG_FLOOR, LOG_CEIL = -8, 12  # the chart never spans more than 1e-8 .. 1e12

CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", "DejaVu Sans", sans-serif;
       margin: 24px auto; max-width: 1200px; padding: 0 16px; color: #1b1b1b; background: #fff; }
h1 { font-size: 22px; margin: 0 0 12px; } h2 { font-size: 18px; margin: 28px 0 8px; }
h3 { font-size: 15px; margin: 22px 0 4px; font-family: ui-monospace, "DejaVu Sans Mono", monospace; }
table { border-collapse: collapse; margin: 6px 0 12px; }
th, td { text-align: left; padding: 3px 10px; border-bottom: 1px solid #e3e3e3; vertical-align: top; }
th { background: #f4f4f4; }
table.meta th { background: none; color: #555; font-weight: normal; padding-left: 0; }
td.id, td.mono, code, pre { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 13px; }
.status { font-weight: bold; white-space: nowrap; }
.verdict { font-size: 16px; font-weight: bold; }
pre { background: #f6f6f6; padding: 8px 10px; overflow-x: auto; border-radius: 4px; }
.case { border-top: 1px solid #ddd; margin-top: 18px; }
.reason { color: #333; } .pins { color: #555; font-style: italic; }
.scroll { overflow-x: auto; }
svg.chart { display: block; margin: 8px 0; background: #fff; }
details { margin: 6px 0 12px; } summary { cursor: default; color: #333; }
.legend span { display: inline-block; margin-right: 16px; }
.swatch { display: inline-block; width: 12px; height: 12px; vertical-align: -1px; margin-right: 4px; }
"""


def esc(value) -> str:
    """Text from a report (ultimately from files): escaped for HTML text and attributes."""
    return html.escape(str(value), quote=True)


# ---------------------------------------------------------------------------------------------
# Numbers
# ---------------------------------------------------------------------------------------------

def output_ratio(out: dict) -> float:
    """error / tolerance of one output: the largest metric / its tolerance (inf when a metric
    exceeds a tolerance of 0, 0 when every metric is 0). An output that failed without metrics
    (missing, wrong shape or dtype, NaN/Inf) is inf; one that passed without metrics is 0."""
    tols, vals = out.get("tol") or {}, out.get("metrics") or {}
    ratios = []
    for m, tol in tols.items():
        v = vals.get(m)
        if not isinstance(v, (int, float)) or not isinstance(tol, (int, float)):
            continue
        if tol > 0:
            ratios.append(v / tol)
        else:
            ratios.append(math.inf if v > 0 else 0.0)
    if not ratios:
        return math.inf if out.get("status") == "fail" else 0.0
    return max(ratios)


def suite_digest(rep: dict) -> str | None:
    """The suite digest: the report's own field when the checker records it, else the sha256
    of GOLDEN/manifest.json (which covers every file's sha256), None when neither is there."""
    for key in ("suite_digest", "digest"):
        if isinstance(rep.get(key), str):
            return rep[key]
    golden = rep.get("golden")
    if isinstance(golden, str):
        p = os.path.join(golden, "manifest.json")
        if os.path.isfile(p):
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    h.update(block)
            return h.hexdigest()
    return None


def _fmt(x) -> str:
    if not isinstance(x, (int, float)):
        return esc(x)
    if math.isinf(x):
        return "inf"
    return f"{x:.3g}"


# ---------------------------------------------------------------------------------------------
# The chart
# ---------------------------------------------------------------------------------------------

def chart_svg(res: dict) -> str:
    """Inline SVG: error / tolerance per output (dataflow order) on a log scale, the 1.0 line,
    the first divergence marked. res: one case of the report (outputs, first_failure)."""
    outs = res.get("outputs") or []
    ratios = [output_ratio(o) for o in outs]
    finite = [r for r in ratios if 0 < r < math.inf]
    lo = min([math.floor(math.log10(r)) for r in finite] + [-1])
    hi = max([math.ceil(math.log10(r)) for r in finite] + [1])
    lo, hi = max(lo, LOG_FLOOR), min(hi, LOG_CEIL)
    if hi - lo < 2:
        hi = lo + 2
    step = min(18.0, max(11.0, 1000.0 / max(len(outs), 1)))  # 1000 px wide up to 90 outputs
    longest = max([len(o.get("name", "")) for o in outs] + [4])
    left, top, plot_h = 64, 26, 220
    bottom = min(230, 6 * min(longest, 36) + 34)
    right = left + step * len(outs)
    width = int(max(520, right + 110))
    height = top + plot_h + bottom

    def y_of(r):
        if r <= 0:
            return top + plot_h
        if math.isinf(r):
            return top
        return top + plot_h * (hi - min(max(math.log10(r), lo), hi)) / (hi - lo)

    def x_of(i):
        return left + step * (i + 0.5)

    first = res.get("first_failure")
    label = f"error / tolerance per output of {res.get('id', '')}"
    parts = [f'<svg class="chart" width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
             f'role="img" aria-label="{esc(label)}">',
             f'<title>{esc(label)}</title>',
             f'<rect x="{left}" y="{top}" width="{right - left:.1f}" height="{plot_h}" '
             'fill="#fafafa" stroke="#bbb"/>']
    for k in range(lo, hi + 1):  # decades
        y = y_of(10.0 ** k)
        parts.append(f'<line x1="{left}" x2="{right:.1f}" y1="{y:.1f}" y2="{y:.1f}" '
                     'stroke="#e6e6e6"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end" '
                     f'fill="#444">1e{k}</text>')
    y1 = y_of(1.0)
    parts.append(f'<line class="tolerance-line" x1="{left}" x2="{right:.1f}" '
                 f'y1="{y1:.1f}" y2="{y1:.1f}" stroke="#222" stroke-width="1.5" '
                 'stroke-dasharray="6 3"/>')
    parts.append(f'<text x="{right + 6:.1f}" y="{y1 + 4:.1f}" font-size="11" '
                 'fill="#222">tolerance (1.0)</text>')
    parts.append(f'<text x="14" y="{top + plot_h / 2:.1f}" font-size="11" fill="#444" '
                 f'text-anchor="middle" transform="rotate(-90 14 {top + plot_h / 2:.1f})">'
                 'error / tolerance (log)</text>')
    pts = " ".join(f"{x_of(i):.1f},{y_of(r):.1f}" for i, r in enumerate(ratios))
    if len(outs) > 1:
        parts.append(f'<polyline points="{pts}" fill="none" stroke="#9aa" stroke-width="1"/>')
    for i, (o, r) in enumerate(zip(outs, ratios)):
        x, y = x_of(i), y_of(r)
        failed = o.get("status") == "fail"
        colour = FAIL_COLOUR if failed else PASS_COLOUR
        tip = f"{o.get('name', '')}: error/tol {_fmt(r)}"
        if o.get("message"):
            tip += f" ({o['message']})"
        data = (f'class="point" data-output="{esc(o.get("name", ""))}" '
                f'data-status="{esc(o.get("status", ""))}" data-ratio="{_fmt(r)}"')
        if o.get("name") == first:
            parts.append(f'<line class="first-divergence" x1="{x:.1f}" x2="{x:.1f}" y1="{top}" '
                         f'y2="{top + plot_h}" stroke="{FAIL_COLOUR}" stroke-width="1.5" '
                         'stroke-dasharray="3 2"/>')
            anchor, tx = ("end", x - 6) if x > width - 260 else ("start", x + 6)
            parts.append(f'<text x="{tx:.1f}" y="{top - 8}" font-size="12" font-weight="bold" '
                         f'text-anchor="{anchor}" fill="{FAIL_COLOUR}">first divergence: '
                         f'{esc(first)}</text>')
            parts.append(f'<path d="M{x:.1f} {y - 8:.1f} L{x + 8:.1f} {y:.1f} L{x:.1f} {y + 8:.1f} '
                         f'L{x - 8:.1f} {y:.1f} Z" fill="{FAIL_COLOUR}" stroke="#000" '
                         f'stroke-width="0.8" {data}><title>{esc(tip)}</title></path>')
        elif math.isinf(r):  # off the top: an up triangle on the edge
            parts.append(f'<path d="M{x:.1f} {y - 6:.1f} L{x + 5:.1f} {y + 3:.1f} L{x - 5:.1f} '
                         f'{y + 3:.1f} Z" fill="{colour}" {data}><title>{esc(tip)}</title></path>')
        else:
            fill = "#fff" if r == 0 else colour
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{fill}" '
                         f'stroke="{colour}" stroke-width="1.5" {data}><title>{esc(tip)}</title></circle>')
        ty = top + plot_h + 10
        parts.append(f'<text x="{x + 3:.1f}" y="{ty}" font-size="9.5" text-anchor="end" '
                     f'fill="{FAIL_COLOUR if failed else "#333"}" '
                     f'transform="rotate(-60 {x + 3:.1f} {ty})">{esc(o.get("name", ""))}</text>')
    parts.append("</svg>")
    return "\n".join(parts)


# ---------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------

def _note(r: dict) -> str:
    """The summary table's last column, as the text report writes it."""
    if r.get("status") == "known" and isinstance(r.get("known"), dict):
        k = r["known"]
        return f"{r.get('reason', '')} [known: {k.get('reason', '')} ({k.get('link', '')})]"
    if r.get("status") != "pass":
        return str(r.get("reason", ""))
    notes = [o["message"] for o in r.get("outputs", []) if o.get("message")]
    if r.get("not_compared"):
        notes.append(f"{r['not_compared']} not compared")
    if r.get("not_provided"):
        notes.append(f"{len(r['not_provided'])} intermediate(s) not provided")
    return "; ".join(notes)


def _status(s) -> str:
    colour = STATUS_COLOURS.get(s, "#333")
    return f'<span class="status" style="color:{colour}">{esc(str(s).upper())}</span>'


def _outputs_table(r: dict) -> str:
    rows = ["<table><tr><th>output</th><th>type</th><th>result</th><th>error / tol</th>"
            "<th>metrics (value / tol)</th></tr>"]
    for o in r.get("outputs", []):
        tol = o.get("tol") or {}
        ms = ", ".join(f"{esc(m)} {_fmt(v)} / {_fmt(tol[m])}" for m, v in (o.get("metrics") or {}).items()
                       if m in tol)
        if o.get("message"):
            ms = (ms + "; " if ms else "") + esc(o["message"])
        rows.append(f'<tr><td class="mono">{esc(o.get("name", ""))}</td><td>{esc(o.get("type", ""))}</td>'
                    f'<td>{_status(o.get("status", ""))}</td><td>{_fmt(output_ratio(o))}</td>'
                    f"<td>{ms}</td></tr>")
    rows.append("</table>")
    if r.get("not_provided"):
        rows.append("<p>not provided: " + ", ".join(f"<code>{esc(n)}</code>" for n in r["not_provided"])
                    + "</p>")
    return "\n".join(rows)


def _case_section(i: int, r: dict) -> str:
    parts = [f'<section class="case" id="case-{i}">',
             f'<h3>{esc(r.get("id", ""))} {_status(r.get("status", ""))}</h3>',
             f'<p class="pins">{esc(r.get("kind", ""))}: {esc(r.get("pins", ""))}</p>']
    if r.get("reason"):
        parts.append(f'<p class="reason">{esc(r["reason"])}</p>')
    if r.get("outputs"):
        parts.append(f'<div class="scroll">{chart_svg(r)}</div>')
    else:
        parts.append("<p>No output was compared, so there is no chart.</p>")
    if r.get("repro"):
        parts.append("<p>Reproduce:</p>")
        parts.append(f'<pre class="repro"><code>{esc(r["repro"])}</code></pre>')
    if r.get("outputs"):
        parts.append(f"<details><summary>all {len(r['outputs'])} outputs</summary>"
                     f"{_outputs_table(r)}</details>")
    parts.append("</section>")
    return "\n".join(parts)


def render(rep: dict) -> str:
    """The report dict (check.run_check) -> one self-contained HTML page."""
    cases = rep.get("cases", [])
    counts = rep.get("counts", {})
    digest = suite_digest(rep)
    title = f"oracles check: {rep.get('candidate', '')} vs {rep.get('suite', '')}"
    verdict = "PASSED" if rep.get("ok") else "FAILED"
    meta = [("suite", rep.get("suite")), ("suite digest (sha256 of manifest.json)", digest),
            ("question digest (what the suite asks)", rep.get("question_digest")),
            ("golden", rep.get("golden")), ("candidate (engine)", rep.get("candidate"))]
    if isinstance(rep.get("known"), dict):
        meta.append(("known divergences", rep["known"].get("file")))
    if rep.get("engine") is not None:
        engine = rep["engine"]
        meta.append(("engine", engine if isinstance(engine, str) else json.dumps(engine, sort_keys=True)))
    meta += [("profile", rep.get("profile")),
             ("profile against the run's mode", rep.get("profile_vs_mode")),
             ("cases", ", ".join(f"{n} {s.replace('_', ' ')}" for s, n in counts.items() if n)
              or "none"),
             ("seconds", rep.get("seconds"))]
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>{esc(title)}</title>", f"<style>{CSS}</style>", "</head>", "<body>",
           f"<h1>{esc(title)}</h1>",
           f'<p class="verdict" style="color:{STATUS_COLOURS["pass" if rep.get("ok") else "fail"]}">'
           f"{verdict}</p>",
           '<table class="meta">']
    for k, v in meta:
        if v is None:
            continue
        cls = ' class="mono digest"' if k.startswith("suite digest") else ' class="mono"'
        out.append(f"<tr><th>{esc(k)}</th><td{cls}>{esc(v)}</td></tr>")
    out.append("</table>")

    out.append("<h2>Summary</h2>")
    out.append('<table class="summary"><tr><th>case</th><th>kind</th><th>result</th>'
               "<th>first failing output / note</th></tr>")
    for i, r in enumerate(cases):
        cid = esc(r.get("id", ""))
        if r.get("status") in CHARTED:
            cid = f'<a href="#case-{i}">{cid}</a>'
        out.append(f'<tr><td class="id">{cid}</td><td>{esc(r.get("kind", ""))}</td>'
                   f'<td>{_status(r.get("status", ""))}</td><td>{esc(_note(r))}</td></tr>')
    out.append("</table>")

    looked_at = [(i, r) for i, r in enumerate(cases) if r.get("status") in CHARTED]
    if looked_at:
        out.append("<h2>Failing and inconclusive cases</h2>")
        out.append('<p class="legend">Each chart: error / tolerance of every output in dataflow '
                   "order (log scale). Above the dashed 1.0 line an output exceeds its tolerance. "
                   f'<span><span class="swatch" style="background:{FAIL_COLOUR}"></span>failing output'
                   f'</span><span><span class="swatch" style="background:{PASS_COLOUR}"></span>'
                   "within tolerance</span><span>&#9670; first divergence</span><span>&#9650; failed "
                   "without a metric or over a tolerance of 0 (off the scale)</span><span>&#9675; "
                   "exact</span></p>")
        out += [_case_section(i, r) for i, r in looked_at]
    others = [r for r in cases if r.get("status") in ("missing", "error")]
    if others:
        out.append("<h2>Cases without outputs</h2><ul>")
        out += [f'<li><code>{esc(r.get("id", ""))}</code> {_status(r.get("status", ""))}: '
                f'{esc(r.get("reason", ""))}'
                + (f'<pre class="repro"><code>{esc(r["repro"])}</code></pre>' if r.get("repro") else "")
                + "</li>" for r in others]
        out.append("</ul>")
    if rep.get("conventions"):
        out.append("<h2>Conventions this candidate follows</h2><table><tr><th>topic</th>"
                   "<th>follows</th><th>alternatives</th></tr>")
        for topic, alts in rep["conventions"].items():
            passed = [a for a, ok in alts.items() if ok]
            out.append(f"<tr><td>{esc(topic)}</td><td>{esc(', '.join(passed) or 'none')}</td>"
                       f"<td>{esc(', '.join(alts))}</td></tr>")
        out.append("</table>")
    out += ["</body>", "</html>", ""]
    return "\n".join(out)


def write_html(path: str, rep: dict) -> None:
    """Write render(rep) to `path` atomically (refimpl.atomic: a temporary beside it, renamed
    when complete; an unusable destination is one line)."""
    write_text(path, render(rep), OraclesError, tag="oracles")
