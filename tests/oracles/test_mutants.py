"""The checker catches the bugs real engines shipped (spec section 9): the default suite fails
every mutant in the catalogue, and the report names the intermediate where the bug first shows."""

import os

import pytest

from oracles.checking.candidates import load_adapter
from oracles.checking.check import run_check
from oracles.authoring.mutants import MUTANTS
from tests.helpers import run_cli

THOROUGH = os.environ.get("HYPOTHESIS_PROFILE") == "thorough"

# mutant -> (a case it must fail, the first failing output the report must name there),
# reasoned from where each bug enters the dataflow:
FIRST_FAILURE = {
    # routing bugs show in the first MoE layer (layer 0 is dense in the tiny preset)
    "zero_group_mask": ("model.prefill.negative_biased", "layers.1.topk_idx"),
    "group_score_max": ("model.prefill.tiny", "layers.1.topk_idx"),
    "bias_in_weights": ("model.prefill.tiny", "layers.1.topk_weight"),
    "bf16_gate": ("model.prefill.tiny", "layers.1.router_scores"),
    # a bias difference below bf16 resolution decides this case's 4th expert
    "bf16_gate_bias": ("gate.bias_below_bf16", "topk_idx"),
    # the softmax factor changes nothing before the attention output
    "no_softmax_mscale": ("model.prefill.tiny", "layers.0.attn_out"),
    "mscale_not_all_dim": ("model.prefill.mscale_differs", "layers.0.attn_out"),
    # rope bugs show in the rotated query of the first layer
    "rotate_half_rope": ("model.prefill.tiny", "layers.0.q_rope"),
    "yarn_only_when_extended": ("model.prefill.tiny", "layers.0.q_rope"),
    # the concatenation is eh_proj's input; h^0 is recorded as the module's h_prev
    "mtp_concat_swapped": ("mtp_prefill.tiny", "mtp.1.eh_proj"),
    "mtp_pre_norm_h0": ("mtp_prefill.tiny", "mtp.1.h_prev"),
    # serving paths: only a schedule takes them, and they show in the attention of the request
    # (and layer) where the path is taken first
    "lse_base2_merge": ("scenario.chunked_prefill.small", "request.0.layers.0.attn_out"),
    # request 2 joins late: its prefill shares a forward with the others' decode steps
    "empty_chunk_finite_lse": ("scenario.ragged_batch.small", "request.2.layers.0.attn_out"),
    "mixed_batch_missplit": ("scenario.ragged_batch.small", "request.2.layers.0.attn_out"),
    "kv_stride_drift": ("scenario.decode.past_256", "request.0.layers.0.attn_out"),
    "decode_no_softmax_mscale": ("model.decode.start5", "layers.0.attn_out"),
    # routing weights: the scores and the choice are right, the weights are not
    "rsf_twice": ("gate.tiny", "topk_weight"),
    "rsf_skipped_without_norm": ("gate.no_norm_topk_prob", "topk_weight"),
    "sigmoid_underflow": ("gate.logits_below_88", "router_scores"),
    "topk_renorm_epsilon": ("gate.logits_below_88", "topk_weight"),
    # the dense layer's attention and FFN are right; the residual sum it leaves is not
    "residual_rescaled_dense": ("model.prefill.tiny", "layers.0.hidden"),
    # MTP: module 1's logits are right, the h^1 it hands to module 2 is not
    "mtp_chain_pre_norm": ("mtp_prefill.depth2", "mtp.1.hidden"),
    "mtp_no_head_norm": ("mtp_prefill.tiny", "mtp.1.head_norm"),
    "mtp_zero_first_embedding": ("mtp_prefill.tiny", "mtp.1.embed"),
    # FP8 inside the model path: q_a_proj is the first FP8 linear (c_q); a halving of every
    # weight passes through q_a_layernorm unseen and shows in q_b_proj's output
    "fp8_scale_transposed": ("model.prefill.fp8_blocks", "layers.0.c_q"),
    "fp8_partial_block_scale": ("model.prefill.fp8_blocks", "layers.0.c_q"),
    "fp8_pow2_scale_not_requantised": ("model.prefill.fp8_blocks", "layers.0.c_q"),
    "e4m3fnuz_read": ("model.prefill.fp8_blocks", "layers.0.q_nope"),
    "fp8_amax_unclamped": ("fp8_act_quant.zero_and_tiny_blocks", "q"),
    # the engines' divergences (docs/engines.md) and the readings of config fields
    # (oracles/authoring/readings.py): each shows where the field is read first
    "group_score_top2_for_v2": ("model.prefill.v2_group_top2", "layers.1.topk_idx"),
    "group_score_top_k_over_m": ("model.prefill.top_k_over_m", "layers.1.topk_idx"),
    "mscale_read_as_mscale_all_dim": ("model.prefill.mscale_differs", "layers.0.q_rope"),
    "yarn_factor_from_ratio": ("model.prefill.yarn_factor_not_ratio", "layers.0.q_rope"),
    "single_expert_not_renormalised": ("model.prefill.single_expert", "layers.1.topk_weight"),
    "rms_norm_eps_ignored": ("model.prefill.rms_norm_eps", "layers.0.attn_norm"),
    "latent_norm_eps_from_config": ("model.prefill.rms_norm_eps", "layers.0.c_q"),
    "fp8_dequant_to_bf16": ("model.prefill.fp8_blocks", "layers.0.c_q"),
}

