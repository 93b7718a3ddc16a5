"""A golden suite is untrusted input, and so is an adapter: every class of bad suite or bad adapter
gives one escaped line and exit 2 (bad input) or a counted ERROR / INCONCLUSIVE (exit 1), never
a pass without checking, never a read outside the suite, never a hang or a traceback."""

import contextlib
import hashlib
import io
import json
import os
import shutil
import sys
import textwrap
import time

import numpy as np
import pytest

from oracles import cli
from oracles.authoring import writer
from oracles.format import golden, metrics
from oracles.checking.candidates import AdapterCandidate, load_adapter, write_outputs
from oracles.checking.check import judge, run_check
from refimpl.writer import write_safetensors
from tests.helpers import ROOT, run_cli

ONLY = "gate.tiny,rms_norm.basic,model.prefill.tiny"


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """(suite, good candidate, wrong candidate): three cases, refimpl float32 as the candidate,
    and the same with every float output 1% off."""
    root = tmp_path_factory.mktemp("untrusted")
    suite = str(root / "suite")
    writer.generate(suite, "default", ONLY)
    good = str(root / "good")
    write_outputs(suite, load_adapter("oracles.adapters:refimpl_float32"), good)
    bad = str(root / "bad")
    shutil.copytree(good, bad)
    for cid in os.listdir(os.path.join(bad, "cases")):
        p = os.path.join(bad, "cases", cid, "outputs.safetensors")
        out = golden.read_tensors(p)
        write_safetensors(p, {k: v * 1.01 if v.dtype.kind == "f" else v for k, v in out.items()})
    return suite, good, bad


@pytest.fixture
def suite(small, tmp_path):
    """A private copy of the small suite, to damage."""
    d = str(tmp_path / "suite")
    shutil.copytree(small[0], d, symlinks=True)
    return d


def _manifest(d):
    with open(os.path.join(d, "manifest.json")) as f:
        return json.load(f)


def _write_manifest(d, m):
    with open(os.path.join(d, "manifest.json"), "w") as f:
        json.dump(m, f)


def _edit(d, change):
    """A consistent edit: whoever edits a manifest can recompute its question digest too (as
    they can recompute a file's sha256), so the checks after it are the ones tested."""
    m = _manifest(d)
    change(m)
    _requestion(m)
    _write_manifest(d, m)


def _requestion(m):
    from oracles.format.digest import question_digest

    if isinstance(m, dict) and isinstance(m.get("question_digest"), str):
        m["question_digest"] = question_digest(m)


def _case(m, cid):
    return next(c for c in m["cases"] if c["id"] == cid)


