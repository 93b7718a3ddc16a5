"""Profiles match the mode that ran (oracles/profiles.py): an engine's mode from its options,
the default profile of `oracles check`, the labels of a stricter or looser profile, and no FP8
profile as the verdict of a run without FP8."""

import json
import os

import numpy as np
import pytest

from oracles.engines import matrix, read_info
from oracles.format import golden, profiles
from refimpl.writer import write_safetensors
from tests.helpers import run_main


@pytest.mark.parametrize("engine, options, mode", [
    ("transformers", {"dtype": "float32"}, "float32"),
    ("transformers", {"dtype": "bfloat16", "kv_cache_dtype": "auto"}, "bf16"),
    ("transformers", {"dtype": "float16"}, None),
    ("mlx", {"dtype": "bfloat16", "expert_dtype": "float32"}, "bf16_f32_experts"),
    ("mlx", {"dtype": "bfloat16", "expert_dtype": "same"}, "bf16"),
    ("llama.cpp", {"dtype": "float32", "kv_cache_dtype": "f16"}, "f16_kv"),
    ("llama.cpp", {"dtype": "float32", "kv_cache_dtype": "f32"}, "float32"),
    ("llama.cpp", {"dtype": "float32", "kv_cache_dtype": "q8_0"}, None),
    ("vllm", {"dtype": "bfloat16", "kv_cache_dtype": "auto"}, "bf16"),
    ("vllm", {"dtype": "bfloat16", "kv_cache_dtype": "fp8"}, "fp8_kv"),
    ("vllm", {"dtype": "float32", "kv_cache_dtype": "auto"}, "float32"),
])
def test_the_mode_of_an_engine_run(engine, options, mode):
    assert profiles.mode_of(engine, options) == mode


def test_fp8_profiles_are_refused_for_runs_without_fp8():
    assert profiles.refused("fp8", "bf16") and "FP8 weights" in profiles.refused("fp8", "bf16")
    assert profiles.refused("fp8_kv", "bf16") and "FP8 KV cache" in profiles.refused("fp8_kv", "bf16")
    assert profiles.refused("fp8", "fp8_kv")  # an FP8 cache is not FP8 weights
    assert profiles.refused("fp8", "fp8") is None and profiles.refused("bf16", "fp8") is None
    assert profiles.refused("fp8", None) is None  # nothing known about the run
    assert profiles.relation("float32", "bf16").startswith("STRICTER")
    assert profiles.relation("bf16", "f16_kv").startswith("LOOSER")
    assert profiles.relation("bf16", "bf16_f32_experts").startswith("another mode")
    assert profiles.relation("bf16", None) is None


def test_the_matrix_checks_each_run_against_its_mode_and_no_fp8_it_did_not_have():
    for engine, options, _, profs in matrix.RUNS:
        mode = profiles.mode_of(engine, options)
        assert profs[0] == mode, (engine, options)
        assert not [p for p in profs if profiles.refused(p, mode)], (engine, options)
    assert profiles.mode_of("llama.cpp", {"dtype": "bfloat16", "kv_cache_dtype": "bf16"}) == "bf16"
    assert profiles.mode_of("llama.cpp", {"dtype": "bfloat16", "kv_cache_dtype": "f16"}) is None
    old = {"engine": "vllm", "options": {"dtype": "bfloat16", "kv_cache_dtype": "auto"}, "profile": "fp8"}
    assert not matrix.keep_row(old) and matrix.keep_row({**old, "profile": "bf16"})


def _engine_run(default_dir, tmp_path, info):
    """A file-route candidate recorded as a bf16 engine run: the golden's own logits."""
    cid = "model.prefill.tiny"
    g = golden.Golden(default_dir)
    d = tmp_path / "cand" / "cases" / cid
    os.makedirs(d)
    write_safetensors(str(d / "outputs.safetensors"), {"logits": np.array(g.expected(cid)["logits"])})
    with open(tmp_path / "cand" / "engine.json", "w") as f:
        json.dump({**info, "skipped": {}}, f)
    return str(tmp_path / "cand"), cid


def test_check_takes_the_profile_of_the_recorded_mode_and_labels_another(default_dir, tmp_path):
    info = {"engine": "vllm", "version": "0.32.0", "options": {"dtype": "bfloat16", "kv_cache_dtype": "auto"},
            "mode": "bf16"}
    cand, cid = _engine_run(default_dir, tmp_path, info)
    rep_path = tmp_path / "r.json"
    rc, out, _ = run_main("check", default_dir, cand, "--only", cid, "--json", rep_path, module="oracles")
    rep = json.load(open(rep_path))
    assert rc == 0 and rep["profile"] == "bf16" and rep["mode"] == "bf16"
    assert rep["profile_vs_mode"].startswith("the bf16 profile emulates")
    # a stricter profile: labelled in the notes, the JSON and the HTML page
    html = tmp_path / "r.html"
    rc, out, _ = run_main("check", default_dir, cand, "--only", cid, "--profile", "float32",
                          "--json", rep_path, "--html", html, module="oracles")
    rep = json.load(open(rep_path))
    assert rep["profile_vs_mode"].startswith("STRICTER") and "STRICTER than this run's mode (bf16)" in out
    assert "STRICTER than this run" in open(html).read()
    # an FP8 profile for a run without FP8: refused, or labelled as not this run's verdict
    rc, out, err = run_main("check", default_dir, cand, "--only", cid, "--profile", "fp8", module="oracles")
    assert rc == 2 and "FP8 weights" in err and "--profile bf16" in err and len(err.strip().splitlines()) == 1
    rc, out, _ = run_main("check", default_dir, cand, "--only", cid, "--profile", "fp8", "--any-profile",
                          "--json", rep_path, module="oracles")
    assert "not this run's verdict" in json.load(open(rep_path))["profile_vs_mode"]
    assert "LOOSER" in out