SPEC_TOPICS = {"expert-group mask", "gate precision", "bias in weights", "group score",
               "YaRN activation", "mscale", "rope layout", "MTP concat", "MTP h0", "top-k ties",
               "chunked prefill", "mixed batch", "KV layout", "routed scaling factor",
               "top-k renormalisation", "residual scaling", "MTP chain", "MTP head norm",
               "MTP embedding", "FP8 scales", "FP8 format", "FP8 activation scale",
               "YaRN factor", "RMSNorm eps", "latent norm eps", "FP8 dequantisation"}


def test_the_catalogue_covers_the_spec_topics_and_each_mutant_has_an_expectation():
    assert set(FIRST_FAILURE) == {n for n, m in MUTANTS.items() if not m.allowed}
    assert {m.spec_topic for m in MUTANTS.values()} == SPEC_TOPICS


@pytest.mark.parametrize("name", sorted(FIRST_FAILURE))
def test_default_suite_fails_the_mutant_at_the_right_intermediate(default_golden, name):
    """The fast profile judges the mutant on its case only (what is asserted is that case's
    verdict; a case's verdict does not depend on the others); the thorough profile runs it on the
    whole suite, as `oracles check` would."""
    cid, first = FIRST_FAILURE[name]
    rep = run_check(default_golden, load_adapter(f"oracles.mutants:{name}"), "float32",
                    only=None if THOROUGH else cid)
    assert not rep["ok"]
    res = next(r for r in rep["cases"] if r["id"] == cid)
    assert res["status"] == "fail"
    assert res["first_failure"] == first, res.get("reason")


# Every profile's verdict on every mutant: tests/oracles/test_catalogue.py.
GATE_PRECISION = ("bf16_gate", "bf16_gate_bias")


@pytest.mark.parametrize("name", GATE_PRECISION)
def test_gate_precision_mutants_pass_the_bf16_and_fp8_profiles(default_golden, name):
    """A bf16 gate (or gate bias) is the rounding these profiles allow (catalogue.ALLOWED); the
    designed margins are beyond it, so it routes no token of the suite differently and nothing
    is left to judge by its router input (oracles/checking/routing.py) - except where the gate
    logits are below -88: scores of e^-93 rounded to bf16 (a subnormal spacing of 9e-41) lose
    every digit, and the whole-bf16 gate renormalises 0/0."""
    for profile in ("bf16", "fp8"):
        rep = run_check(default_golden, load_adapter(f"oracles.mutants:{name}"), profile,
                        allow_inconclusive=True)
        failed = {r["id"]: r for r in rep["cases"] if r["status"] == "fail"}
        if name == "bf16_gate":
            assert list(failed) == ["gate.logits_below_88"], profile
            assert "NaN" in failed["gate.logits_below_88"]["reason"]
        else:
            assert rep["ok"] and rep["counts"]["fail"] == 0, profile


