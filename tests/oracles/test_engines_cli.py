"""`oracles run/check --engine NAME [--engine-option KEY=VALUE]`: the built-in engine adapters,
one command each, with the engine's name, version and options recorded in the candidate and the
report. Engines are imported only when named; a missing one is a one-line error naming the
extra to install."""

import json
import os
import subprocess
import sys

import pytest

from oracles import engines
from tests.helpers import ROOT, run_cli


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory):
    from oracles.authoring import writer

    out = os.path.join(tmp_path_factory.mktemp("golden"), "smoke")
    writer.generate(out, "smoke")
    return out


def _one_line_error(r, *needles):
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("oracles: error:"), r.stderr
    for n in needles:
        assert n in lines[0]


def test_engine_options_are_parsed_and_validated():
    assert engines.parse_options(["dtype=bfloat16", " kv_cache_dtype = float16 "]) == {
        "dtype": "bfloat16", "kv_cache_dtype": "float16"}
    spec = {"dtype": ("float32", ("float32", "bfloat16"), "weights"), "path": ("", None, "a file")}
    assert engines.resolve_options("e", spec, {"path": "x"}) == {"dtype": "float32", "path": "x"}
    for bad in ({"dtype": "int4"}, {"flash": "on"}):
        with pytest.raises(engines.OraclesError):
            engines.resolve_options("e", spec, bad)
    with pytest.raises(engines.OraclesError, match="KEY=VALUE"):
        engines.parse_options(["dtype"])


def test_unknown_engine_and_bad_options_are_one_line_errors(smoke_dir):
    _one_line_error(run_cli("check", smoke_dir, "--engine", "nosuch", module="oracles"),
                    "--engine 'nosuch' is unknown", "llama.cpp")
    _one_line_error(run_cli("check", smoke_dir, "--adapter", "oracles.adapters:refimpl_float32",
                            "--engine-option", "dtype=float32", module="oracles"), "needs --engine")
    _one_line_error(run_cli("run", smoke_dir, "--out", "x", module="oracles"), "--engine")


def test_importing_oracles_does_not_import_any_engine():
    code = ("import sys, oracles.cli, oracles.engines, oracles.checking.check, oracles.format.golden; "
            "print(sorted(m for m in ('torch', 'transformers', 'mlx', 'llama_cpp', 'vllm') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stderr


def test_an_engine_that_is_not_installed_names_its_extra(smoke_dir, monkeypatch):
    """Simulated by hiding the engine's module: the error names the pyproject extra."""
    monkeypatch.setitem(engines.ENGINES, "mlx", ("oracles.engines.no_such_module", "mlx-lm", "engine-mlx"))
    with pytest.raises(engines.OraclesError, match=r"engine-mlx"):
        engines.load_engine("mlx", {})


@pytest.mark.peer
def test_run_and_check_with_the_transformers_engine_record_name_version_options(smoke_dir, tmp_path):
    pytest.importorskip("transformers")
    import transformers

    cand = tmp_path / "cand"
    r = run_cli("run", smoke_dir, "--engine", "transformers", "--engine-option", "dtype=float32",
                "--out", cand, module="oracles")
    assert r.returncode == 0, r.stderr
    info = json.load(open(cand / "engine.json"))
    assert info["engine"] == "transformers" and info["version"] == transformers.__version__
    assert info["options"]["dtype"] == "float32" and info["options"]["attn_implementation"] == "eager"
    assert "component kind" in info["skipped"]["gate.tiny"]
    assert (cand / "cases" / "model.prefill.tiny" / "outputs.safetensors").exists()
    rep = tmp_path / "rep.json"
    r = run_cli("check", smoke_dir, cand, "--json", rep, module="oracles")
    assert r.returncode == 0, r.stdout + r.stderr
    assert info["mode"] == "float32"
    assert json.load(open(rep))["engine"] == {k: info[k] for k in ("engine", "version", "options", "serving", "mode", "question_digest", "inputs_digest")}
    assert "DynamicCache" in info["serving"] and info["errors"] == {}
    assert f"engine: transformers {transformers.__version__}" in r.stdout
    # the same through check --engine, in bf16 against the bf16 profile: an honest bf16 engine
    # never FAILs the bf16 profile; a case whose routing it resolved the other way at near-ties
    # compared too little and is INCONCLUSIVE, which --allow-inconclusive accepts (that it exits 1
    # without the flag: test_untrusted.py::test_inconclusive_cases_exit_1_unless_allowed; one
    # run here, as each starts torch and transformers)
    r = run_cli("check", smoke_dir, "--engine", "transformers", "--engine-option", "dtype=bfloat16",
                "--profile", "bf16", "--only", "model.*", "--allow-inconclusive", "--json", rep,
                module="oracles")
    got = json.load(open(rep))
    assert got["engine"]["options"]["dtype"] == "bfloat16"
    assert got["counts"]["fail"] == 0 and got["counts"]["pass"] >= 1
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.mark.peer
def test_a_bf16_engine_fails_float32_with_a_repro_naming_its_options(smoke_dir):
    pytest.importorskip("transformers")
    from oracles.checking.candidates import AdapterCandidate
    from oracles.checking.check import run_check

    adapter, info = engines.load_engine("transformers", {"dtype": "bfloat16"})
    base = "oracles check g --engine transformers --engine-option dtype=bfloat16"
    rep = run_check(smoke_dir, AdapterCandidate(adapter, engines.label(info)), "float32",
                    only="model.*", repro_base=base)
    (r,) = rep["cases"]
    assert r["status"] == "fail" and r["repro"].startswith(base)
    with pytest.raises(engines.OraclesError, match="transformers has no such option"):
        engines.load_engine("transformers", {"flash": "on"})