def main(*argv):
    """oracles in this process -> (exit code, stdout, stderr); an exception is a test failure."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = cli.main([str(a) for a in argv])
        except SystemExit as e:  # argparse
            rc = e.code
    return rc, out.getvalue(), err.getvalue()


def _one_line_error(rc, err, *words):
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("oracles: error:"), (rc, err)
    assert "Traceback" not in err and all(w in err for w in words), err
    assert lines[0].isprintable()


# ---------------------------------------------------------------------------------------------
# Names and files that lead out of the suite, special files
# ---------------------------------------------------------------------------------------------

def _rename_file(m, cid, old, new):
    c = _case(m, cid)
    c["files"] = {(new if k == old else k): v for k, v in c["files"].items()}


@pytest.mark.parametrize("name, words", [
    ("/etc/passwd", "absolute"),
    ("../../../outside.safetensors", "'..'"),
    ("model/../../x", "'..'"),
    ("a\\b", "backslash"),
    ("a\x00b", "control"),
    ("x\n y", "control"),
    ("", "empty"),
    ("./inputs.safetensors", "'.'"),
])
def test_file_names_that_are_not_plain_relative_names_are_refused(small, suite, name, words):
    _edit(suite, lambda m: _rename_file(m, "gate.tiny", "inputs.safetensors", name))
    _one_line_error(*main("check", suite, small[1])[::2], words)


@pytest.mark.parametrize("cid, words", [("../../etc", "'/'"), ("/abs", "absolute"), ("..", "'..'"),
                                        ("gate\x1b[2Jtiny", "control"), ("a/b", "'/'")])
def test_case_ids_that_are_not_single_plain_names_are_refused(small, suite, cid, words):
    _edit(suite, lambda m: m["cases"][0].update(id=cid))
    rc, _, err = main("check", suite, small[1])
    _one_line_error(rc, err, words)
    assert "\x1b" not in err and "\\x1b" in err or "\x1b" not in cid


def test_a_symlink_that_leads_out_of_the_suite_is_refused_even_with_the_right_sha256(small, suite, tmp_path):
    p = os.path.join(suite, "cases", "gate.tiny", "expected.safetensors")
    outside = tmp_path / "outside.safetensors"
    shutil.copy(p, outside)  # same bytes, same sha256: only the path gives it away
    os.remove(p)
    os.symlink(outside, p)
    _one_line_error(*main("check", suite, small[1])[::2], "leads outside")


def test_a_symlink_inside_the_suite_is_followed(small, suite):
    d = os.path.join(suite, "cases", "gate.tiny")
    shutil.move(os.path.join(d, "inputs.safetensors"), os.path.join(suite, "gate-inputs.safetensors"))
    os.symlink(os.path.join("..", "..", "gate-inputs.safetensors"), os.path.join(d, "inputs.safetensors"))
    assert main("check", suite, small[1])[0] == 0


def test_dev_zero_is_refused_without_reading_it(small, suite):
    valid = _manifest(suite)
    _edit(suite, lambda m: _rename_file(m, "gate.tiny", "inputs.safetensors", "/dev/zero"))
    _one_line_error(*main("check", suite, small[1])[::2], "absolute")
    _write_manifest(suite, valid)
    p = os.path.join(suite, "cases", "gate.tiny", "inputs.safetensors")
    os.remove(p)
    os.symlink("/dev/zero", p)
    _one_line_error(*main("check", suite, small[1])[::2], "leads outside")


@pytest.mark.parametrize("special", ["fifo", "directory"])
def test_a_fifo_or_a_directory_where_a_file_belongs_is_refused_at_once(small, suite, special):
    p = os.path.join(suite, "cases", "gate.tiny", "inputs.safetensors")
    os.remove(p)
    os.mkfifo(p) if special == "fifo" else os.mkdir(p)
    t = time.perf_counter()
    r = run_cli("check", suite, small[1], module="oracles")  # a hang would hit run_cli's timeout
    assert time.perf_counter() - t < 60
    _one_line_error(r.returncode, r.stderr, "FIFO" if special == "fifo" else "directory")


def test_a_fifo_candidate_file_is_refused_at_once(small, suite, tmp_path):
    cand = tmp_path / "cand"
    shutil.copytree(small[1], cand)
    p = cand / "cases" / "gate.tiny" / "outputs.safetensors"
    os.remove(p)
    os.mkfifo(p)
    r = run_cli("check", suite, cand, module="oracles")
    _one_line_error(r.returncode, r.stderr, "FIFO")


def test_an_unlisted_file_in_a_case_directory_is_refused(small, suite):
    with open(os.path.join(suite, "cases", "model.prefill.tiny", "extra.safetensors"), "wb") as f:
        f.write(b"an engine would load this too")
    _one_line_error(*main("check", suite, small[1])[::2], "not listed")


# ---------------------------------------------------------------------------------------------
# The manifest cannot loosen the checking
# ---------------------------------------------------------------------------------------------

def _every_tol(m, value):
    for c in m["cases"]:
        for prof in c["tolerances"].values():
            for ent in prof.values():
                for v in ent.values():
                    if isinstance(v, dict):
                        v["tol"] = value


@pytest.mark.parametrize("change, words", [
    (lambda m: _every_tol(m, 1e300), "ceiling"),
    (lambda m: _every_tol(m, 0.4), "looser"),  # under the ceiling, but looser than the rule
    (lambda m: _case(m, "model.prefill.tiny")["tolerances"]["float32"]["logits"].pop("kl"), "kl"),
    (lambda m: _case(m, "gate.tiny")["tolerances"]["float32"]["topk_idx"].update(margin_eps=1e9), "ceiling"),
    (lambda m: _case(m, "model.prefill.tiny")["tolerances"]["float32"]["logits"]["nmse"].update(
        calibrated=1e300, tol=1e300), "ceiling"),
    (lambda m: _case(m, "gate.tiny")["tolerances"]["float32"]["topk_idx"]["mismatch"].update(tol=0.5),
     "ceiling"),
    (lambda m: _case(m, "model.prefill.tiny").update(outputs=[]), "empty"),
    (lambda m: _case(m, "model.prefill.tiny").update(
        outputs=[o for o in _case(m, "model.prefill.tiny")["outputs"] if o["name"] != "logits"]), "requires"),
    (lambda m: [o.update(required=False) for o in _case(m, "gate.tiny")["outputs"]], "requires"),
    (lambda m: _case(m, "model.prefill.tiny")["outputs"][-1].update(type="continuous"), "compared as"),
    (lambda m: _case(m, "gate.tiny")["files"].pop("expected.safetensors"), "expected.safetensors"),
    (lambda m: _case(m, "model.prefill.tiny")["files"].pop("model/model.safetensors"), "model case"),
    (lambda m: _case(m, "gate.tiny").update(conventions={"group_mask": "zero"}), "conventions"),
])
def test_manifest_edits_that_would_loosen_the_check_are_refused(small, suite, change, words):
    _edit(suite, change)
    for cand in small[1:]:
        _one_line_error(*main("check", suite, cand)[::2], words)


def test_tighter_tolerances_are_accepted_and_judge_more_strictly(small, suite):
    _edit(suite, lambda m: _every_tol(m, 0.0))
    rc, out, _ = main("check", suite, small[1])
    assert rc == 1 and "FAIL" in out


def test_the_suite_digest_is_printed_and_pinned(small, suite, tmp_path):
    digest = golden.Golden(suite).digest
    with open(os.path.join(suite, "manifest.json"), "rb") as f:
        assert digest == hashlib.sha256(f.read()).hexdigest()
    rc, out, _ = main("check", suite, small[1], "--json", tmp_path / "r.json", "--expect-digest", digest.upper())
    assert rc == 0 and digest in out and json.load(open(tmp_path / "r.json"))["suite_digest"] == digest
    assert main("check", suite, small[1], "--expect-digest", "sha256:" + digest)[0] == 0
    _edit(suite, lambda m: m.update(suite_doc="edited"))  # any edit changes the digest
    _one_line_error(*main("check", suite, small[1], "--expect-digest", digest)[::2], "not the expected")
    _one_line_error(*main("check", suite, small[1], "--expect-digest", "abc")[::2], "64 hex")
    _one_line_error(*main("run", suite, "--adapter", "oracles.adapters:refimpl_float32", "--out",
                          tmp_path / "cand", "--expect-digest", digest)[::2], "not the expected")


@pytest.mark.parametrize("change, field", [
    (lambda c: c.pop("kind"), "'kind'"),
    (lambda c: c.update(kind=["gate"]), "'kind'"),
    (lambda c: c.update(kind="no_such_kind"), "'kind'"),
    (lambda c: c.update(outputs={"topk_idx": 1}), "'outputs'"),
    (lambda c: c["outputs"][0].update(dtype=["F32"]), "dtype"),
    (lambda c: c["outputs"][0].update(shape=["16"]), "shape"),
    (lambda c: c["outputs"][0].update(required="yes"), "required"),
    (lambda c: c["outputs"][0].pop("name"), "name"),
    (lambda c: c.update(tolerances=[]), "'tolerances'"),
    (lambda c: c["tolerances"].update(float32={"topk_idx": []}), "float32"),
    (lambda c: c["files"].update({"inputs.safetensors": ["ab"]}), "files"),
    (lambda c: c.update(params=None), "'params'"),
    (lambda c: c.update(model="false"), "'model'"),
    (lambda c: c.update(id=7), "id"),
])
def test_malformed_manifest_entries_name_the_case_and_field(small, suite, change, field):
    _edit(suite, lambda m: change(_case(m, "gate.tiny")))
    _one_line_error(*main("check", suite, small[1])[::2], field)


@pytest.mark.parametrize("text", ["[]", "{}", '{"cases": []}', '{"cases": [1]}', "not json",
                                  '{"cases": NaN}', "[" * 100000, "\xff"])
def test_a_manifest_that_is_not_a_suite_is_one_line(small, suite, text):
    with open(os.path.join(suite, "manifest.json"), "w", encoding="latin-1") as f:
        f.write(text)
    _one_line_error(*main("check", suite, small[1])[::2], "manifest.json")


def test_an_expected_file_that_disagrees_with_the_manifest_is_refused(small, suite):
    _edit(suite, lambda m: _case(m, "gate.tiny")["outputs"][0].update(shape=[3, 3]))
    _one_line_error(*main("check", suite, small[1])[::2], "shape")


def test_a_file_replaced_after_verification_is_not_read(small, suite):
    g = golden.Golden(suite)
    p = os.path.join(suite, "cases", "gate.tiny", "inputs.safetensors")
    shutil.copy(p, p + ".new")
    os.replace(p + ".new", p)  # same bytes, another file: what a swap after the check looks like
    with pytest.raises(golden.OraclesError, match="since its sha256 was verified"):
        g.load_case("gate.tiny")


def _rehash(d, cid, name):
    p = os.path.join(d, "cases", cid, name)
    _edit(d, lambda m: _case(m, cid)["files"].update({name: writer.sha256(p)}))


@pytest.mark.parametrize("change, words", [
    (lambda e: e.update(topk_idx=e["topk_idx"] + 100), "outside its router_scores"),
    (lambda e: e.update(topk_weight=e["topk_weight"][:, :1]), "shape"),
    (lambda e: e.pop("topk_margin"), None),  # no margin: nothing forgiven, still judged
])
def test_an_expected_file_rewritten_with_a_new_sha256_is_still_checked_for_consistency(
        small, suite, change, words):
    p = os.path.join(suite, "cases", "gate.tiny", "expected.safetensors")
    exp = golden.read_tensors(p)
    change(exp)
    write_safetensors(p, exp)
    _rehash(suite, "gate.tiny", "expected.safetensors")
    if words is None:
        assert main("check", suite, small[1])[0] == 0
        assert main("check", suite, small[2])[0] == 1
    else:
        _edit(suite, lambda m: [o.update(shape=list(exp[o["name"]].shape))
                                for o in _case(m, "gate.tiny")["outputs"]])
        _one_line_error(*main("check", suite, small[1])[::2], words)


# ---------------------------------------------------------------------------------------------
# Checks that pass without checking; adapters
# ---------------------------------------------------------------------------------------------

ADAPTERS = {
    "exit_run": "def run(self, case):\n        sys.exit(0)",
    "exit_supports": "def supports(self, case):\n        sys.exit(0)",
    "raise_supports": "def supports(self, case):\n        raise ValueError('no')",
    "raise_run": "def run(self, case):\n        raise RuntimeError('kernel\\nFAKE PASS line \\x1b[2J')",
    "not_a_dict": "def run(self, case):\n        return [1, 2]",
    "strings": "def run(self, case):\n        return {'topk_idx': np.array(['a', 'b'])}",
    "decline": "def supports(self, case):\n        return 'declined\\n  gate.tiny  gate  PASS'",
    "hang": "def run(self, case):\n        RELEASE.wait()\n        return {}",
    "array_verdict": "def supports(self, case):\n        return np.array([1, 2])",
    "own_timeout": "def run(self, case):\n        raise TimeoutError('its own')",
    "huge_message": "def run(self, case):\n        raise RuntimeError('x' * 10**6)",
}


def _adapter_module(tmp_path, monkeypatch, name, method="", top="", factory="return A()"):
    body = textwrap.dedent(f"""
        import sys, threading
        import numpy as np
        RELEASE = threading.Event()
        {top}

        class A:
            def supports(self, case):
                return True

            def run(self, case):
                from oracles.authoring.emulate import run_case
                return run_case(case, "float32")

        class B(A):
            pass

        def factory():
            {factory}
        """)
    if method:
        body = body.replace("class B(A):\n    pass", "class B(A):\n    " + method)
        body = body.replace("return A()", "return B()")
    (tmp_path / f"{name}.py").write_text(body)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("PYTHONPATH", str(tmp_path) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return f"{name}:factory"


@pytest.mark.parametrize("kind", ["exit_run", "exit_supports", "raise_supports", "raise_run",
                                  "not_a_dict", "strings", "array_verdict", "own_timeout",
                                  "huge_message"])
def test_an_adapter_that_raises_or_exits_is_an_error_for_that_case(small, tmp_path, monkeypatch, kind):
    spec = _adapter_module(tmp_path, monkeypatch, f"ad_{kind}", ADAPTERS[kind])
    rc, out, err = main("check", small[0], "--adapter", spec, "--json", tmp_path / "r.json")
    rep = json.load(open(tmp_path / "r.json"))
    assert rc == 1 and rep["counts"]["error"] == 3 and not rep["ok"], out + err
    assert "Traceback" not in out + err and all(line.isprintable() for line in out.splitlines())
    if kind == "raise_run":
        assert "FAKE PASS line" in out and "\\n" in out and "\\x1b" in out
    if kind.startswith("exit"):
        assert "sys.exit(0)" in rep["cases"][0]["reason"]
    if kind == "own_timeout":
        assert "raised TimeoutError: its own" in rep["cases"][0]["reason"]
    if kind == "huge_message":
        assert len(rep["cases"][0]["reason"]) < 3000


def test_an_adapter_that_declines_every_case_has_checked_nothing(small, tmp_path, monkeypatch):
    spec = _adapter_module(tmp_path, monkeypatch, "ad_decline", ADAPTERS["decline"])
    rc, out, _ = main("check", small[0], "--adapter", spec)
    assert rc == 1 and "nothing was checked" in out and "--allow-empty" in out
    assert "declined\\n" in out and all("SKIP" in ln for ln in out.splitlines() if "PASS" in ln)
    assert main("check", small[0], "--adapter", spec, "--allow-empty")[0] == 0


@pytest.mark.parametrize("where, top, factory, words", [
    ("import", "raise RuntimeError('boom at import')", "return A()", "importing"),
    ("import_exit", "sys.exit(3)", "return A()", "SystemExit"),
    ("factory", "", "raise KeyError('cfg')", "factory raised"),
    ("factory_none", "", "return None", "supports(case) and run(case)"),
])
def test_an_adapter_that_fails_to_load_is_bad_input(small, tmp_path, monkeypatch, where, top, factory, words):
    spec = _adapter_module(tmp_path, monkeypatch, f"ad_load_{where}", top=top, factory=factory)
    _one_line_error(*main("check", small[0], "--adapter", spec)[::2], words)


def test_an_adapter_that_never_returns_is_timed_out(small, tmp_path, monkeypatch):
    spec = _adapter_module(tmp_path, monkeypatch, "ad_hang", ADAPTERS["hang"])
    t = time.perf_counter()
    try:
        rc, out, _ = main("check", small[0], "--adapter", spec, "--case-timeout", "2",
                          "--json", tmp_path / "r.json", "--in-process")
    finally:
        sys.modules["ad_hang"].RELEASE.set()  # let the abandoned worker thread end
    assert time.perf_counter() - t < 30
    rep = json.load(open(tmp_path / "r.json"))
    assert rc == 1 and rep["counts"]["error"] == 3
    assert "timed out" in rep["cases"][0]["reason"] and "not run" in rep["cases"][1]["reason"]


def test_a_hanging_adapter_in_a_separate_process_exits_without_waiting_for_it(small, tmp_path, monkeypatch):
    spec = _adapter_module(tmp_path, monkeypatch, "ad_hang_cli", ADAPTERS["hang"])
    r = run_cli("check", small[0], "--adapter", spec, "--case-timeout", "3", "--only", "gate.tiny",
                module="oracles")
    assert r.returncode == 1 and "did not return within 3 s" in r.stdout
    spec = _adapter_module(tmp_path, monkeypatch, "ad_hang_factory", factory="RELEASE.wait()")
    r = run_cli("check", small[0], "--adapter", spec, "--case-timeout", "3", module="oracles")
    _one_line_error(r.returncode, r.stderr, "did not return within 3 s")


@pytest.mark.parametrize("value", ["nan", "-1", "inf", "soon"])
def test_a_bad_case_timeout_is_one_line(small, value):
    rc, _, err = main("check", small[0], small[1], "--case-timeout", value)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and "--case-timeout" in err


def test_run_reports_adapter_errors_and_exits_1(small, tmp_path, monkeypatch):
    spec = _adapter_module(tmp_path, monkeypatch, "ad_run_raise", ADAPTERS["raise_run"])
    rc, out, _ = main("run", small[0], "--adapter", spec, "--out", tmp_path / "cand")
    assert rc == 1 and out.count("error ") == 3 and all(ln.isprintable() for ln in out.splitlines())


def test_a_candidate_that_provides_nothing_required_fails_and_nothing_passes_empty(small, tmp_path):
    cand = tmp_path / "cand"
    os.makedirs(cand / "cases")
    rc, out, _ = main("check", small[0], cand)
    assert rc == 1 and "3 missing" in out


# ---------------------------------------------------------------------------------------------
# INCONCLUSIVE and the logits-only route
# ---------------------------------------------------------------------------------------------

def test_nothing_compared_is_not_zero_error():
    assert metrics.continuous(np.zeros((0, 4)), np.zeros((0, 4))) == {}
    assert metrics.logits(np.zeros((0, 4)), np.zeros((0, 4)), 0.1) == {}


def test_a_case_whose_positions_all_follow_a_flipped_near_tie_is_inconclusive():
    """A causal case: the candidate resolved a near-tie at position 0 the other way, so no
    logit position can be compared: INCONCLUSIVE with 0 of 4 compared and no metric values."""
    e_idx = np.array([[[0, 1], [2, 3], [4, 5], [6, 7]]])
    rng = np.random.default_rng(0)
    expected = {"layers.0.topk_idx": e_idx, "layers.0.topk_margin": np.array([[1e-9, 1, 1, 1]]),
                "layers.1.hidden": rng.normal(size=(1, 4, 8)), "logits": rng.normal(size=(1, 4, 8))}
    c_idx = e_idx.copy()
    c_idx[0, 0] = [0, 9]
    cand = {"layers.0.topk_idx": c_idx, "logits": expected["logits"] + 5.0}
    tols = {"layers.0.topk_idx": {"mismatch": {"tol": 0.0}, "margin_eps": 1e-6},
            "layers.1.hidden": {m: {"tol": 1e-9} for m in metrics.CONTINUOUS_METRICS},
            "logits": {m: {"tol": 1e-9} for m in metrics.LOGIT_METRICS} | {"logit_eps": 1e-4}}
    outputs = [{"name": "layers.0.topk_idx", "type": "indices", "required": False},
               {"name": "layers.1.hidden", "type": "continuous", "required": False},
               {"name": "logits", "type": "logits", "required": True}]
    res = judge("prefill", outputs, expected, cand, tols)
    assert res["status"] == "inconclusive" and res["compared"]["positions"] == 0
    logits_out = res["outputs"][1]
    assert logits_out["status"] == "not_compared" and "nmse" not in logits_out["metrics"]
    # the same without the flip is a plain failure (+5 on every logit)
    cand["layers.0.topk_idx"] = e_idx
    assert judge("prefill", outputs, expected, cand, tols)["status"] == "fail"
    # a flip in the last layer (no layer 1): the logits at its position only are left out
    cand["layers.0.topk_idx"] = c_idx
    last = [o for o in outputs if o["name"] != "layers.1.hidden"]
    res = judge("prefill", last, expected, cand, tols)
    assert res["status"] == "fail" and res["outputs"][1]["metrics"]["compared"] == 3


def test_a_greedy_stream_that_agrees_through_a_near_tie_and_parts_later_fails():
    e = np.array([1, 2, 3, 4, 5])
    margin = np.array([9.0, 1e-9, 9.0, 9.0, 9.0])
    assert metrics.tokens(e, e, margin, 1e-3) == {"mismatch": 0.0, "compared": 5, "positions": 5}
    parted_at_tie = np.array([1, 7, 8, 9, 9])
    assert metrics.tokens(parted_at_tie, e, margin, 1e-3)["mismatch"] == 0.0
    parted_later = np.array([1, 2, 3, 9, 9])  # same context as expected at step 3: a real error
    assert metrics.tokens(parted_later, e, margin, 1e-3)["mismatch"] == 1.0


def test_inconclusive_cases_exit_1_unless_allowed(default_dir):
    """Without conditioning (what a checker without refimpl's forward pass does), refimpl's fp8
    emulation flips near-ties early in model.prefill.near_ties (random routing, on purpose),
    which every later position follows; conditioned, every position is judged and it passes.
    (Its bf16 emulation, which rounds as DeepSeek's inference code does, happens to route that
    case as the float64 truth does.)"""
    only = "model.prefill.near_ties"
    fp8 = "oracles.adapters:refimpl_fp8"
    rc, out, _ = main("check", default_dir, "--adapter", fp8, "--profile", "fp8", "--only", only,
                      "--no-conditioning")
    assert rc == 1 and "INCONCLUSIVE" in out and "--allow-inconclusive" in out and "of 10 positions" in out
    assert "--no-conditioning" in out  # the command that reproduces it
    assert main("check", default_dir, "--adapter", fp8, "--profile", "fp8", "--only", only,
                "--no-conditioning", "--allow-inconclusive")[0] == 0
    rc, out, _ = main("check", default_dir, "--adapter", fp8, "--only", only)
    assert rc == 0 and "reference recomputed on its routing" in out


class _LogitsOnly:
    """An engine that gives logits (and token streams) only, like vLLM's prompt logprobs."""

    def __init__(self, inner):
        self.inner = inner

    def supports(self, case):
        return self.inner.supports(case)

    def run(self, case):
        return {k: v for k, v in self.inner.run(case).items() if k.rsplit(".", 1)[-1] in ("logits", "tokens")}


def test_a_logits_only_bf16_engine_is_not_falsely_failed(default_golden):
    """refimpl's own fp8 emulation (its bf16 one routes model.prefill.near_ties as the truth
    does), stripped to logits: its routing near-ties are forgiven from the golden's margins. No
    case fails; where too few positions are clear of near-ties it is INCONCLUSIVE, and there
    comparing every position would indeed have exceeded the tolerance."""
    from oracles.engines.reference import RefimplAdapter

    prof = "fp8"
    cand = AdapterCandidate(_LogitsOnly(RefimplAdapter(prof)), f"{prof} logits only")
    rep = run_check(default_golden, cand, prof, only="model.prefill.*")
    assert rep["counts"]["fail"] == 0 and rep["counts"]["pass"] >= 4, rep["counts"]
    g = default_golden
    inconclusive = [r for r in rep["cases"] if r["status"] == "inconclusive"]
    assert inconclusive
    for r in inconclusive:
        assert r["compared"]["fraction"] < 0.5 and "did not report" in r["reason"]
        exp = g.expected(r["id"])["logits"]
        got = RefimplAdapter(prof).run(g.load_case(r["id"]))["logits"]
        tol = g.cases[r["id"]]["tolerances"][prof]["logits"]
        full = metrics.logits(got, exp, tol["logit_eps"])
        assert any(full[m] > tol[m]["tol"] for m in metrics.LOGIT_METRICS)  # a false FAIL before


def test_a_logits_only_engine_with_a_real_bug_still_fails(default_golden):
    inner = load_adapter("oracles.mutants:no_softmax_mscale").adapter
    rep = run_check(default_golden, AdapterCandidate(_LogitsOnly(inner), "buggy"), "bf16", only="model.prefill.*")
    assert rep["counts"]["fail"] >= 1 and rep["counts"]["pass"] <= 2 and not rep["ok"]


# ---------------------------------------------------------------------------------------------
# Fuzzing the manifest
# ---------------------------------------------------------------------------------------------

SENTINEL = "oracles-outside-sentinel"
_opened = []
_watching = []


def _audit(event, args):
    if _watching and event == "open" and args and isinstance(args[0], (str, bytes)):
        _opened.append(os.fsdecode(args[0]))


def _nodes(x, path=()):
    """Every (path, value) in a JSON tree."""
    yield path, x
    if isinstance(x, dict):
        for k, v in x.items():
            yield from _nodes(v, path + (k,))
    elif isinstance(x, list):
        for i, v in enumerate(x):
            yield from _nodes(v, path + (i,))


def _evil_values(outside):
    from hypothesis import strategies as st
    names = [f"{outside}/secret.safetensors", "../../../" + SENTINEL + "/secret.safetensors",
             f"../../{SENTINEL}/secret.safetensors", "/dev/zero", "a/../../x", "x\n y", "\x1b[2J",
             "model.safetensors", "expected.safetensors", "inputs.safetensors", "a\\b", "", ".",
             "logits", "topk_idx", "gate", "prefill", "float32", "forgiven", "decided"]
    return st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.sampled_from([1e300, -1.0, 0.0, 1e-12]),
                     st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=4),
                     st.sampled_from(names), st.lists(st.integers(0, 4), max_size=3),
                     st.dictionaries(st.sampled_from(["tol", "calibrated", "x"]), st.floats(0, 1), max_size=2))


