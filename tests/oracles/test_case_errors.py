"""An engine's refusal or crash on the file route: `oracles run` records it per case
(CANDIDATE/cases/<id>/error.txt, written and read by oracles/format/candidate.py, and engine.json's
errors for --engine), and `oracles check GOLDEN CANDIDATE` reports it as ERROR with its message,
never as missing. The reading rules (untrusted input: regular file inside the candidate, bounded
read, first line, printable characters) are tested in test_candidate_untrusted.py; here, what the
writer writes is what the reader reads. The reproduce line carries the environment an engine
read."""

import json
import os
import sys
import textwrap

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from oracles import engines
from oracles.authoring import writer
from oracles.checking.candidates import load_adapter, write_outputs
from oracles.format.candidate import ERROR_CHARS, ERROR_FILE, error_reason, one_line, write_error
from oracles.format.digest import inputs_digest
from oracles.format.golden import Golden
from tests.helpers import run_main

ONLY = "gate.tiny,model.prefill.tiny"


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("errors") / "suite")
    writer.generate(out, "default", ONLY)
    return out


def _module(tmp_path, monkeypatch, name, body):
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop(name, None)
    return f"{name}:factory"


REFUSES_MODELS = """
    class A:
        def supports(self, case):
            return True

        def run(self, case):
            if case.is_model:
                raise RuntimeError("[GatherMM::eval] Currently only supports float32.\\nsecond line \\x1b[2J")
            from oracles.authoring.emulate import run_case
            return run_case(case, "float32")

    def factory():
        return A()
"""


def test_a_refused_case_is_recorded_and_checked_as_error_with_its_message(suite, tmp_path, monkeypatch):
    spec = _module(tmp_path, monkeypatch, "refuses_models", REFUSES_MODELS)
    cand = tmp_path / "cand"
    rc, out, _ = run_main("run", suite, "--adapter", spec, "--out", cand, module="oracles")
    assert rc == 1 and "error model.prefill.tiny: run() raised RuntimeError" in out
    text = (cand / "cases" / "model.prefill.tiny" / ERROR_FILE).read_text()
    assert text.count("\n") == 1 and "GatherMM" in text and "second line" in text  # one line
    assert "\x1b" not in text
    assert not (cand / "cases" / "model.prefill.tiny" / "outputs.safetensors").exists()
    rc, out, _ = run_main("check", suite, cand, "--json", tmp_path / "r.json", module="oracles")
    rep = json.load(open(tmp_path / "r.json"))
    status = {r["id"]: (r["status"], r.get("reason", "")) for r in rep["cases"]}
    assert status["gate.tiny"][0] == "pass"
    assert status["model.prefill.tiny"][0] == "error" and "GatherMM" in status["model.prefill.tiny"][1]
    assert rc == 1 and rep["counts"]["missing"] == 0 and rep["counts"]["error"] == 1
    assert "\x1b" not in out


def test_engine_json_records_the_errors_and_the_check_reads_them(suite, tmp_path, monkeypatch):
    """The --engine route: engine.json lists the errors beside the skips; a candidate whose
    error.txt is gone still reports the case as ERROR from engine.json."""
    spec = _module(tmp_path, monkeypatch, "refuses_models2", REFUSES_MODELS)
    monkeypatch.setitem(engines.ENGINES, "fake", ("refuses_models2_engine", "numpy", "none"))
    (tmp_path / "refuses_models2_engine.py").write_text(textwrap.dedent("""
        from refuses_models2 import A

        OPTIONS = {}

        class Engine(A):
            SERVING = "one request at a time"

            def __init__(self, options):
                self.options = {"dtype": "float32"}
    """))
    cand = tmp_path / "cand"
    rc, _, _ = run_main("run", suite, "--engine", "fake", "--out", cand, "--in-process", module="oracles")
    info = json.load(open(cand / "engine.json"))
    assert rc == 1 and "GatherMM" in info["errors"]["model.prefill.tiny"] and info["skipped"] == {}
    assert info["serving"] == "one request at a time"
    assert info["question_digest"] == Golden(suite).question_digest  # the suite it answers
    assert info["inputs_digest"] == inputs_digest(Golden(suite).manifest)
    os.remove(cand / "cases" / "model.prefill.tiny" / ERROR_FILE)
    rc, out, _ = run_main("check", suite, cand, module="oracles")
    assert rc == 1 and "ERROR" in out and "GatherMM" in out and "0 missing" in out
    assert spec


