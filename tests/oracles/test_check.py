"""The checker: the clean reference passes, and every kind of bad or wrong candidate is reported
as what it is (a failing output, a missing case, or bad input with exit code 2)."""

import json
import os
import shlex
import shutil

import numpy as np
import pytest

from oracles.format import golden
from oracles.checking.candidates import load_adapter, write_outputs
from oracles.checking.candidates import AdapterCandidate, DirCandidate
from oracles.checking.check import run_check
from refimpl.writer import write_safetensors
from tests.helpers import run_cli


def _outputs(cand_dir, cid):
    return golden.read_tensors(os.path.join(cand_dir, "cases", cid, "outputs.safetensors"))


def _rewrite(cand_dir, cid, change):
    """Apply change(outputs dict) to one case's candidate file."""
    out = _outputs(cand_dir, cid)
    change(out)
    write_safetensors(os.path.join(cand_dir, "cases", cid, "outputs.safetensors"), out)


@pytest.fixture
def candidate(default_dir, tmp_path):
    """A file-route candidate: refimpl in float32 on a few cases."""
    out = tmp_path / "candidate"
    write_outputs(default_dir, load_adapter("oracles.adapters:refimpl_float32"), out,
                  only="model.prefill.tiny,gate.*,greedy*,model.greedy.tiny")
    return str(out)


ONLY = "model.prefill.tiny,gate.*,model.greedy.tiny"


def _case_result(rep, cid):
    return next(r for r in rep["cases"] if r["id"] == cid)


def test_clean_reference_passes_the_default_suite_in_float32(default_dir, default_golden, tmp_path):
    report = tmp_path / "r.json"
    r = run_cli("check", default_dir, "--adapter", "oracles.adapters:refimpl_float32",
                "--json", report, module="oracles")
    assert r.returncode == 0, r.stdout[-3000:]
    rep = json.load(open(report))
    assert rep["ok"] and rep["counts"]["fail"] == 0 and rep["counts"]["skip"] == 0
    assert rep["counts"]["pass"] == len(default_golden.cases)
    assert "passed" in r.stdout.splitlines()[-1]


def _decided_and_sound(rep):
    """No case failed, and every inconclusive one really compared too little."""
    inconclusive = [r for r in rep["cases"] if r["status"] == "inconclusive"]
    return (rep["counts"]["fail"] == rep["counts"]["error"] == rep["counts"]["missing"] == 0
            and all(r["compared"]["fraction"] < rep["min_compared"] for r in inconclusive)
            and rep["counts"]["pass"] > len(inconclusive))


def test_reference_in_emulated_bf16_passes_the_bf16_profile_but_not_float32(default_golden):
    bf16 = load_adapter("oracles.adapters:refimpl_bf16")
    assert _decided_and_sound(run_check(default_golden, bf16, "bf16"))
    assert not run_check(default_golden, bf16, "float32", only="model.*")["ok"]


def test_reference_with_fp8_linears_passes_the_fp8_profile_only(default_golden):
    fp8 = load_adapter("oracles.adapters:refimpl_fp8")
    assert _decided_and_sound(run_check(default_golden, fp8, "fp8"))
    assert not run_check(default_golden, fp8, "bf16", only="model.prefill.tiny")["ok"]


def test_file_route_candidate_passes(default_dir, candidate):
    r = run_cli("check", default_dir, candidate, "--only", ONLY, module="oracles")
    assert r.returncode == 0, r.stdout


def test_cases_without_outputs_are_listed_as_missing_and_fail(default_golden, candidate):
    rep = run_check(default_golden, DirCandidate(candidate), only=ONLY + ",mla.tiny.naive")
    assert _case_result(rep, "mla.tiny.naive")["status"] == "missing"
    assert rep["counts"]["missing"] == 1 and not rep["ok"]


def test_missing_intermediates_are_listed_but_a_missing_required_output_fails(default_golden, candidate):
    _rewrite(candidate, "model.prefill.tiny", lambda o: o.pop("layers.0.c_q"))
    r = _case_result(run_check(default_golden, DirCandidate(candidate), only="model.prefill.tiny"),
                     "model.prefill.tiny")
    assert r["status"] == "pass" and r["not_provided"] == ["layers.0.c_q"]
    _rewrite(candidate, "model.prefill.tiny", lambda o: o.pop("logits"))
    r = _case_result(run_check(default_golden, DirCandidate(candidate), only="model.prefill.tiny"),
                     "model.prefill.tiny")
    assert r["status"] == "fail" and r["first_failure"] == "logits" and "missing" in r["reason"]