def test_fuzzed_manifests_check_like_the_valid_one_or_are_one_line_errors(small, tmp_path):
    """Any edit of manifest.json (a value replaced, a key dropped, a file renamed) either checks
    like the valid suite (or more strictly: never a pass for the wrong candidate), or is one
    escaped line with exit 2, within seconds; nothing outside the suite and the candidate is
    ever opened (an audit hook records every open; a FIFO planted outside would also hang)."""
    import signal

    from hypothesis import given, settings
    from hypothesis import strategies as st

    outside = tmp_path / SENTINEL
    outside.mkdir()
    os.mkfifo(outside / "secret.safetensors")
    (outside / "secret.json").write_text("{}")
    d = tmp_path / "suite"
    shutil.copytree(small[0], d)
    valid = _manifest(d)
    rc0, out0, _ = main("check", d, small[1])
    assert rc0 == 0
    statuses0 = [ln.split()[:3] for ln in out0.splitlines()[2:5]]
    if not getattr(sys, "_oracles_audit", False):
        sys.addaudithook(_audit)
        sys._oracles_audit = True
    nodes = [p for p, _ in _nodes(valid) if p]
    outcomes = []

    def timeout(*_):
        raise TimeoutError("a check of a fuzzed manifest took more than 20 s")

    @settings(max_examples=max(150, settings().max_examples), deadline=None)
    @given(st.sampled_from(nodes), st.sampled_from(["replace", "drop", "rename"]), _evil_values(outside))
    def check(path, how, value):
        import copy
        m = copy.deepcopy(valid)
        parent = m
        for k in path[:-1]:
            parent = parent[k]
        key = path[-1]
        if how == "drop" and isinstance(parent, dict):
            del parent[key]
        elif how == "rename" and isinstance(parent, dict) and isinstance(value, str):
            parent[value] = parent.pop(key)
        else:
            parent[key] = value
        if path[0] != "question_digest":
            _requestion(m)  # a consistent edit (_edit), so that the deeper checks are reached
        _write_manifest(d, m)
        _opened.clear()
        old = signal.signal(signal.SIGALRM, timeout)
        signal.alarm(20)
        _watching.append(True)
        try:
            good = main("check", d, small[1])
            bad = main("check", d, small[2])
        finally:
            _watching.clear()
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
        allowed = [str(d), small[1], small[2], ROOT, sys.prefix, sys.base_prefix, sys.exec_prefix]
        stray = [p for p in _opened if not any(os.path.realpath(p).startswith(os.path.realpath(a) + os.sep)
                                               for a in allowed)]
        assert not stray and not any(SENTINEL in p for p in _opened), stray
        for rc, out, err in (good, bad):
            assert "Traceback" not in out + err
            if rc == 2:
                _one_line_error(rc, err)
            else:
                assert rc in (0, 1) and all(ln.isprintable() for ln in out.splitlines())
        outcomes.append(good[0])
        assert bad[0] != 0, "the wrong candidate passed an edited suite"
        if good[0] == 0:
            assert [ln.split()[:3] for ln in good[1].splitlines()[2:5]] == statuses0

    check()
    assert outcomes.count(0) and outcomes.count(2), outcomes  # both sides were reached
    print("fuzzed manifests: exit 0/1/2 =", [outcomes.count(k) for k in (0, 1, 2)])