@given(st.text(max_size=3000))
@example("")
@example("  RuntimeError: out of memory  \nTraceback ...\n")
@example("\x1b[2J\u2028forged\rline\x00")
@example("x" * (ERROR_CHARS + 10))
def test_what_the_writer_writes_is_what_the_reader_reads(tmp_path_factory, reason):
    """write_error's one line comes back whole from error_reason: printable, one line, at most
    ERROR_CHARS characters, never empty (an empty reason says so)."""
    root = str(tmp_path_factory.mktemp("cand"))
    write_error(os.path.join(root, "cases", "c"), reason)
    line = one_line(reason)
    assert line and line.isprintable() and len(line) <= ERROR_CHARS and "\n" not in line
    assert error_reason(root, "c") == f"the engine reported an error ({ERROR_FILE}): {line}"
    assert error_reason(root, "other") is None
    words = " ".join("".join(ch if ch.isprintable() else " " for ch in reason).split())
    assert line == (words[:ERROR_CHARS] or "the engine failed (no message)")


def test_an_adapter_process_passes_how_the_engine_serves_into_engine_json(suite, tmp_path, monkeypatch):
    """The default route builds the adapter in a child process: the engine info it reports,
    `serving` included, reaches engine.json, which the strict reader accepts."""
    (tmp_path / "serving_info.py").write_text(textwrap.dedent("""
        class A:
            info = {"engine": "fake", "version": "1", "options": {"dtype": "float32"},
                    "serving": "one batched forward per step"}

            def supports(self, case):
                return True if case.id == "gate.tiny" else "only the gate"

            def run(self, case):
                from oracles.authoring.emulate import run_case
                return run_case(case, "float32")

        def factory():
            return A()
    """))
    monkeypatch.syspath_prepend(str(tmp_path))  # the adapter process takes this sys.path
    cand = tmp_path / "cand"
    rc, out, err = run_main("run", suite, "--adapter", "serving_info:factory", "--out", cand, module="oracles")
    assert rc == 0, err
    info = json.load(open(cand / "engine.json"))
    assert info["serving"] == "one batched forward per step" and info["skipped"] == {"model.prefill.tiny": "only the gate"}
    rc, out, err = run_main("check", suite, cand, module="oracles")
    assert rc == 0 and "1 passed" in out, out + err


def test_the_reproduce_line_carries_the_environment_the_engine_read(suite, tmp_path, monkeypatch):
    """llama.cpp reads LLAMA_CPP_CONVERTER: its reproduce line sets it (shown with a stand-in
    engine that declares the same variable)."""
    monkeypatch.setenv("LLAMA_CPP_CONVERTER", "/opt/llama cpp/convert_hf_to_gguf.py")
    assert engines.environment("llama.cpp") == {"LLAMA_CPP_CONVERTER": "/opt/llama cpp/convert_hf_to_gguf.py"}
    _module(tmp_path, monkeypatch, "env_engine", """
        ENVIRONMENT = ("LLAMA_CPP_CONVERTER", "NOT_SET_ANYWHERE")
        OPTIONS = {}

        class Engine:
            def __init__(self, options):
                self.options = {}

            def supports(self, case):
                return True

            def run(self, case):
                return {"logits": case.inputs["input_ids"][..., None] * 0.0}
    """)
    monkeypatch.setitem(engines.ENGINES, "envfake", ("env_engine", "numpy", "none"))
    rc, out, _ = run_main("check", suite, "--engine", "envfake", "--in-process", "--only", "model.prefill.tiny",
                          module="oracles")
    repro = [ln.strip() for ln in out.splitlines() if "--engine envfake" in ln]
    assert rc == 1 and repro, out
    assert repro[0].startswith("LLAMA_CPP_CONVERTER='/opt/llama cpp/convert_hf_to_gguf.py' oracles check ")
    assert "NOT_SET_ANYWHERE" not in repro[0]



def test_a_rerun_into_an_old_candidate_keeps_only_what_this_run_wrote(suite, tmp_path, monkeypatch):
    """write_outputs into the candidate of an earlier run (the engine matrix reuses its --work
    directory; `oracles run` refuses a non-empty --out): a case that failed last time and passes
    now loses its old error.txt, one that passed and fails now loses its old outputs, else the
    check would read a stale result."""
    cand = str(tmp_path / "cand")
    write_outputs(suite, load_adapter("oracles.adapters:refimpl_float32"), cand)
    ok, gate = (tmp_path / "cand" / "cases" / c for c in ("model.prefill.tiny", "gate.tiny"))
    assert (ok / "outputs.safetensors").exists() and not (ok / ERROR_FILE).exists()
    (gate / ERROR_FILE).write_text("RuntimeError: from an earlier run\n")
    spec = _module(tmp_path, monkeypatch, "refuses_models3", REFUSES_MODELS)
    errors = {}
    write_outputs(suite, load_adapter(spec), cand, errors=errors)
    assert list(errors) == ["model.prefill.tiny"]
    assert (ok / ERROR_FILE).exists() and not (ok / "outputs.safetensors").exists()
    assert (gate / "outputs.safetensors").exists() and not (gate / ERROR_FILE).exists()