@pytest.mark.parametrize("name, change, words", [
    ("logits", lambda a: a[:, :-1], "shape"),
    ("layers.1.topk_idx", lambda a: a.astype(np.float32), "integer dtype"),
    ("logits", lambda a: a.astype(np.int64), "float dtype"),
    ("layers.2.hidden", lambda a: np.where(np.arange(a.size).reshape(a.shape) == 3, np.nan, a), "NaN"),
    ("logits", lambda a: np.full_like(a, np.inf), "NaN/Inf"),
])
def test_bad_candidate_tensors_fail_with_a_clear_message(default_golden, candidate, name, change, words):
    def edit(o):
        o[name] = np.ascontiguousarray(change(o[name]))
    _rewrite(candidate, "model.prefill.tiny", edit)
    r = _case_result(run_check(default_golden, DirCandidate(candidate), only="model.prefill.tiny"),
                     "model.prefill.tiny")
    assert r["status"] == "fail" and r["first_failure"] == name
    assert words in r["reason"]


def test_tampered_golden_is_bad_input(default_dir, candidate, tmp_path):
    tampered = tmp_path / "tampered"
    shutil.copytree(default_dir, tampered)
    p = tampered / "cases" / "gate.tiny" / "expected.safetensors"
    data = bytearray(p.read_bytes())
    data[-1] ^= 1
    p.write_bytes(bytes(data))
    r = run_cli("check", tampered, candidate, "--only", ONLY, module="oracles")
    assert r.returncode == 2
    assert "sha256" in r.stderr and "gate.tiny" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_unreadable_candidate_file_is_bad_input(default_dir, candidate):
    with open(os.path.join(candidate, "cases", "gate.tiny", "outputs.safetensors"), "wb") as f:
        f.write(b"not safetensors")
    r = run_cli("check", default_dir, candidate, "--only", "gate.tiny", module="oracles")
    assert r.returncode == 2 and "outputs.safetensors" in r.stderr


def test_report_names_the_first_failing_intermediate_and_a_command_that_reproduces_it(
        default_dir, candidate, tmp_path):
    def edit(o):  # a small error in layer 1's attention, which then flows downstream
        o["layers.1.attn_out"] = o["layers.1.attn_out"] * 1.001
        o["layers.1.h_attn"] = o["layers.1.h_attn"] + 1e-3 * o["layers.1.attn_out"]
        o["logits"] = o["logits"] * 1.001
    _rewrite(candidate, "model.prefill.tiny", edit)
    report = tmp_path / "r.json"
    r = run_cli("check", default_dir, candidate, "--only", ONLY, "--json", report, module="oracles")
    assert r.returncode == 1
    rep = json.load(open(report))
    res = _case_result(rep, "model.prefill.tiny")
    assert res["first_failure"] == "layers.1.attn_out"
    assert "layers.1.attn_out" in r.stdout and res["repro"] in r.stdout
    argv = shlex.split(res["repro"])
    assert argv[:2] == ["oracles", "check"]
    again = run_cli(*argv[1:], "--json", tmp_path / "again.json", module="oracles")
    assert again.returncode == 1
    rep2 = json.load(open(tmp_path / "again.json"))
    assert [c["id"] for c in rep2["cases"]] == ["model.prefill.tiny"]
    assert rep2["cases"][0]["first_failure"] == "layers.1.attn_out"


def test_a_wrong_scale_fails_even_where_the_direction_is_right(default_golden, candidate):
    _rewrite(candidate, "model.prefill.tiny", lambda o: o.update(logits=o["logits"] * 1.0001))
    r = _case_result(run_check(default_golden, DirCandidate(candidate), only="model.prefill.tiny"),
                     "model.prefill.tiny")
    assert r["first_failure"] == "logits" and "norm" in r["reason"]