def test_the_readers_contracts_are_the_case_kinds_own():
    """manifest.REQUIRED (the reading side, no forward pass) says what cases.py registers."""
    import dataclasses

    from oracles.authoring.cases import KINDS
    from oracles.format.manifest import CONVENTION_ALTERNATIVES, REQUIRED
    from oracles.format.schema import Case
    from oracles.authoring.suites import suite_cases
    from refimpl import Config

    assert set(KINDS) <= set(REQUIRED)
    cfg = dataclasses.replace(Config.preset("tiny"), num_nextn_predict_layers=2)
    inputs = {f"request.{r}.input_ids": np.arange(3).reshape(1, 3) for r in range(3)}
    for kind in KINDS:
        need = REQUIRED[kind]
        case = Case("x", kind, "", inputs, params={"k": 2}, config=cfg)
        got = need(case.params, lambda: cfg, lambda: set(inputs)) if callable(need) else list(need)
        assert got == list(KINDS[kind].required(case)), kind
    labelled = {}
    for cid, _ in suite_cases("conventions"):
        topic, alt = cid.split(".", 2)[1:]
        labelled.setdefault(topic, []).append(alt)
    assert {t: tuple(a) for t, a in labelled.items()} == CONVENTION_ALTERNATIVES


def test_an_adapters_worker_thread_ends_with_its_candidate(small):
    import gc
    import threading

    def workers():
        return sum(t.name == "oracles-adapter" and t.is_alive() for t in threading.enumerate())

    before = workers()
    cand = load_adapter("oracles.adapters:refimpl_float32")
    assert run_check(small[0], cand, only="gate.tiny")["ok"] and workers() == before + 1
    del cand
    gc.collect()
    for _ in range(100):
        if workers() == before:
            break
        time.sleep(0.05)
    assert workers() == before


