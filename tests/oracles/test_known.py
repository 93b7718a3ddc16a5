"""Known divergences (oracles/known.py, `oracles check --known FILE`): KNOWN failures do not fail
the run, FIXED ones do, entries matching nothing and expired ones are reported; the files the
engines ship (docs/known/) cover exactly the failures docs/engines.json records."""

import datetime
import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oracles import OraclesError, cli
from oracles.checking import known
from oracles.checking.results import CaseResult
from oracles.engines import matrix

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
KNOWN_DIR = os.path.join(ROOT, "docs", "known")
TODAY = datetime.date(2026, 12, 2)


def _file(tmp_path, text, name="k.toml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def _entry(**kw):
    kw.setdefault("reason", "why")
    kw.setdefault("link", "where")
    lines = ["[[known]]"]
    for k, v in kw.items():
        lines.append(f"{k} = {json.dumps(v) if not isinstance(v, dict) else '{ ' + ', '.join(f'{a} = {json.dumps(b)}' for a, b in v.items()) + ' }'}")
    return "\n".join(lines) + "\n"


def _result(cid, status, first=None):
    return CaseResult(cid, "prefill", "", {}, status=status, first_failure=first,
                      reason=f"{first}: mismatch 1 > tol 0" if first else status)


# --- reading ----------------------------------------------------------------------------------

def test_a_known_file_reads_into_entries(tmp_path):
    p = _file(tmp_path, _entry(case="model.*", output="layers.*.topk_idx", profile=["float32", "bf16"],
                               engine_options={"dtype": "float32"})
              + "[[known]]\ncase = \"gate.tiny\"\nstatus = \"error\"\nreason = \"r\"\nlink = \"l\"\n"
                "expires = 2027-01-31\n")
    k = known.load(p)
    a, b = k.entries
    assert (a.index, a.case, a.output, a.profiles, a.status, a.engine_options) == \
        (1, "model.*", "layers.*.topk_idx", ("float32", "bf16"), "fail", {"dtype": "float32"})
    assert (b.status, b.expires, b.output) == ("error", datetime.date(2027, 1, 31), None)


@pytest.mark.parametrize("text, message", [
    ("[[known]]\ncase = \"x\"\nreason = \"r\"\n", "entry 1: 'link' must be a non-empty line"),
    ("[[known]]\ncase = \"x\"\nreason = \"\"\nlink = \"l\"\n", "entry 1: 'reason' must be a non-empty"),
    ("[[known]]\nreason = \"r\"\nlink = \"l\"\n", "entry 1: 'case' must be"),
    ("[[known]]\ncase = \"x\"\nreason = \"r\"\nlink = \"l\"\nouput = \"y\"\n", "unknown key 'ouput'"),
    ("[[known]]\ncase = \"x\"\nreason = \"r\"\nlink = \"l\"\nstatus = \"pass\"\n", "'status' is 'pass'"),
    ("[[known]]\ncase = \"x\"\nreason = \"r\"\nlink = \"l\"\nstatus = \"error\"\noutput = \"o\"\n",
     "a error has none"),
    ("[[known]]\ncase = \"x\"\nreason = \"r\"\nlink = \"l\"\nprofile = \"fp16\"\n", "'profile' is 'fp16'"),
    ("[[known]]\ncase = \"x\"\nreason = \"r\"\nlink = \"l\"\nprofile = []\n", "'profile' is \\[\\]"),
    ("[[known]]\ncase = \"x\"\nreason = \"r\"\nlink = \"l\"\nexpires = \"soon\"\n", "'expires' is 'soon'"),
    ("[[known]]\ncase = \"x\"\nreason = \"r\"\nlink = \"l\"\nexpires = 2027-01-01T10:00:00\n",
     "not a date and time"),
    ("[[known]]\ncase = \"x\"\nreason = \"r\"\nlink = \"l\"\nengine_options = 3\n", "'engine_options' must"),
    ("[[known]]\ncase = \"x\\n\"\nreason = \"r\"\nlink = \"l\"\n", "'case' must be a non-empty line"),
    ("known = 3\n", "'known' must be an array of tables"),
    ("title = \"mlx\"\n", "unknown top-level key 'title'"),
    ("[[known]\n", "not valid TOML"),
])
def test_a_bad_known_file_is_one_line_naming_the_file_and_entry(tmp_path, text, message):
    p = _file(tmp_path, text)
    with pytest.raises(OraclesError, match=message) as e:
        known.load(p)
    assert str(e.value).startswith(p) and "\n" not in str(e.value)


def test_a_missing_known_file_is_refused(tmp_path):
    with pytest.raises(OraclesError, match="known-divergences file not found"):
        known.load(str(tmp_path / "none.toml"))


KEYS = st.sampled_from(known.KEYS + ("extra",))
VALUES = st.one_of(st.text(max_size=8), st.integers(), st.booleans(), st.lists(st.text(max_size=4), max_size=2),
                   st.dates(), st.dictionaries(st.text(min_size=1, max_size=4), st.text(max_size=4), max_size=2))


@settings(max_examples=50, deadline=None)
@given(entries=st.lists(st.dictionaries(KEYS, VALUES, max_size=8), max_size=3))
def test_any_known_file_reads_or_is_refused_in_one_line(tmp_path_factory, entries):

    d = tmp_path_factory.mktemp("k")

    def toml_value(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, datetime.date):
            return v.isoformat()
        if isinstance(v, dict):
            return "{ " + ", ".join(f"{json.dumps(a)} = {json.dumps(b)}" for a, b in v.items()) + " }"
        return json.dumps(v)
    text = "".join("[[known]]\n" + "".join(f"{k} = {toml_value(v)}\n" for k, v in e.items()) for e in entries)
    p = _file(d, text)
    try:
        k = known.load(p)
    except OraclesError as e:
        assert "\n" not in str(e) and str(e).startswith(p)
        return
    for e in k.entries:  # what was read is what the module says an entry is
        assert e.reason.strip() and e.link.strip() and e.case.strip()
        assert e.status in known.KNOWN_STATUSES and (e.output is None or e.status == "fail")


# --- applying ---------------------------------------------------------------------------------

def _apply(tmp_path, text, results, profile="float32", options=None, today=TODAY):
    """-> (the results as known.apply marks them, its report section)."""
    return known.apply(known.load(_file(tmp_path, text)), results, profile, options, today)


def test_a_described_failure_is_known_and_keeps_its_failure(tmp_path):
    rs = [_result("model.prefill.negative_biased", "fail", "layers.1.topk_idx")]
    (r,), sec = _apply(tmp_path, _entry(case="model.prefill.*", output="layers.*.topk_idx"), rs)
    assert r.status == "known" and r.first_failure == "layers.1.topk_idx"
    assert r.as_dict()["known"] == {"file": str(tmp_path / "k.toml"), "entry": 1, "status": "fail", "reason": "why",
                          "link": "where"}
    assert sec["entries"][0]["matched"] == ["model.prefill.negative_biased"] and sec["unmatched"] == []


def test_a_failure_at_another_output_or_of_another_status_is_not_known(tmp_path):
    rs = [_result("model.prefill.a", "fail", "layers.0.c_q"), _result("model.prefill.b", "error")]
    rs, sec = _apply(tmp_path, _entry(case="model.prefill.*", output="layers.*.topk_idx"), rs)
    assert [r.status for r in rs] == ["fail", "error"]
    assert any("model.prefill.a: known entry 1" in n and "not this FAIL (at layers.0.c_q)" in n
               for n in sec["notes"])


def test_a_named_case_that_passes_is_fixed_and_skips_are_left_alone(tmp_path):
    rs = [_result("gate.tiny", "pass"), _result("gate.other", "skip"), _result("conv.x.y", "not_followed")]
    rs, _ = _apply(tmp_path, _entry(case="*"), rs)
    assert [r.status for r in rs] == ["fixed", "skip", "not_followed"]
    assert rs[0].known["status"] == "fail" and "expects FAIL" in rs[0].reason


def test_an_expired_entry_excuses_nothing_and_says_so(tmp_path):
    text = _entry(case="a", expires="2026-12-01") + _entry(case="b", expires="2026-12-02")
    rs = [_result("a", "fail", "x"), _result("b", "fail", "x")]
    rs, sec = _apply(tmp_path, text, rs)
    assert [r.status for r in rs] == ["fail", "known"]  # valid through its date
    assert any("known entry 1 (a) expired on 2026-12-01" in n for n in sec["notes"])
    rs, sec = _apply(tmp_path, text, [_result("a", "pass")])
    assert rs[0].status == "pass" and any("expired on 2026-12-01: remove it" in n for n in sec["notes"])


def test_entries_for_other_profiles_or_engine_options_do_not_apply(tmp_path):
    text = (_entry(case="a", profile="bf16") + _entry(case="b", engine_options={"dtype": "bfloat16"})
            + _entry(case="c", engine_options={"dtype": "bfloat16"}))
    rs = [_result("a", "fail", "x"), _result("b", "fail", "x"), _result("c", "fail", "x")]
    rs, sec = _apply(tmp_path, text, rs, options={"dtype": "float32"})
    assert [r.status for r in rs] == ["fail", "fail", "fail"]
    assert sec["unmatched"] == [] and [e["applies"] for e in sec["entries"]] == [False, False, False]
    rs, _ = _apply(tmp_path, text, [_result("b", "fail", "x")], profile="bf16",
                   options={"dtype": "bfloat16", "x": "1"})
    assert rs[0].status == "known"


def test_an_entry_matching_no_case_is_reported(tmp_path):
    _, sec = _apply(tmp_path, _entry(case="nothing.*") + _entry(case="a"), [_result("a", "fail", "x")])
    assert sec["unmatched"] == [1]
    assert sec["unmatched_notes"] == ["known entry 1 (nothing.*) matches no case of this run"]


# --- the command ------------------------------------------------------------------------------

NEG = "gate.negative_biased,moe.negative_biased,model.prefill.negative_biased,gate.tiny"


def _check(default_dir, tmp_path, text, *extra):
    k = _file(tmp_path, text)
    out = tmp_path / "r.json"
    if out.exists():
        out.unlink()
    rc = cli.main(["check", default_dir, "--adapter", "oracles.mutants:zero_group_mask", "--only", NEG,
                   "--known", k, "--json", str(out), "--quiet", *extra])
    return rc, json.loads(out.read_text())


def test_check_with_known_failures_exits_0_and_a_fixed_one_exits_1(default_dir, tmp_path, capsys):
    three = (_entry(case="gate.negative_biased", output="topk_idx")
             + _entry(case="moe.negative_biased", output="topk_idx")
             + _entry(case="model.prefill.negative_biased", output="layers.1.topk_idx"))
    rc, rep = _check(default_dir, tmp_path, three, "--html", str(tmp_path / "r.html"))
    assert rc == 0 and rep["ok"] and rep["counts"]["known"] == 3 and rep["counts"]["pass"] == 1
    out = capsys.readouterr().out
    assert "KNOWN" in out and "[known: why]" in out and "3 known failure(s)" in out
    page = (tmp_path / "r.html").read_text()  # charted like a failure, with the entry's reason
    assert page.count('id="case-') == 3 and "[known: why (where)]" in page and "known divergences" in page
    rc, rep = _check(default_dir, tmp_path, three + _entry(case="gate.tiny"))
    assert rc == 1 and not rep["ok"] and rep["counts"]["fixed"] == 1
    assert "pass --allow-fixed" in capsys.readouterr().out
    rc, rep = _check(default_dir, tmp_path, three + _entry(case="gate.tiny"), "--allow-fixed")
    assert rc == 0 and rep["counts"]["fixed"] == 1
    rc, rep = _check(default_dir, tmp_path, three.replace('output = "topk_idx"', 'output = "topk_idx"\n'
                                                         'expires = "2000-01-01"', 1))
    assert rc == 1 and rep["counts"]["fail"] == 1 and rep["counts"]["known"] == 2
    assert any("expired on 2000-01-01" in n for n in rep["notes"])


def test_a_bad_known_file_stops_check_before_it_runs(default_dir, tmp_path, capsys):
    k = _file(tmp_path, "[[known]]\ncase = 1\n")
    assert cli.main(["check", default_dir, "--adapter", "oracles.adapters:refimpl_float32",
                     "--known", k]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "entry 1: 'case' must be" in err


# --- the engines' ready files -------------------------------------------------------------

def test_every_engine_has_a_known_file_and_it_reads():
    for engine in ("transformers", "mlx", "llama.cpp", "vllm"):
        known.load(os.path.join(KNOWN_DIR, f"{engine}.toml"))


def test_the_known_files_cover_exactly_the_failures_the_engine_matrix_recorded():
    """Every failed, errored or inconclusive case of a configuration's own profile in
    docs/engines.json (per case group: the scenario cases, the others) is covered by its
    engine's file, and every entry covers one of them."""
    rows = json.load(open(os.path.join(ROOT, "docs", "engines.json")))
    seen, used = set(), {}
    for r in rows:
        key = (r["engine"], json.dumps(r["options"], sort_keys=True), r["suite"], r.get("cases"))
        if key in seen:
            continue
        seen.add(key)
        covered = matrix.known_failures(r, KNOWN_DIR)
        assert set(covered) == {f["case"] for f in r["failures"]}, (r["engine"], r["options"], r["profile"])
        for rec in covered.values():
            used.setdefault(r["engine"], set()).add(rec["entry"])
    for engine in ("transformers", "mlx", "llama.cpp", "vllm"):
        entries = known.load(os.path.join(KNOWN_DIR, f"{engine}.toml")).entries
        assert {e.index for e in entries} == used.get(engine, set()), engine
