"""The engine matrix: diagnoses are computed (a failing engine's logits are matched against
refimpl's mutants and known engine behaviours), and one command rewrites docs/engines.md while
keeping the dated rows of engines not installed here."""

import json

import pytest

from oracles.authoring.emulate import run_case
from oracles.engines import matrix
from oracles.format.golden import Golden


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