def test_weights_of_a_near_tie_token_routed_to_the_expected_set_are_compared():
    """Only a forgiven token routed elsewhere leaves the weight comparison: a near-tie token
    with the expected experts and wrong weights fails."""
    e_idx = np.array([[0, 1], [2, 3]])
    e_w = np.array([[0.6, 0.4], [0.5, 0.5]])
    margin = np.array([1e-9, 1.0])  # token 0 is a near-tie
    assert metrics.routing_weights(e_idx, e_w * [[2.0], [1.0]], e_idx, e_w, 4, margin, 1e-6)["nmse"] > 0.1
    flipped = np.array([[0, 3], [2, 3]])  # token 0 went to another (allowed) set: left out
    assert metrics.routing_weights(flipped, e_w, e_idx, e_w, 4, margin, 1e-6)["nmse"] == 0.0


def test_the_reference_is_not_failed_by_alternatives_too_close_to_call(conventions_dir):
    """In bf16 the gate-precision alternatives are within rounding: too close to call, they are
    not the alternatives this candidate follows (another one passes), not a failed run."""
    rep = run_check(conventions_dir, load_adapter("oracles.adapters:refimpl_float32"), "bf16")
    assert rep["ok"] and rep["counts"]["inconclusive"] == 0 and rep["counts"]["fail"] == 0
    assert rep["conventions"]["gate_precision"]["float32"]


