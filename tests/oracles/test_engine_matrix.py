"""The engine matrix: diagnoses are computed (a failing engine's logits are matched against
refimpl's mutants and known engine behaviours), and one command rewrites docs/engines.md while
keeping the dated rows of engines not installed here."""

import json
import os
import shutil

import numpy as np
import pytest

from oracles.authoring.emulate import run_case
from oracles.engines import matrix
from oracles.format.digest import inputs_digest
from oracles.format.golden import Golden
from refimpl.writer import write_safetensors


@pytest.mark.parametrize("cid, variant", [
    ("model.prefill.negative_biased", "zero_group_mask"),  # MLX-LM's group mask
    ("model.prefill.mscale_differs", "mscale_read_as_mscale_all_dim"),  # llama.cpp's YaRN mscale
    ("model.prefill.v2_group_top2", "group_score_top2_for_v2"),  # llama.cpp's V2 group score
])
def test_a_candidate_that_behaves_like_a_variant_is_diagnosed_as_it(default_dir, cid, variant):
    g = Golden(default_dir)
    logits = matrix._variant_logits(g.load_case(cid), variant)
    name, why = matrix.diagnose(g, cid, logits, "float32")
    assert name == variant, why
    assert "equal refimpl with" in why


@pytest.mark.parametrize("cid, variant", [
    ("scenario.ragged_batch.small", "mixed_batch_missplit"),  # a serving-path bug
    ("scenario.chunked_prefill.small", "lse_base2_merge"),
])
def test_a_schedule_case_is_diagnosed_through_its_schedule(default_dir, cid, variant):
    """A schedule case's request.<r>.logits are matched against the variants run through the
    schedule, so the serving-path mutants name a serving bug."""
    g = Golden(default_dir)
    out = run_case(g.load_case(cid), "float32", matrix.MUTANTS[variant])
    name, why = matrix.diagnose(g, cid, out, "float32")
    assert name == variant, why


def test_engine_variants_change_only_the_cases_they_are_about(default_dir):
    g = Golden(default_dir)
    for cid in ("model.prefill.tiny",):  # mscale = mscale_all_dim, V3 routing: no difference
        case = g.load_case(cid)
        base = run_case(case, "float32")["logits"]
        for v in matrix.ENGINE_VARIANTS:
            assert (matrix._variant_logits(case, v) == base).all(), v


def test_the_expected_logits_are_not_diagnosed(default_dir):
    g = Golden(default_dir)
    name, why = matrix.diagnose(g, "model.prefill.tiny", g.expected("model.prefill.tiny")["logits"] * 1.5, "float32")
    assert name is None and "no variant" in why