def test_near_tie_tokens_are_forgiven_and_decided_tokens_are_not(default_golden, candidate):
    def swap_tie(o):  # exact ties: odd experts copy the even one before them
        idx = o["topk_idx"]
        t, j = next((t, j) for t in range(len(idx)) for j in range(idx.shape[1])
                    if idx[t, j] % 2 == 0 and idx[t, j] + 1 not in idx[t])
        idx[t, j] += 1  # the tied partner instead: a legitimate choice (torch.topk is unspecified)
    _rewrite(candidate, "gate.exact_ties", swap_tie)
    rep = run_check(default_golden, DirCandidate(candidate), only="gate.exact_ties")
    r = _case_result(rep, "gate.exact_ties")
    assert r["status"] == "pass" and "forgiven" in r["outputs"][1].get("message", "")

    def swap_decided(o):
        idx = o["topk_idx"]
        idx[0, 0] = next(e for e in range(16) if e not in idx[0])
    _rewrite(candidate, "gate.tiny", swap_decided)
    r = _case_result(run_check(default_golden, DirCandidate(candidate), only="gate.tiny"), "gate.tiny")
    assert r["status"] == "fail" and r["first_failure"] == "topk_idx"


def test_a_changed_greedy_token_fails(default_golden, candidate):
    def edit(o):
        o["tokens"][0, 3] = (o["tokens"][0, 3] + 1) % 256
    _rewrite(candidate, "model.greedy.tiny", edit)
    r = _case_result(run_check(default_golden, DirCandidate(candidate), only="model.greedy.tiny"),
                     "model.greedy.tiny")
    assert r["status"] == "fail" and r["first_failure"] == "tokens"


class _Partial:
    """An adapter that supports only gates and crashes on one of them."""

    def supports(self, case):
        return True if case.kind == "gate" else "only gates here"

    def run(self, case):
        if case.id == "gate.tiny":
            raise RuntimeError("kernel exploded")
        from oracles.authoring.emulate import run_case
        return run_case(case, "float32")


def test_adapter_skips_are_listed_with_reasons_and_crashes_are_errors(default_golden):
    rep = run_check(default_golden, AdapterCandidate(_Partial(), "partial"), only="gate.*,rms_norm.*")
    assert _case_result(rep, "rms_norm.basic") == {**_case_result(rep, "rms_norm.basic"),
                                                   "status": "skip", "reason": "only gates here"}
    crashed = _case_result(rep, "gate.tiny")
    assert crashed["status"] == "error" and "kernel exploded" in crashed["reason"]
    assert _case_result(rep, "gate.negative_biased")["status"] == "pass"
    assert rep["counts"]["error"] == 1 and not rep["ok"]


@pytest.mark.parametrize("args, words", [
    (["--adapter", "no_such_module:factory"], "cannot import"),
    (["--adapter", "oracles.adapters"], "pkg.module:factory"),
    (["--adapter", "oracles.adapters:refimpl_float32", "--profile", "int4"], "not one of"),
    ([], "exactly one of"),
])
def test_bad_options_are_one_line_errors_with_exit_2(default_dir, args, words):
    r = run_cli("check", default_dir, *args, "--only", "gate.tiny", module="oracles")
    assert r.returncode == 2 and words in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_not_a_golden_directory_is_bad_input(tmp_path):
    r = run_cli("check", tmp_path, tmp_path, module="oracles")
    assert r.returncode == 2 and "manifest.json" in r.stderr


def test_outputs_written_by_the_safetensors_library_are_read(default_dir, default_golden, tmp_path):
    """The file route as docs/conformance.md shows it: another writer, only the logits."""
    from safetensors.numpy import load_file, save_file

    import refimpl

    out = tmp_path / "cand" / "cases" / "model.prefill.tiny"
    os.makedirs(out)
    d = os.path.join(default_dir, "cases", "model.prefill.tiny")
    ids = load_file(os.path.join(d, "inputs.safetensors"))["input_ids"]
    model = refimpl.load(os.path.join(d, "model"), dtype="float32")
    save_file({"logits": model.forward(ids)}, str(out / "outputs.safetensors"))
    r = _case_result(run_check(default_golden, DirCandidate(str(tmp_path / "cand")), only="model.prefill.tiny"),
                     "model.prefill.tiny")
    assert r["status"] == "pass" and "layers.0.attn_out" in r["not_provided"]