def _norm_entry(m, cid="rms_norm.basic", profile="bf16", out="y"):
    return _case(m, cid)["tolerances"][profile][out]


def test_a_norm_tolerance_up_to_the_error_length_sqrt_nmse_is_the_rule_and_beyond_is_refused(small, suite):
    """tolerances.rule: norm may reach sqrt(calibrated nmse) (the emulated run's own error
    length), the other metrics only max(K x calibrated, floor)."""
    def set_norm(tol):
        def change(m):
            e = _norm_entry(m)
            e["nmse"].update(calibrated=0.01, tol=0.04)  # error length 0.1
            e["norm"].update(calibrated=0.0, tol=tol)  # the run's own projection: 0
        return change
    _edit(suite, set_norm(0.1))
    rc, out, err = main("check", suite, small[1])
    assert rc == 0, out + err
    _edit(suite, set_norm(0.1001))
    _one_line_error(*main("check", suite, small[1])[::2], "sqrt(nmse calibrated 0.01)")
    # the rule does not carry over to another metric
    _edit(suite, lambda m: _norm_entry(m)["max_rel"].update(calibrated=0.0, tol=0.1))
    _one_line_error(*main("check", suite, small[1])[::2], "looser")


def test_the_rule_by_hand():
    from oracles.format.tolerances import FLOORS, K, rule
    f = FLOORS["bf16"]
    assert rule("norm", 0.00079, f["norm"], 1.02e-4) == pytest.approx(1.02e-4 ** 0.5)  # 0.0101
    assert rule("norm", 0.004, f["norm"], 1.02e-4) == K * 0.004  # its own projection, times K
    assert rule("norm", 0.0, f["norm"], 1e-6) == f["norm"]  # the floor
    assert rule("nmse", 1.02e-4, f["nmse"], 1.02e-4) == K * 1.02e-4
    assert rule("max_rel", 0.0, f["max_rel"], 1.0) == f["max_rel"]  # nmse only reaches norm
    assert rule("mismatch", 0.5, 0.0, 1.0) == 0.0


def test_calibration_gives_norm_the_error_length_when_the_run_projects_none():
    """An emulated error orthogonal to the output (norm error ~0) leaves the norm tolerance at
    the error's length; a candidate with an error of that length along the output (a pure
    scale, norm = sqrt(nmse)) is within it, and so within every tolerance."""
    from oracles.authoring.calibration import calibrate
    from oracles.format import metrics
    rng = np.random.default_rng(0)
    e = rng.normal(size=(6, 32))
    d = rng.normal(size=e.shape)
    d -= e * (np.sum(d * e) / np.sum(e * e))  # orthogonal to e
    d *= 0.01 * np.linalg.norm(e) / np.linalg.norm(d)  # length 0.01 of e's
    got = calibrate({"y": e}, {}, {"y": e + d}, "bf16", kind="rms_norm")["y"]
    assert got["norm"]["calibrated"] < 1e-4 and got["nmse"]["calibrated"] == pytest.approx(1e-4)
    assert got["norm"]["tol"] == pytest.approx(0.01)
    scaled = metrics.continuous(e * 1.0099, e)
    assert scaled["norm"] <= got["norm"]["tol"] and scaled["nmse"] <= got["nmse"]["tol"]