@pytest.mark.peer
def test_one_command_rewrites_the_page_and_keeps_other_engines_dated_rows(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    out = tmp_path / "engines.md"
    old_row = {"engine": "vllm", "version": "0.32.0", "options": {"dtype": "float32"}, "suite": "engine",
               "profile": "float32", "date": "2026-12-02", "passed": 6, "failed": 0,
               "inconclusive": 0, "skipped": 1, "failures": [], "skip_reasons": ["decode"]}
    (tmp_path / "engines.json").write_text(json.dumps([old_row]))
    monkeypatch.setattr(matrix, "RUNS", [("transformers", {}, "smoke", ["float32"]),
                                         ("transformers", {}, "nosuch", ["float32"])])
    assert matrix.main(["--out", str(out), "--engines", "transformers", "--suites", "smoke",
                        "--work", str(tmp_path / "w")]) == 0
    rows = json.loads((tmp_path / "engines.json").read_text())
    assert [r["engine"] for r in rows] == ["transformers", "vllm"]
    assert rows[1] == old_row and rows[0]["passed"] == 1 and rows[0]["failed"] == 0
    page = out.read_text()
    assert "| vllm | 0.32.0 | dtype=float32 | engine | all | float32 | its mode | 6 | 0 | 0 | 0 | 0 | 1 | 2026-12-02 |" in page
    assert "python -m oracles.engines.matrix --out docs/engines.md" in page


def test_a_failure_diagnosed_by_hand_shows_its_known_entrys_reason_and_source(tmp_path):
    """A failure no refimpl variant explains, covered by the engine's known file: the page
    carries the entry's reason and link (the engine's source line), not only its number."""
    (tmp_path / "mlx.toml").write_text(
        '[[known]]\ncase = "scenario.x"\noutput = "request.*.attn_out"\nprofile = "bf16"\n'
        'reason = "the softmax scale is rounded to bf16"\nlink = "deepseek_v3.py:146"\n')
    row = {"engine": "mlx", "version": "0.32.2", "options": {"dtype": "bfloat16"}, "suite": "scenarios",
           "cases": "scenario", "profile": "bf16", "mode": "bf16", "date": "2026-12-02", "passed": 0, "failed": 2,
           "inconclusive": 0, "skipped": 0, "skip_reasons": [], "precision_only": [],
           "failures": [{"case": "scenario.x", "status": "fail", "first_failure": "request.1.attn_out",
                         "diagnosis": "no variant of refimpl matches"},
                        {"case": "scenario.y", "status": "fail", "first_failure": "request.1.attn_out",
                         "diagnosis": "no variant of refimpl matches"}]}
    page = matrix.render([row], str(tmp_path))
    assert ("  Diagnosis (known file): the softmax scale is rounded to bf16. Source: deepseek_v3.py:146."
            in page)
    assert page.count("Diagnosis (known file)") == 1  # scenario.y is not covered
    assert "| mlx | 0.32.2 | dtype=bfloat16 | scenarios | scenario | bf16 | its mode | 0 | 2 | 0 | 0 | 1 | 0 |" in page


# --- --rejudge: an earlier run's candidates judged again, no engine run ----------------------

class _RefimplEngine:
    """A stand-in engine for the matrix: refimpl in float32 with one mutant, prefill cases only
    (the other kinds skipped with a reason), an engine error on the MTP cases."""

    def __init__(self, mutant):
        from oracles.engines.reference import RefimplAdapter
        self.inner = RefimplAdapter("float32", matrix.MUTANTS[mutant])

    def supports(self, case):
        return True if case.kind in ("prefill", "mtp_prefill") else f"no entry point for {case.kind}"

    def run(self, case):
        if case.kind == "mtp_prefill":
            raise RuntimeError("this engine raised on MTP")
        return self.inner.run(case)


def _fake_load_engine(name, options):
    adapter = _RefimplEngine("rotate_half_rope")
    adapter.info = {"engine": name, "version": "9.9", "mode": "float32",
                    "options": {"dtype": "float32", "kv_cache_dtype": "auto"}}
    return adapter, adapter.info


def test_rejudge_judges_an_earlier_runs_candidates_again_and_refuses_another_suites(tmp_path, monkeypatch, capsys):
    """A fresh run leaves its candidate and engine.json (question digest, skips, errors) in WORK;
    --rejudge judges those files again with the current checker without loading the engine,
    keeps the run's version, options, skips, errors and date; a candidate written for a suite
    with another question digest, or none there, is refused with one line and nothing written."""
    out, work = tmp_path / "engines.md", tmp_path / "w"
    monkeypatch.setattr(matrix, "RUNS", [("transformers", {}, "smoke", ["float32"])])
    monkeypatch.setattr(matrix, "load_engine", _fake_load_engine)
    argv = ["--out", str(out), "--engines", "transformers", "--work", str(work)]
    assert matrix.main(argv) == 0
    (row,) = [r for r in json.loads((tmp_path / "engines.json").read_text()) if r["cases"] == "model"]
    assert (row["passed"], row["failed"], row["errors"]) == (0, 1, 1)
    fail = next(f for f in row["failures"] if f["status"] == "fail")
    assert fail["case"] == "model.prefill.tiny" and fail["variant"] == "rotate_half_rope"
    cand = work / "transformers-smoke-"
    info = json.loads((cand / "engine.json").read_text())
    assert info["question_digest"] == Golden(str(work / "golden-smoke")).question_digest
    assert info["inputs_digest"] == inputs_digest(Golden(str(work / "golden-smoke")).manifest)

    def no_engine(*a):
        raise AssertionError("--rejudge loaded the engine")
    monkeypatch.setattr(matrix, "load_engine", no_engine)
    # the outputs on disk are what is judged: the expected values in place of the mutant's pass
    golden = Golden(str(work / "golden-smoke"))
    write_safetensors(str(cand / "cases" / "model.prefill.tiny" / "outputs.safetensors"),
                      {k: np.asarray(v) for k, v in golden.expected("model.prefill.tiny").items()})
    os.utime(cand / "engine.json", (1767312000, 1767312000))  # the run's date: 2026-01-02 UTC
    capsys.readouterr()
    assert matrix.main(argv + ["--rejudge"]) == 0
    rows = json.loads((tmp_path / "engines.json").read_text())
    (row,) = [r for r in rows if r["cases"] == "model"]
    assert (row["passed"], row["failed"], row["errors"], row["skipped"]) == (1, 0, 1, 3)
    assert row["version"] == "9.9" and row["options"] == info["options"]
    assert row["date"] == "2026-01-02" and row["judged"] != row["date"]
    assert "this engine raised on MTP" in row["failures"][0]["diagnosis"]
    assert "re-judging" in capsys.readouterr().err and "rule_changed_since_run" not in row

    # the suite regenerated with its tolerances made another way (another K: another tolerance
    # rule, so another question digest, the same inputs): the outputs are judged against it
    from oracles.format import tolerances
    monkeypatch.setattr(tolerances, "K", 5.0)
    assert matrix.main(argv + ["--rejudge", "--regenerate"]) == 0
    regenerated = Golden(str(work / "golden-smoke"))
    assert regenerated.manifest["tolerance_k"] == 5.0 and regenerated.question_digest != info["question_digest"]
    err = capsys.readouterr().err
    assert "only how its tolerances are made changed" in err and not os.path.exists(str(work / "golden-smoke.new"))
    (row,) = [r for r in json.loads((tmp_path / "engines.json").read_text()) if r["cases"] == "model"]
    assert row["rule_changed_since_run"] is True and (row["passed"], row["errors"]) == (1, 1)

    before = (tmp_path / "engines.json").read_text(), out.read_text()
    (cand / "engine.json").write_text(json.dumps({**info, "inputs_digest": "0" * 64}))
    assert matrix.main(argv + ["--rejudge"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "engine.json: written for a suite with question digest " \
        f"{info['question_digest'][:16]}..., but" in err and "run the engine again" in err
    shutil.rmtree(cand)
    assert matrix.main(argv + ["--rejudge"]) == 2
    assert "transformers-smoke-: no candidate directory" in capsys.readouterr().err
    assert matrix.main(["--out", str(out), "--rejudge"]) == 2  # a work directory is needed
    assert "--rejudge needs --work DIR" in capsys.readouterr().err
    assert ((tmp_path / "engines.json").read_text(), out.read_text()) == before  # nothing written


def test_worst_pass_is_the_largest_metric_over_tolerance_of_the_passing_cases():
    """A row's closest call (docs/conformance.md cites it): only PASS cases and compared outputs,
    every metric with a tolerance above 0; None when nothing passed."""
    def out(name, status, metrics, tol):
        return {"name": name, "status": status, "metrics": metrics, "tol": tol}
    rep = {"cases": [
        {"id": "a", "status": "pass", "outputs": [
            out("logits", "pass", {"nmse": 2e-5, "norm": 0.004}, {"nmse": 1e-4, "norm": 0.005}),
            out("tokens", "pass", {"mismatch": 0.0}, {"mismatch": 0.0}),
            out("embed", "not_provided", {}, {})]},
        {"id": "b", "status": "fail", "outputs": [out("logits", "fail", {"nmse": 9.0}, {"nmse": 1e-4})]},
        {"id": "c", "status": "pass", "outputs": [out("x", "pass", {"max_rel": 0.03}, {"max_rel": 0.05})]}]}
    assert matrix.worst_pass(rep) == {"case": "a", "output": "logits", "metric": "norm", "ratio": 0.8}
    assert matrix.worst_pass({"cases": rep["cases"][1:2]}) is None


def test_the_matrix_script_passes_rejudge_through_and_refuses_bad_arguments(tmp_path):
    """scripts/engine_matrix.sh --rejudge runs the matrix from the .venv with --rejudge: without
    --work, or on a work directory without the candidates, one line and exit 2 (nothing
    generated, the page untouched); --engines only goes with --rejudge."""
    import subprocess

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = os.path.join(root, "scripts", "engine_matrix.sh")

    def run(*args):
        return subprocess.run(["bash", script, *args], capture_output=True, text=True, timeout=120)
    r = run("--rejudge")
    assert r.returncode == 2 and "--rejudge needs --work DIR" in r.stderr
    r = run("--engines", "vllm")
    assert r.returncode == 2 and "--engines goes with --rejudge" in r.stderr
    if not os.path.exists(os.path.join(root, ".venv", "bin", "python")):
        pytest.skip("the pass-through runs the checkout's .venv (scripts/test.sh makes it)")
    before = open(os.path.join(root, "docs", "engines.json")).read()
    r = run("--rejudge", "--work", str(tmp_path), "--engines", "vllm", "--suites", "engine")
    assert r.returncode == 2, r.stderr
    assert "vllm-engine-: no candidate directory" in r.stderr and r.stderr.count("\n") == 1
    assert os.listdir(tmp_path) == []  # refused before any suite was generated
    assert open(os.path.join(root, "docs", "engines.json")).read() == before


def test_rows_sort_in_runs_order_whichever_were_kept():
    """A partial run (--engines/--suites, or --rejudge of one suite) keeps the page's order: a
    row's configuration is found in RUNS by engine, suite and mode."""
    def row(suite, options):
        return {"engine": "vllm", "suite": suite, "options": options}
    engine_bf16, scen_f32 = row("engine", {"dtype": "bfloat16"}), row("scenarios", {"dtype": "float32"})
    i, j = matrix.run_index(engine_bf16), matrix.run_index(scen_f32)
    assert matrix.RUNS[i][2] == "engine" and matrix.RUNS[i][1] == {"dtype": "bfloat16"}
    assert matrix.RUNS[j][2] == "scenarios" and matrix.RUNS[j][1] == {}
    assert i < j and matrix.run_index(row("nosuch", {})) == len(matrix.RUNS)