def test_a_forgiven_routing_difference_taints_what_follows_it_in_its_row():
    from oracles.format.taint import Taint, collect

    e_idx = np.array([[[0, 1], [2, 3], [4, 5], [6, 7]], [[0, 1], [2, 3], [4, 5], [6, 7]]])
    c_idx = e_idx.copy()
    c_idx[0, 1] = [2, 9]  # a near-tie resolved the other way at position 1 of row 0
    c_idx[1, 2] = [4, 9]  # a decided token routed differently: a failure, not a taint
    margin = np.array([[1.0, 1e-9, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0]])
    names = ["layers.1.topk_idx", "layers.1.hidden", "layers.2.hidden", "logits", "mtp.1.logits"]
    taint = Taint("mtp_prefill", names)
    collect(taint, [(n, "indices" if n.endswith("topk_idx") else "continuous") for n in names],
            {"layers.1.topk_idx": e_idx, "layers.1.topk_margin": margin}, {"layers.1.topk_idx": c_idx},
            {"layers.1.topk_idx": {"margin_eps": 1e-6}})
    # the layer's own output at position 1 only; after the next attention from position 1 on
    assert taint.mask("layers.1.hidden", (2, 4)).tolist() == [[False, True, False, False], [False] * 4]
    assert taint.mask("layers.2.hidden", (2, 4)).tolist() == [[False, True, True, True], [False] * 4]
    hidden = np.arange(2 * 4 * 3).reshape(2, 4, 3)
    assert taint.select(hidden, "logits", 2).shape == (5, 3)
    # an MTP module (one index shorter) continues positions 0..2 of these rows
    assert taint.mask("mtp.1.logits", (2, 3)).tolist() == [[False, True, True], [False] * 3]
    assert taint.mask("layers.1.topk_idx", (2, 4)) is None  # nothing upstream of the routing
    moe = Taint("moe", ["topk_idx", "out"])  # a single MoE layer: only the token itself
    collect(moe, [("topk_idx", "indices"), ("out", "continuous")],
            {"topk_idx": e_idx.reshape(8, 2), "topk_margin": margin.reshape(8)},
            {"topk_idx": c_idx.reshape(8, 2)}, {"topk_idx": {"margin_eps": 1e-6}})
    assert moe.mask("out", (8,)).tolist() == [False, True] + [False] * 6


def test_run_writes_an_adapter_as_files_that_check_accepts(default_dir, tmp_path):
    cand = tmp_path / "cand"
    r = run_cli("run", default_dir, "--adapter", "oracles.adapters:refimpl_float32", "--out", cand,
                "--only", "gate.tiny,mla.tiny.naive", module="oracles")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(cand / "cases")) == ["gate.tiny", "mla.tiny.naive"]
    r = run_cli("check", default_dir, cand, "--only", "gate.tiny,mla.tiny.naive", module="oracles")
    assert r.returncode == 0, r.stdout


def test_the_fp8_profile_is_calibrated_through_refimpls_fp8_gemm(default_golden, monkeypatch):
    """Every FP8 linear of the emulated fp8 run goes through refimpl.fp8.fp8_gemm (weights as
    stored BlockFP8), in component and model cases alike; kv_b_proj is dequantised."""
    from refimpl import fp8
    from oracles.authoring.emulate import run_case

    shapes = []
    real = fp8.fp8_gemm

    def spy(x, w, block=fp8.BLOCK):
        shapes.append(w.shape)
        return real(x, w, block)
    monkeypatch.setattr(fp8, "fp8_gemm", spy)
    g = default_golden
    for cid in ("mla.tiny.naive", "model.prefill.tiny"):
        shapes.clear()
        case = g.load_case(cid)
        run_case(case, "fp8")
        cfg = case.config
        q_a = (cfg.q_lora_rank, cfg.hidden_size)
        kv_b = (cfg.num_attention_heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)
        assert q_a in shapes and kv_b not in shapes, (cid, set(shapes))
        if case.is_model:  # dense FFN and experts too
            assert (cfg.moe_intermediate_size, cfg.hidden_size) in shapes
    shapes.clear()
    run_case(g.load_case("model.prefill.tiny"), "bf16")
    assert shapes == []


def test_an_opened_suite_is_judged_as_its_path_is(default_dir, default_golden):
    """check_suite takes the suite opened once (a sweep over profiles and mutants): the report is
    the one its path gives, and the opening options go to the opening, not to the check."""
    cand = load_adapter("oracles.mutants:rsf_twice")
    by_path = run_check(default_dir, cand, "bf16", only="gate.*")
    opened = run_check(default_golden, cand, "bf16", only="gate.*")
    for r in by_path["cases"] + opened["cases"]:
        r.pop("seconds", None)
    assert opened == by_path and not opened["ok"] and opened["golden"] == default_dir
    with pytest.raises(ValueError, match="when a suite is opened"):
        run_check(default_golden, cand, "bf16", only="gate.tiny", expect_digest=default_golden.digest)
