"""The golden suites on disk: what they hold, that they are reproducible, and that their expected
values say what the spec (docs/spec.md) says (checked here from the spec, not from refimpl's
output)."""

import filecmp
import json
import math
import os

import numpy as np
import pytest

import refimpl
from oracles.authoring import writer
from oracles.format import golden
from oracles.authoring.cases import KINDS
from oracles.authoring.suites import SUITES, suite_cases
from tests.helpers import run_cli


def _case(suite_dir, cid):
    g = golden.Golden(suite_dir)
    return g.load_case(cid), g.expected(cid), g.cases[cid]


def test_default_suite_is_small_and_quick_to_generate(default_suite):
    path, seconds = default_suite
    # 40 MB before the scenario and edge-value cases, 58 MB before the six config-separating
    # and near-tie model cases of issue 16 (69.5 MB after; 74.5 MB with issue 17's mixed step,
    # prefix blocks and preemption scenarios)
    assert writer.suite_size(path) < 75e6
    assert seconds < 120


def test_default_suite_has_every_case_kind():
    kinds = {b(cid).kind for cid, b in suite_cases("default")}
    assert kinds == set(KINDS) == {  # every kind of docs/conformance.md's table, registered and live
        "rms_norm", "yarn_tables", "rope_apply", "mla", "mla_decode", "gate", "moe", "fp8_dequant",
        "prefill", "decode", "greedy", "mtp_prefill", "mtp_module", "speculative", "training",
        "fp8_quant", "fp8_act_quant", "schedule", "mtp_speculation"}


def test_regenerating_gives_byte_identical_files(default_dir, tmp_path):
    again = tmp_path / "again"
    writer.generate(again, "default")
    cmp = filecmp.dircmp(default_dir, again)
    names = []
    for root, _, files in os.walk(default_dir):
        for f in files:
            rel = os.path.relpath(os.path.join(root, f), default_dir)
            names.append(rel)
            assert filecmp.cmp(os.path.join(default_dir, rel), again / rel, shallow=False), rel
    assert not cmp.left_only and not cmp.right_only
    assert "manifest.json" in names


def test_manifest_records_versions_seeds_tolerances_and_every_sha256(default_dir):
    m = json.load(open(os.path.join(default_dir, "manifest.json")))
    assert m["numpy"] == np.__version__ and m["generator"].startswith("oracles ")
    assert isinstance(m["seed"], int)
    assert m["conventions"]["expert_group_mask"] == "-inf" and m["conventions"]["topk_ties"] == "lower index"
    for entry in m["cases"]:
        d = os.path.join(default_dir, "cases", entry["id"])
        on_disk = [os.path.relpath(os.path.join(r, f), d).replace(os.sep, "/")
                   for r, _, fs in os.walk(d) for f in fs]
        assert sorted(entry["files"]) == sorted(on_disk)
        for f, digest in entry["files"].items():
            assert writer.sha256(os.path.join(d, f)) == digest
        for profile in ("float32", "bf16"):
            tols = entry["tolerances"][profile]
            assert [o["name"] for o in entry["outputs"]] == list(tols)
            for name, t in tols.items():  # tolerance and the calibrated error it came from
                for metric in ("nmse", "max_rel", "mismatch"):
                    if metric in t:
                        assert t[metric]["tol"] >= t[metric]["calibrated"]


def test_model_case_is_a_loadable_checkpoint_with_fixed_tensor_names(default_dir):
    case, exp, entry = _case(default_dir, "model.prefill.tiny")
    ids = case.inputs["input_ids"]
    assert ids.dtype == np.int64 and ids.ndim == 2
    model = refimpl.load(case.model_path)
    logits = model.forward(ids)
    assert exp["logits"].shape == ids.shape + (model.cfg.vocab_size,)
    assert exp["logits"].dtype == np.float64
    np.testing.assert_allclose(logits, exp["logits"], rtol=1e-12, atol=1e-12)
    names = [o["name"] for o in entry["outputs"]]
    assert names[0] == "embed" and names[-1] == "logits"
    assert names.index("layers.0.attn_out") < names.index("layers.0.hidden") < names.index("layers.1.attn_norm")
    assert "layers.1.topk_idx" in names and exp["layers.1.topk_idx"].dtype == np.int64


def test_v3_yarn_case_covers_positions_past_the_original_context(default_dir):
    case, exp, _ = _case(default_dir, "yarn_tables.v3")
    assert {4095, 4096, 100000} <= set(case.inputs["positions"].tolist())
    # spec section 3: softmax scale 192^-0.5 * 1.3688879^2; dims below low=10 keep theta^(-2i/64),
    # dims above high=23 are divided by 40.
    assert exp["softmax_scale"][0] == pytest.approx(0.13523378, rel=1e-7)
    base = 10000.0 ** (-2 * np.arange(32) / 64)
    np.testing.assert_allclose(exp["inv_freq"][:10], base[:10], rtol=1e-15)
    np.testing.assert_allclose(exp["inv_freq"][24:], base[24:] / 40, rtol=1e-15)
    p = case.inputs["positions"].tolist().index(100000)
    np.testing.assert_allclose(exp["cos"][p], np.cos(100000 * exp["inv_freq"]), atol=1e-9)