def test_an_allowed_alternative_passes_the_default_suite_where_it_chooses_differently(default_golden):
    """Breaking exact ties by the higher index is not a bug: the suite forgives exact ties (the
    conventions suite labels the rule instead)."""
    (name,) = [n for n, m in MUTANTS.items() if m.allowed]
    rep = run_check(default_golden, load_adapter(f"oracles.mutants:{name}"), "float32", only="gate.*")
    assert rep["ok"]
    res = next(r for r in rep["cases"] if r["id"] == "gate.exact_ties")
    assert res["not_compared"]  # it did choose other experts than the expected file's


def test_yarn_only_when_extended_passes_where_the_run_is_longer_than_the_original(default_golden):
    rep = run_check(default_golden, load_adapter("oracles.mutants:yarn_only_when_extended"), "float32",
                    only="model.prefill.beyond_original,model.prefill.tiny")
    status = {r["id"]: r["status"] for r in rep["cases"]}
    assert status == {"model.prefill.beyond_original": "pass", "model.prefill.tiny": "fail"}


def test_rms_norm_eps_ignored_changes_a_model_whose_eps_is_not_1e6():
    from oracles.authoring.emulate import run_case
    from oracles.authoring.suites import prefill_case, tiny

    for eps, differs in ((1e-6, False), (1e-2, True)):
        case = prefill_case("eps", tiny(rms_norm_eps=eps), batch=1, seq=4)
        right = run_case(case, "float64")["logits"]
        wrong = run_case(case, "float64", MUTANTS["rms_norm_eps_ignored"])["logits"]
        assert (abs(right - wrong).max() > 1e-6) == differs, eps


def test_a_mutant_is_a_failing_candidate_on_the_command_line(default_dir):
    r = run_cli("check", default_dir, "--adapter", "oracles.mutants:zero_group_mask",
                "--only", "model.*", module="oracles")
    assert r.returncode == 1
    assert "layers.1.topk_idx" in r.stdout
    assert "--only model.prefill.negative_biased --profile float32" in r.stdout


def test_kv_stride_drift_is_caught_under_fp8_rounding_too(default_golden):
    """The drifted V rows are 43 of scenario.decode.past_256's 300 keys: the fp8 profile's
    tolerance hid them while its calibration saw the emulated run's own routing flips; with the
    case's routing margins designed it is tight enough."""
    cand = load_adapter("oracles.mutants:kv_stride_drift")
    for p in ("bf16", "fp8"):
        assert run_check(default_golden, cand, p, only="scenario.decode.past_256")["counts"]["fail"] == 1


SERVING_PATH = ("lse_base2_merge", "empty_chunk_finite_lse", "mixed_batch_missplit", "kv_stride_drift",
                "decode_no_softmax_mscale")


@pytest.mark.parametrize("name", SERVING_PATH)
def test_serving_path_bugs_are_invisible_to_a_whole_sequence_prefill(default_golden, name):
    """spec section 10: a single whole-sequence prefill never takes these paths; only the
    cases that make the engine take them (schedules, decode steps) fail."""
    rep = run_check(default_golden, load_adapter(f"oracles.mutants:{name}"), "float32",
                    only="model.prefill.*,mtp_prefill.*,mla.*")
    assert rep["ok"], [(r["id"], r.get("reason")) for r in rep["cases"] if r["status"] != "pass"]
