"""`oracles diff OLD.json NEW.json` (oracles/diff.py): regressions, fixes and moves between two
reports of one suite; unrelated or unreadable reports are one line and exit 2."""

import json

import pytest

from oracles import cli
from oracles.checking import diff


def _out(name, ratio, status="pass"):
    """An output whose error / tolerance is `ratio` (one metric)."""
    return {"name": name, "type": "continuous", "status": status, "metrics": {"nmse": ratio * 1e-6},
            "tol": {"nmse": 1e-6}}


def _case(cid, status, outputs=(), reason=""):
    return {"id": cid, "kind": "prefill", "status": status, "reason": reason,
            "first_failure": reason.split(":")[0] if reason else None, "outputs": list(outputs)}


def _report(cases, **kw):
    rep = {"suite": "default", "suite_digest": "a" * 64, "question_digest": "q" * 64,
           "profile": "float32", "candidate": "engine", "cases": cases}
    rep.update(kw)
    return rep


def _write(tmp_path, name, rep):
    p = tmp_path / name
    p.write_text(json.dumps(rep))
    return str(p)


OLD = [_case("a", "pass", [_out("x", 0.01)]), _case("b", "fail", [_out("x", 5, "fail")], "x: nmse 5e-06 > tol 1e-06"),
       _case("c", "pass", [_out("x", 0.5)]), _case("d", "skip"), _case("e", "pass", [_out("x", 1e-6)]),
       _case("f", "known", [_out("x", 3, "fail")], "x: nmse 3e-06 > tol 1e-06"),
       _case("g", "fail", [_out("x", 2, "fail")], "x: nmse 2e-06 > tol 1e-06"), _case("h", "pass")]
NEW = [_case("a", "fail", [_out("x", 2, "fail")], "x: nmse 2e-06 > tol 1e-06"), _case("b", "pass", [_out("x", 0.4)]),
       _case("c", "pass", [_out("x", 0.04)]), _case("d", "fail", [], "missing"), _case("e", "pass", [_out("x", 2e-4)]),
       _case("f", "fixed", [_out("x", 0.2)]), _case("g", "error", [], "run() raised"), _case("i", "pass")]


def test_regressions_fixes_and_moves_are_named(tmp_path):
    d = diff.diff(_write(tmp_path, "old.json", _report(OLD)), _write(tmp_path, "new.json", _report(NEW)))
    assert [(c.id, c.old, c.new) for c in d.regressed] == [("a", "pass", "fail"), ("d", "skip", "fail")]
    assert d.regressed[0].detail == "x: nmse 2e-06 > tol 1e-06"
    assert [(c.id, c.old, c.new) for c in d.fixed] == [("b", "fail", "pass"), ("f", "known", "fixed")]
    assert [(c.id, c.old, c.new) for c in d.changed] == [("g", "fail", "error")]
    # a: 0.01 -> 2 is 200x; b: 5 -> 0.4 is 12.5x; c: 0.5 -> 0.04 is 12.5x; e: both under 1/1000
    # of the tolerance (floored there): not moved; f: 3 -> 0.2 is 15x
    assert [(c.id, c.output) for c in d.moved] == [("a", "x"), ("b", "x"), ("c", "x"), ("f", "x")]
    assert d.only_in_old == ["h"] and d.only_in_new == ["i"]
    text = diff.format_diff(d)
    assert "regressed (2):\n  a  PASS -> FAIL  x: nmse 2e-06 > tol 1e-06" in text
    assert "c  x: 0.5 -> 0.04 (better)" in text and "a  x: 0.01 -> 2 (worse)" in text
    assert text.endswith("2 regressed, 2 fixed, 4 moved beyond 10x")


def test_the_factor_is_a_flag(tmp_path):
    o, n = _write(tmp_path, "o.json", _report(OLD)), _write(tmp_path, "n.json", _report(NEW))
    assert [c.id for c in diff.diff(o, n, factor=13).moved] == ["a", "f"]
    with pytest.raises(Exception, match="--factor 1.0: must be a number above 1"):
        diff.diff(o, n, factor=1.0)


def test_the_command_exits_1_on_a_regression_and_0_without(tmp_path, capsys):
    o, n = _write(tmp_path, "o.json", _report(OLD)), _write(tmp_path, "n.json", _report(NEW))
    assert cli.main(["diff", o, n, "--json", str(tmp_path / "d.json")]) == 1
    assert json.loads((tmp_path / "d.json").read_text())["regressed"][0]["id"] == "a"
    better = [c for c in NEW if c["id"] not in ("a", "d")] + [OLD[0], OLD[3]]
    assert cli.main(["diff", o, _write(tmp_path, "b.json", _report(better))]) == 0
    assert "0 regressed" in capsys.readouterr().out


def test_a_suite_regenerated_on_another_machine_is_the_same_suite(tmp_path):
    """Same question digest, another manifest digest: comparable (suite identity, section 8)."""
    o = _write(tmp_path, "o.json", _report(OLD))
    n = _write(tmp_path, "n.json", _report(NEW, suite_digest="c" * 64))
    assert diff.diff(o, n).regressed


@pytest.mark.parametrize("new, message", [
    (_report(NEW, question_digest="z" * 64), "checked different suites \\(question digests"),
    (_report(NEW, question_digest=None, suite_digest="c" * 64), "checked different suites \\(suite digests"),
    (_report(NEW, profile="bf16"), "different profiles \\(float32 and bf16\\)"),
    ({"cases": "no"}, "not an oracles check report \\(no 'cases' list"),
    ({"cases": [{"id": 3}]}, "cases\\[0\\] is not a case result"),
    ({"cases": []}, "not an oracles check report \\(no 'suite_digest'\\)"),
])
def test_unrelated_or_malformed_reports_are_one_line_and_exit_2(tmp_path, capsys, new, message):
    o = _write(tmp_path, "o.json", _report(OLD))
    n = _write(tmp_path, "n.json", new)
    assert cli.main(["diff", o, n]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    import re
    assert re.search(message, err), err


def test_a_file_that_is_not_json_is_one_line_and_exit_2(tmp_path, capsys):
    o = _write(tmp_path, "o.json", _report(OLD))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert cli.main(["diff", o, str(bad)]) == 2
    assert cli.main(["diff", o, str(tmp_path / "none.json")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert "not valid JSON" in err[0] and "file not found" in err[1]


def test_reports_of_the_checker_diff_as_expected(default_dir, tmp_path, capsys):
    """Real reports: the clean float32 reference, then the zero_group_mask bug."""
    only = "gate.*,moe.*"
    a, b = str(tmp_path / "a.json"), str(tmp_path / "b.json")
    cli.main(["check", default_dir, "--adapter", "oracles.adapters:refimpl_float32", "--only", only,
              "--json", a, "--quiet"])
    cli.main(["check", default_dir, "--adapter", "oracles.mutants:zero_group_mask", "--only", only,
              "--json", b, "--quiet"])
    capsys.readouterr()
    d = diff.diff(a, b)
    assert [c.id for c in d.regressed] == ["gate.negative_biased", "moe.negative_biased"]
    assert all(c.detail.startswith("topk_idx: mismatch") for c in d.regressed)
    assert [c.id for c in diff.diff(b, a).fixed] == ["gate.negative_biased", "moe.negative_biased"]