def test_rms_norm_expected_follows_the_formula(default_dir):
    case, exp, entry = _case(default_dir, "rms_norm.basic")
    x, w = case.inputs["x"].astype(np.float64), case.inputs["weight"].astype(np.float64)
    eps = entry["params"]["eps"]
    want = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * w
    np.testing.assert_allclose(exp["y"], want, rtol=1e-14)


def test_exact_ties_go_to_the_lower_index(default_dir):
    case, exp, _ = _case(default_dir, "gate.exact_ties")
    for picks in exp["topk_idx"].tolist():
        s = set(picks)
        for e in picks:
            if e % 2 == 1:  # expert e copies e-1: if e was chosen, so was e-1
                assert e - 1 in s
            if e >= 8:  # groups 2, 3 copy groups 0, 1
                assert e - 8 in s


def test_bias_below_bf16_resolution_decides_the_fourth_pick(default_dir):
    case, exp, _ = _case(default_dir, "gate.bias_below_bf16")
    b = case.inputs["bias"]
    import ml_dtypes
    assert b[5] > b[2] and b[5].astype(ml_dtypes.bfloat16) == b[2].astype(ml_dtypes.bfloat16)
    for picks in exp["topk_idx"].tolist():
        assert set(picks) == {0, 7, 9, 5}


def test_negative_biased_case_has_biased_scores_below_zero_and_picks_only_kept_groups(default_dir):
    case, exp, _ = _case(default_dir, "gate.negative_biased")
    biased = exp["router_scores"] + case.inputs["bias"].astype(np.float64)
    assert (biased < 0).mean() > 0.3
    groups = biased.reshape(len(biased), 4, 4)
    top2 = np.sort(groups, axis=-1)[..., -2:].sum(-1)  # group score: sum of the top two
    for t, picks in enumerate(exp["topk_idx"].tolist()):
        kept = set(np.argsort(-top2[t], kind="stable")[:2].tolist())
        assert {e // 4 for e in picks} <= kept


def test_named_edge_cases_are_in_the_default_suite(default_golden):
    g = default_golden
    c = {cid: g.load_case(cid) for cid in ("mla.q_lora_null", "model.prefill.one_token",
                                           "model.decode.start5", "fp8_dequant.unaligned",
                                           "model.prefill.softmax_scoring")}
    assert c["mla.q_lora_null"].config.q_lora_rank is None
    assert c["model.prefill.one_token"].inputs["input_ids"].shape[1] == 1
    assert c["model.decode.start5"].params["prefill"] == 5
    assert c["fp8_dequant.unaligned"].inputs["q"].shape[0] % 128 != 0
    assert c["model.prefill.softmax_scoring"].config.scoring_func == "softmax"


def test_fp8_dequant_expected_is_q_times_its_block_scale(default_dir):
    case, exp, _ = _case(default_dir, "fp8_dequant.unaligned")
    q, s = case.inputs["q"].astype(np.float64), case.inputs["scale_inv"]
    assert s.shape == (math.ceil(576 / 128), math.ceil(200 / 128))
    assert exp["w"][575, 199] == q[575, 199] * s[4, 1]
    assert exp["w"][127, 128] == q[127, 128] * s[0, 1]


def test_cli_list_and_generate(tmp_path):
    r = run_cli("list", module="oracles")
    assert r.returncode == 0 and all(name in r.stdout for name in SUITES)
    r = run_cli("list", "--suite", "smoke", module="oracles")
    assert "model.prefill.tiny" in r.stdout.split()
    out = tmp_path / "smoke"
    r = run_cli("generate", "--suite", "smoke", "--out", out, "--only", "gate.*", module="oracles")
    assert r.returncode == 0, r.stderr
    assert os.listdir(out / "cases") == ["gate.tiny"]
    r = run_cli("generate", "--suite", "smoke", "--out", out, module="oracles")
    assert r.returncode == 2 and "not an empty directory" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r = run_cli("generate", "--suite", "nope", "--out", tmp_path / "x", module="oracles")
    assert r.returncode == 2 and "unknown" in r.stderr


@pytest.mark.parametrize("build", ["gate", "mla_decode"])
def test_bf16_stored_inputs_are_computed_in_float64_for_the_truth(build):
    """The full-width suite stores its inputs and weights in bfloat16 (ml_dtypes, which numpy
    does not count as a floating dtype): the truth is still float64 arithmetic on those values,
    bit for bit what the same values given as float64 arrays give."""
    import dataclasses

    from oracles.authoring import emulate, precision, suites
    from refimpl import Config

    cfg = Config.preset("tiny")
    case = (suites.gate_case("t.gate", cfg, tokens=6, store=precision.BF16) if build == "gate"
            else suites.mla_decode_case("t.mla_decode", cfg, 1, 3, store=precision.BF16))
    assert any(v.dtype == precision.BF16 for v in case.inputs.values())
    as64 = dataclasses.replace(case, inputs={k: v.astype(np.float64) if v.dtype == precision.BF16 else v
                                             for k, v in case.inputs.items()})
    a, b = emulate.run_case(case, "float64"), emulate.run_case(as64, "float64")
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert precision._cast("w", case.inputs[next(iter(case.inputs))], "float32").dtype == np.float32
