"""docs/conformance.md's tables of suites, case kinds, edge-value and scenario cases, and the
schedule format, generated from their declarations so that each is written once:

- suites: `suites.SUITES` (the case count) and `suites.SUITE_DOCS` (the manifest's `suite_doc`);
- case kinds: each kind's registration (`cases.register`, `scenarios.KINDS`: `inputs`, `outputs`);
- edge-value cases: `edges.default_cases` (each case's `pins`) and `edges.EXPOSES`;
- scenario cases: every suite's `scenario.*` cases (their `pins`);
- the schedule format: `scenarios.SCHEDULE_DOC`.

    python -m oracles.authoring.doc_tables --write docs/conformance.md
    python -m oracles.authoring.doc_tables --check docs/conformance.md   (exit 1 when stale)

In the document a region is the lines between `<!-- generated: NAME ... -->` and
`<!-- end generated -->`; --write replaces them and leaves every other line alone. Each region
of REGIONS must be in the document exactly once. A declaration that lacks its documentation
(a kind without `inputs`/`outputs`, a suite without a SUITE_DOCS line, an edge-value case
without an EXPOSES line) is an error naming it, not an empty cell.
"""

from __future__ import annotations

import argparse
import difflib
import re
import sys

from refimpl.atomic import write_text

from .. import OraclesError
from . import draws, edges, scenarios, suites
from .cases import KINDS

COMMAND = "python -m oracles.authoring.doc_tables --write docs/conformance.md"
REGION = re.compile(r"^<!-- generated: ([a-z0-9-]+)\b[^\n]*-->\n(.*?)^<!-- end generated -->$",
                    re.S | re.M)


