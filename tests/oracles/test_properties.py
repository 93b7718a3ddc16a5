"""Properties of the checker over drawn configs and inputs (hypothesis, derandomized): what it
forgives and what it always catches."""

import numpy as np
from hypothesis import given
from hypothesis import strategies as st

from oracles.authoring import writer

from oracles.format import golden
from oracles.authoring.cases import KINDS
from oracles.format.schema import output_type
from oracles.checking.check import judge
from oracles.authoring.emulate import run_case
from oracles.authoring.mutants import MUTANTS
from oracles.authoring.suites import draw_config, gate_case, rope_case

seeds = st.integers(0, 2**32 - 1)


def _judge(case, cand, profile="float32"):
    truth, aux, tols = writer.compute(case)
    required = set(KINDS[case.kind].required(case))
    outputs = [{"name": k, "type": output_type(k), "required": k in required} for k in truth]
    return judge(case.kind, outputs, {**truth, **aux}, cand, tols[profile])


@given(seeds)
def test_the_float32_reference_passes_any_drawn_gate_case(seed):
    case = gate_case(f"prop.{seed}", draw_config(np.random.default_rng(seed)))
    assert _judge(case, run_case(case, "float32"))["status"] == "pass"


@given(seeds, st.randoms(use_true_random=False))
def test_the_order_of_a_tokens_experts_does_not_matter(seed, rnd):
    case = gate_case(f"prop.{seed}", draw_config(np.random.default_rng(seed)))
    cand = run_case(case, "float32")
    for t in range(len(cand["topk_idx"])):  # permute each token's picks and weights together
        perm = list(range(cand["topk_idx"].shape[1]))
        rnd.shuffle(perm)
        cand["topk_idx"][t] = cand["topk_idx"][t][perm]
        cand["topk_weight"][t] = cand["topk_weight"][t][perm]
    assert _judge(case, cand)["status"] == "pass"


@given(seeds)
def test_biased_weights_are_caught_unless_one_normalised_expert_hides_them(seed):
    cfg = draw_config(np.random.default_rng(seed))
    case = gate_case(f"prop.{seed}", cfg)
    res = _judge(case, run_case(case, "float32", mutant=MUTANTS["bias_in_weights"]))
    if cfg.num_experts_per_tok == 1 and cfg.norm_topk_prob:  # the one weight is 1 either way
        assert res["status"] == "pass"
    else:
        assert res["status"] == "fail" and res["first_failure"] == "topk_weight"


@given(seeds)
def test_rotate_half_rope_is_always_caught(seed):
    cfg = draw_config(np.random.default_rng(seed))  # d_R is 4 or 8: the layouts differ
    case = rope_case(f"prop.{seed}", cfg, np.arange(1, 6))
    res = _judge(case, run_case(case, "float32", mutant=MUTANTS["rotate_half_rope"]))
    assert res["status"] == "fail" and res["first_failure"] == "out"


@given(seeds, st.floats(1e-3, 1e-1))
def test_a_uniform_scale_error_is_caught_by_the_norm_ratio(seed, rel):
    case = rope_case(f"prop.{seed}", draw_config(np.random.default_rng(seed)), np.arange(4))
    cand = run_case(case, "float32")
    cand["out"] = cand["out"] * (1 + rel)
    res = _judge(case, cand)
    assert res["status"] == "fail" and "norm" in res["reason"]


def test_an_all_zero_output_matched_by_zeros_has_no_error_and_anything_else_does():
    """Found by oracles search (an fp8 quantisation of an all-zero block): the norm ratio of two
    zero arrays was |0 / tiny - 1| = 1, so an exact candidate failed."""
    from oracles.format import metrics

    zero = np.zeros((2, 3))
    assert metrics.continuous(zero, zero) == {"nmse": 0.0, "max_rel": 0.0, "norm": 0.0}
    off = metrics.continuous(zero + 1e-30, zero)
    assert off["norm"] > 1 and off["nmse"] > 1 and off["max_rel"] > 1
