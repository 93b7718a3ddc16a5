"""JUnit XML (`oracles check --junit FILE`, oracles/junit.py): parsed with a real XML parser and
held to the structure of the schema CI systems read, Jenkins' junit-10.xsd (jenkinsci/xunit-plugin,
src/main/resources/org/jenkinsci/plugins/xunit/types/model/xsd/junit-10.xsd), written out below
as rules (the schema itself is not fetched or shipped), plus the counts Ant's JUnit task and
GitLab read: a suite's tests, failures, errors and skipped are its test cases' elements."""

import json
import xml.etree.ElementTree as ET

import pytest

from oracles import cli
from oracles.checking import junit

# junit-10.xsd: element -> (attributes allowed, attributes required, children allowed)
SCHEMA = {
    "testsuites": ({"name", "time", "tests", "failures", "disabled", "errors"}, set(), {"testsuite"}),
    "testsuite": ({"name", "tests", "failures", "errors", "time", "disabled", "skipped", "skips",
                   "timestamp", "hostname", "id", "package", "assertions", "file", "skip", "log", "url"},
                  {"tests"}, {"testsuite", "properties", "testcase", "system-out", "system-err"}),
    "properties": (set(), set(), {"property"}),
    "property": ({"name", "value"}, {"name", "value"}, set()),
    "testcase": ({"name", "assertions", "time", "timestamp", "classname", "status", "class", "file",
                  "line", "log", "group", "url"}, {"name"},
                 {"skipped", "error", "failure", "system-out", "system-err"}),
    "failure": ({"type", "message"}, set(), set()),
    "error": ({"type", "message"}, set(), set()),
    "skipped": ({"type", "message"}, set(), set()),
    "system-out": (set(), set(), set()),
    "system-err": (set(), set(), set()),
}


def check_schema(root):
    """Every element, attribute and child of the document is one junit-10.xsd allows; the counts
    are integers and add up; times are decimals."""
    assert root.tag == "testsuites"
    for el in root.iter():
        allowed, required, children = SCHEMA[el.tag]
        assert set(el.attrib) <= allowed, (el.tag, set(el.attrib) - allowed)
        assert required <= set(el.attrib), (el.tag, required - set(el.attrib))
        assert {c.tag for c in el} <= children, (el.tag, {c.tag for c in el} - children)
        if "time" in el.attrib:
            assert float(el.attrib["time"]) >= 0
    totals = dict.fromkeys(("tests", "failures", "errors", "skipped"), 0)
    for ts in root.findall("testsuite"):
        cases = ts.findall("testcase")
        n = {"tests": len(cases), "failures": sum(len(c.findall("failure")) for c in cases),
             "errors": sum(len(c.findall("error")) for c in cases),
             "skipped": sum(len(c.findall("skipped")) for c in cases)}
        for k, v in n.items():
            assert int(ts.attrib[k]) == v, (ts.attrib["name"], k)
            totals[k] += v
        for c in cases:  # at most one result element per case
            assert len([e for e in c if e.tag in ("failure", "error", "skipped")]) <= 1
    for k, v in totals.items():
        if k != "skipped":  # the schema has no skipped on testsuites
            assert int(root.attrib[k]) == v, k


def _case(cid, kind, status, reason="", **kw):
    return {"id": cid, "kind": kind, "pins": "what it pins", "status": status, "reason": reason,
            "outputs": kw.pop("outputs", []), "not_provided": [], "seconds": 0.25, **kw}


REPORT = {
    "golden": "golden", "suite": "default", "suite_digest": "a" * 64, "question_digest": "b" * 64,
    "candidate": "my engine", "profile": "float32", "ok": False,
    "cases": [
        _case("model.prefill.tiny", "prefill", "pass"),
        _case("model.prefill.negative_biased", "prefill", "fail", "layers.1.topk_idx: mismatch 0.958 > tol 0",
              outputs=[{"name": "layers.1.topk_idx", "status": "fail", "message": "mismatch 0.958 > tol 0"}],
              repro="oracles check golden --only model.prefill.negative_biased"),
        _case("model.decode.start5", "decode", "error", "run() raised RuntimeError: boom"),
        _case("gate.tiny", "gate", "skip", "no standalone entry point"),
        _case("model.prefill.softmax_scoring", "prefill", "known", "layers.1.topk_idx: mismatch 0.1 > tol 0",
              known={"file": "k.toml", "entry": 2, "status": "fail", "reason": "V2 group score",
                     "link": "src/llama-graph.cpp:2103"}),
        _case("model.prefill.q_lora_null", "prefill", "fixed", "passes, but known entry 3 expects FAIL"),
        _case("model.prefill.beyond_original", "prefill", "inconclusive", "logits: only 3 of 10 compared"),
        _case("model.prefill.drawn0", "prefill", "missing", "no outputs.safetensors for this case"),
        _case("conv.group_mask.zero", "prefill", "not_followed", "layers.1.topk_idx: mismatch 1 > tol 0"),
        _case("weird\x1b[31m<&>\"id", "gate", "fail", "y: nmse 1 > tol 1e-11 \x00"),
    ],
}


