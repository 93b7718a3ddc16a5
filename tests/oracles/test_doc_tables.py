"""docs/conformance.md's generated tables are current, and what they are generated from says what
the code does: every required output of every case of the default suite is in bold in its kind's
outputs, and nothing else is; every kind has a case there; the generator refuses a document or a
declaration it cannot render, and --check fails on a stale table."""

from __future__ import annotations

import os
import re

import pytest

from oracles import OraclesError
from oracles.authoring import doc_tables
from oracles.authoring.cases import KINDS
from oracles.authoring.kinds import kind
from oracles.authoring.suites import suite_cases

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOC = os.path.join(ROOT, "docs", "conformance.md")


def _doc() -> str:
    with open(DOC, encoding="utf-8") as f:
        return f.read()


@pytest.fixture(scope="module")
def default_cases():
    return [build(cid) for cid, build in suite_cases("default")]


def test_the_generated_regions_of_conformance_md_are_current():
    doc = _doc()
    assert doc_tables.render(doc) == doc, \
        f"docs/conformance.md is stale: run {doc_tables.COMMAND} ({doc_tables.stale(doc)})"


def bold_patterns(outputs_doc: str) -> list[re.Pattern]:
    """The **`name`** entries of a kind's outputs, placeholders (N, k, <r>, <e>) as numbers."""
    out = []
    for name in re.findall(r"\*\*`([^`]+)`\*\*", outputs_doc):
        parts = [r"\d+" if p in ("N", "k", "<r>", "<e>") else re.escape(p) for p in name.split(".")]
        out.append(re.compile(r"\.".join(parts)))
    return out


def test_bold_patterns_read_placeholders_as_numbers():
    pats = bold_patterns("`a`, **`mtp.k.logits`**, **`request.<r>.logits`** [1, n], **`y`**")
    assert [p.pattern for p in pats] == [r"mtp\.\d+\.logits", r"request\.\d+\.logits", "y"]
    assert pats[0].fullmatch("mtp.2.logits") and not pats[0].fullmatch("mtp.k2.logits")


def test_every_kind_has_a_case_in_the_default_suite(default_cases):
    assert {c.kind for c in default_cases} == set(KINDS)


def test_the_bold_outputs_of_each_kind_are_exactly_its_required_outputs(default_cases):
    matched = {name: set() for name in KINDS}  # kind -> the bold patterns some case required
    for case in default_cases:
        pats = bold_patterns(KINDS[case.kind].outputs)
        for name in KINDS[case.kind].required(case):
            hits = [p.pattern for p in pats if p.fullmatch(name)]
            assert hits, f"{case.id}: required output {name!r} is not in bold in kind {case.kind}'s outputs"
            matched[case.kind].update(hits)
    for name, k in KINDS.items():
        extra = {p.pattern for p in bold_patterns(k.outputs)} - matched[name]
        assert not extra, f"kind {name}: {extra} in bold but no case requires it"


def test_every_edge_value_case_says_what_it_exposes():
    from oracles.authoring import draws, edges, suites
    ids = [cid for cid, _ in edges.default_cases(draws.tiny, suites.gate_case, suites.moe_case)]
    assert sorted(ids) == sorted(edges.EXPOSES)


def test_schedule_steps_in_one_line():
    schedule = {"format": 1, "requests": 2, "steps": [
        {"op": "forward", "batch": [[0, 20]]},
        {"op": "share_prefix", "request": 1, "from": 0, "length": 20},
        {"op": "forward", "batch": [[0, 5], [1, 7]], "repeat": 3}]}
    assert doc_tables.schedule_steps(schedule) == "0:20; share 1<0:20; 0:5 1:7 x3"
    assert doc_tables.schedule_steps({"steps": [{"op": "speculate", "depth": 2, "max_new_tokens": 9}]}) \
        == "speculate depth 2 max_new_tokens 9"


def _regions(*names) -> str:
    return "".join(f"text\n<!-- generated: {n} -->\nold\n<!-- end generated -->\n" for n in names)


def test_render_refuses_unknown_missing_and_repeated_regions():
    every = list(doc_tables.REGIONS)
    with pytest.raises(OraclesError, match="unknown"):
        doc_tables.render(_regions(*every, "no-such-table"))
    with pytest.raises(OraclesError, match="'kinds' appears 0 times"):
        doc_tables.render(_regions(*[n for n in every if n != "kinds"]))
    with pytest.raises(OraclesError, match="'suites' appears 2 times"):
        doc_tables.render(_regions(*every, "suites"))


def test_a_kind_without_its_documentation_is_refused():
    undocumented = kind("my_kind", lambda case, dtype: {}, ["out"], "one line")
    with pytest.raises(OraclesError, match="my_kind"):
        doc_tables._kind_rows([undocumented])


def test_render_replaces_only_the_regions_and_check_sees_a_stale_one(tmp_path, capsys):
    doc = _doc()
    # a stale table: the scenario kinds' rows dropped; the text around the regions is kept as is
    start = doc.index("<!-- generated: scenario-kinds")
    end = doc.index("<!-- end generated -->", start)
    stale = doc[:start] + doc[start:end].split("\n| `schedule`")[0] + "\n" + doc[end:]
    path = tmp_path / "conformance.md"
    path.write_text(stale, encoding="utf-8")
    assert doc_tables.stale(stale) == ["scenario-kinds"]
    assert doc_tables.main(["--check", str(path)]) == 1
    assert "scenario-kinds" in capsys.readouterr().err
    assert doc_tables.main(["--write", str(path)]) == 0
    assert path.read_text(encoding="utf-8") == doc
    assert doc_tables.main(["--check", str(path)]) == 0
    assert doc_tables.main(["--check", str(tmp_path / "absent.md")]) == 2
    assert "absent.md" in capsys.readouterr().err