def _cell(text: str) -> str:
    """Text for one table cell: one line, `|` escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def suites_table() -> str:
    rows = []
    for name, cases in ((n, suites.suite_cases(n)) for n in suites.SUITES):
        if name not in suites.SUITE_DOCS:
            raise OraclesError(f"oracles/authoring/suites.py: suite {name!r} has no SUITE_DOCS line")
        rows.append([f"`{name}`", suites.SUITE_DOCS[name], str(len(cases))])
    return _table(["suite", "what it holds (the manifest's `suite_doc`)", "cases"], rows)


def _kind_rows(kinds) -> list[list[str]]:
    rows = []
    for k in kinds:
        if not (k.inputs and k.outputs):
            raise OraclesError(f"case kind {k.name!r} declares no inputs= / outputs= (its "
                               "registration documents them for docs/conformance.md)")
        rows.append([f"`{k.name}`", k.inputs, k.outputs])
    return rows


KIND_HEADER = ["kind", "inputs", "outputs (dataflow order; **required** in bold)"]


def kinds_table() -> str:
    """Every registered kind but the scenario kinds (section 9 has those)."""
    scenario = {k.name for k in scenarios.KINDS}
    return _table(KIND_HEADER, _kind_rows(k for k in KINDS.values() if k.name not in scenario))


def scenario_kinds_table() -> str:
    return _table(KIND_HEADER, _kind_rows(scenarios.KINDS))


def edge_values_table() -> str:
    rows = []
    for cid, build in edges.default_cases(draws.tiny, suites.gate_case, suites.moe_case):
        if cid not in edges.EXPOSES:
            raise OraclesError(f"oracles/authoring/edges.py: edge-value case {cid!r} has no "
                               "EXPOSES line")
        rows.append([f"`{cid}`", build(cid).pins, edges.EXPOSES[cid]])
    return _table(["case", "value (the case's pins)", "what it exposes"], rows)


def schedule_steps(schedule) -> str:
    """A schedule in one line: `prompts P_0,P_1..:` when it marks its prompt tokens, each forward
    as request:tokens pairs (xk when repeated k times), `share r<q:L` for a shared prefix,
    `preempt r`; any other step, or other keys of a step, as key value."""
    out = []
    if schedule.get("prompt_lengths") is not None:
        out.append("prompts " + ",".join(map(str, schedule["prompt_lengths"])) + ":")
    for st in schedule["steps"]:
        op = st.get("op")
        if op == "forward":
            text = " ".join(f"{r}:{n}" for r, n in st["batch"])
            text += f" x{st['repeat']}" if st.get("repeat", 1) != 1 else ""
            rest = {k: v for k, v in st.items() if k not in ("op", "batch", "repeat")}
        elif op == "share_prefix":
            text = f"share {st['request']}<{st['from']}:{st['length']}"
            rest = {k: v for k, v in st.items() if k not in ("op", "request", "from", "length")}
        elif op == "preempt":
            text = f"preempt {st['request']}"
            rest = {k: v for k, v in st.items() if k not in ("op", "request")}
        else:
            text, rest = str(op), {k: v for k, v in st.items() if k != "op"}
        out.append(" ".join([text] + [f"{k} {v}" for k, v in rest.items()]))
    head = [out.pop(0)] if out and out[0].startswith("prompts ") else []
    return " ".join(head + ["; ".join(out)])


def scenario_cases_table() -> str:
    """Every `scenario.*` case of every suite, in suite order (a case in several suites once),
    with its pins and its schedule."""
    found: dict[str, list] = {}  # case id -> [builder, suite names]
    for name in suites.SUITES:
        for cid, build in suites.suite_cases(name):
            if cid.startswith("scenario."):
                found.setdefault(cid, [build, []])[1].append(name)
    rows = []
    for cid, (build, names) in found.items():
        case = build(cid)
        rows.append([f"`{cid}`", ", ".join(names), case.pins,
                     schedule_steps(case.params["schedule"])])
    return _table(["case", "suite", "what the engine must do (the case's pins)",
                   "schedule: prompt lengths, then one forward per `;` (request:tokens, x repeats), `share r<q:L`, `preempt r`"], rows)


def schedule_format() -> str:
    return scenarios.SCHEDULE_DOC


REGIONS = {
    "suites": suites_table,
    "edge-values": edge_values_table,
    "kinds": kinds_table,
    "scenario-kinds": scenario_kinds_table,
    "schedule-format": schedule_format,
    "scenario-cases": scenario_cases_table,
}


def render(document: str) -> str:
    """The document with every generated region rewritten from the declarations."""
    found = [m.group(1) for m in REGION.finditer(document)]
    unknown = sorted(set(found) - set(REGIONS))
    if unknown:
        raise OraclesError(f"generated region(s) {', '.join(unknown)} unknown; known: {', '.join(REGIONS)}")
    for name in REGIONS:
        if found.count(name) != 1:
            raise OraclesError(f"generated region {name!r} appears {found.count(name)} times, "
                               "expected once (<!-- generated: NAME --> ... <!-- end generated -->)")
    texts = {name: make() for name, make in REGIONS.items()}
    return REGION.sub(lambda m: m.group(0)[:m.start(2) - m.start(0)] + "\n" + texts[m.group(1)]
                      + "\n<!-- end generated -->", document)


def stale(document: str, rendered: str | None = None) -> list[str]:
    """Names of the regions whose text differs from what render() writes (`rendered`: render's
    result for this document, when the caller has it: the scenario table builds every scenario
    case, a second or so)."""
    rendered = render(document) if rendered is None else rendered
    new = {m.group(1): m.group(2) for m in REGION.finditer(rendered)}
    return [m.group(1) for m in REGION.finditer(document) if m.group(2) != new[m.group(1)]]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m oracles.authoring.doc_tables",
                                description="Regenerate (or check) the generated regions of a "
                                            "document from the case, kind and suite declarations.")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--write", metavar="DOC", help="rewrite DOC's generated regions in place")
    mode.add_argument("--check", metavar="DOC", help="exit 1 when a generated region is stale")
    args = p.parse_args(argv)
    path = args.write or args.check
    try:
        with open(path, encoding="utf-8") as f:
            old = f.read()
        new = render(old)
    except (OSError, OraclesError) as e:
        print(f"error: {path}: {e}", file=sys.stderr)
        return 2
    if args.check:
        names = stale(old, new)
        if names:
            diff = difflib.unified_diff(old.splitlines(), new.splitlines(), path, "generated",
                                        lineterm="", n=0)
            print("\n".join(diff))
            print(f"{path}: stale generated region(s): {', '.join(names)}; run {COMMAND}",
                  file=sys.stderr)
            return 1
        print(f"{path}: every generated region is current")
        return 0
    if new != old:
        try:
            write_text(path, new, OraclesError, tag="oracles")
        except OraclesError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    print(f"{path}: {len(REGIONS)} generated regions written")
    return 0


if __name__ == "__main__":
    sys.exit(main())