def test_an_engine_json_written_before_modes_gets_its_mode_from_the_options(default_dir, tmp_path):
    cand, _ = _engine_run(default_dir, tmp_path, {"engine": "mlx", "version": "0.32.2",
                                                  "options": {"dtype": "bfloat16", "expert_dtype": "float32"}})
    assert read_info(cand)["mode"] == "bf16_f32_experts"


def test_an_adapter_says_its_mode(default_dir, tmp_path):
    rep_path = tmp_path / "r.json"
    run_main("check", default_dir, "--adapter", "oracles.adapters:refimpl_bf16", "--only",
             "model.prefill.tiny", "--json", rep_path, module="oracles")
    rep = json.load(open(rep_path))
    assert rep["profile"] == rep["mode"] == "bf16"


def test_the_compared_fraction_command_prints_a_row_per_profile(tmp_path):
    """benchmarks/compared_fraction.py (issue 16 item 7) on the smoke suite: one row per
    profile, refimpl's own emulation failing nothing; the engine rows come from the matrix's
    JSON when it holds the distribution."""
    import importlib.util
    import io
    from contextlib import redirect_stdout

    from tests.helpers import ROOT

    spec = importlib.util.spec_from_file_location("compared_fraction",
                                                  os.path.join(ROOT, "benchmarks", "compared_fraction.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rows = [{"engine": "vllm", "version": "0.32.0", "options": {"dtype": "bfloat16"}, "suite": "engine",
             "profile": "bf16", "date": "2026-12-02", "failed": 0, "inconclusive_cases": [],
             "compared": {"cases": 6, "min": 0.9, "p10": 0.9, "median": 1.0, "below_0.9": 0, "conditioned": 1}},
            {"engine": "old", "version": "1", "options": {}, "suite": "engine", "profile": "bf16",
             "date": "2026-01-01", "failed": 0}]  # a row from before: no distribution, not printed
    (tmp_path / "engines.json").write_text(json.dumps(rows))
    out = io.StringIO()
    with redirect_stdout(out):
        assert mod.main(["--suites", "smoke", "--profiles", "float32,bf16", "--work", str(tmp_path / "w"),
                         "--engines-json", str(tmp_path / "engines.json")]) == 0
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("| suite | candidate | profile |") and len(lines) == 2 + 2 + 1
    for line, profile in zip(lines[2:4], ("float32", "bf16")):
        cells = [c.strip() for c in line.split("|")]
        assert cells[1:4] == ["smoke", "refimpl emulation", profile] and cells[11] == "0"
    assert "vllm 0.32.0 (dtype=bfloat16), 2026-12-02" in lines[4] and "| 0.9 |" in lines[4]


def test_the_compared_fraction_command_prints_a_row_per_check_report(tmp_path):
    """--reports: a real engine's run judged by `oracles check --json` outside the matrix, one
    row each, with the distribution over its model cases only (component kinds and skipped
    cases left out) and its INCONCLUSIVE cases named."""
    import importlib.util
    import io
    from contextlib import redirect_stdout

    from tests.helpers import ROOT

    spec = importlib.util.spec_from_file_location("compared_fraction",
                                                  os.path.join(ROOT, "benchmarks", "compared_fraction.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cases = [{"id": "a", "kind": "prefill", "status": "pass"},
             {"id": "b", "kind": "prefill", "status": "inconclusive", "compared": {"fraction": 0.25}},
             {"id": "c", "kind": "greedy", "status": "pass", "compared": {"fraction": 0.8},
              "conditioned": {"forced": 1}},
             {"id": "d", "kind": "moe", "status": "pass", "compared": {"fraction": 0.1}},
             {"id": "e", "kind": "prefill", "status": "skip"}]
    rep = {"suite": "default", "profile": "bf16", "cases": cases, "counts": {"fail": 0},
           "engine": {"engine": "transformers", "version": "5.0", "options": {"dtype": "bfloat16"}}}
    (tmp_path / "r.json").write_text(json.dumps(rep))
    out = io.StringIO()
    with redirect_stdout(out):
        assert mod.main(["--suites", "", "--reports", str(tmp_path / "r.json")]) == 0
    lines = out.getvalue().splitlines()
    assert len(lines) == 3
    cells = [c.strip() for c in lines[2].split("|")][1:-1]
    assert cells == ["default", "transformers 5.0 (dtype=bfloat16)", "bf16", "3", "0.25", "0.25",
                     "0.8", "2", "1", "1 (b)", "0"]
    rep["conditioning"] = False
    (tmp_path / "r.json").write_text(json.dumps(rep))
    out = io.StringIO()
    with redirect_stdout(out):
        assert mod.main(["--suites", "", "--reports", str(tmp_path / "r.json")]) == 0
    assert "| transformers 5.0 (dtype=bfloat16), --no-conditioning | bf16 |" in out.getvalue()