def _by_id(root):
    return {c.attrib["name"]: c for c in root.iter("testcase")}


def test_the_junit_xml_follows_the_schema_and_maps_every_status():
    root = ET.fromstring(junit.render(REPORT, timestamp="2026-12-02T10:00:00").encode())
    check_schema(root)
    assert [ts.attrib["name"] for ts in root] == ["oracles.prefill", "oracles.decode", "oracles.gate"]
    c = _by_id(root)
    assert len(c) == len(REPORT["cases"])
    assert list(c["model.prefill.tiny"]) == []
    f = c["model.prefill.negative_biased"].find("failure")
    assert f.attrib == {"message": "layers.1.topk_idx: mismatch 0.958 > tol 0", "type": "FAIL"}
    assert "reproduce: oracles check golden --only model.prefill.negative_biased" in f.text
    assert c["model.decode.start5"].find("error").attrib["message"] == "run() raised RuntimeError: boom"
    assert c["gate.tiny"].find("skipped").attrib["message"] == "no standalone entry point"
    k = c["model.prefill.softmax_scoring"].find("skipped").attrib["message"]
    assert k.startswith("known FAIL: V2 group score (src/llama-graph.cpp:2103); layers.1.topk_idx")
    assert c["model.prefill.q_lora_null"].find("failure").attrib["type"] == "FIXED"
    assert c["model.prefill.beyond_original"].find("failure").attrib["type"] == "INCONCLUSIVE"
    assert c["model.prefill.drawn0"].find("failure").attrib["type"] == "MISSING"
    nf = c["conv.group_mask.zero"]
    assert nf.find("failure") is None and "not followed" in nf.find("system-out").text
    assert root.attrib["failures"] == "5" and root.attrib["errors"] == "1"
    assert sum(int(ts.attrib["skipped"]) for ts in root) == 2
    props = {p.attrib["name"]: p.attrib["value"] for p in root.find("testsuite/properties")}
    assert props["suite_digest"] == "a" * 64 and props["question_digest"] == "b" * 64
    assert root.find("testsuite").attrib["timestamp"] == "2026-12-02T10:00:00"


def test_control_characters_from_a_suite_are_escaped_and_the_xml_still_parses():
    root = ET.fromstring(junit.render(REPORT).encode())
    names = list(_by_id(root))
    assert "weird\\x1b[31m<&>\"id" in names
    assert all(ch.isprintable() for n in names for ch in n)


def test_allowed_inconclusive_and_fixed_are_not_failures():
    root = ET.fromstring(junit.render(REPORT, allow_inconclusive=True, allow_fixed=True).encode())
    check_schema(root)
    c = _by_id(root)
    assert c["model.prefill.beyond_original"].find("skipped").attrib["message"].startswith("inconclusive (allowed)")
    assert c["model.prefill.q_lora_null"].find("failure") is None
    assert "FIXED (allowed)" in c["model.prefill.q_lora_null"].find("system-out").text
    assert root.attrib["failures"] == "3"


@pytest.mark.parametrize("adapter, rc", [("oracles.adapters:refimpl_float32", 0),
                                         ("oracles.mutants:zero_group_mask", 1)])
def test_check_writes_junit_whose_failures_and_errors_are_the_cases_that_fail_the_run(default_dir, tmp_path,
                                                                                     adapter, rc):
    x, j = tmp_path / "r.xml", tmp_path / "r.json"
    only = "gate.*,moe.negative_biased,rms_norm.*"
    assert cli.main(["check", default_dir, "--adapter", adapter, "--only", only, "--junit", str(x),
                     "--json", str(j), "--quiet"]) == rc
    root = ET.parse(x).getroot()
    check_schema(root)
    rep = json.loads(j.read_text())
    failing = {r["id"] for r in rep["cases"] if r["status"] in ("fail", "missing", "error", "inconclusive")}
    in_xml = {c.attrib["name"] for c in root.iter("testcase") if c.find("failure") is not None
              or c.find("error") is not None}
    assert in_xml == failing and (rc == 1) == bool(failing)
    assert {c.attrib["name"] for c in root.iter("testcase")} == {r["id"] for r in rep["cases"]}
