"""The conventions suite labels each spec section 9 alternative, so that a check tells which
one an engine follows."""

import pytest

from oracles.checking.candidates import load_adapter
from oracles.checking.candidates import AdapterCandidate
from oracles.checking.check import run_check
from oracles.authoring.emulate import run_case
from oracles.authoring.mutants import MUTANTS

OURS = {"yarn_activation": "always", "group_mask": "neg_inf", "gate_precision": "float32",
        "group_score": "top2_sum", "softmax_mscale": "mscale_all_dim", "rope_layout": "adjacent_pairs",
        "mtp_concat": "embedding_first", "mtp_h0": "final_norm", "topk_ties": "lower_index",
        "latent_norm_eps": "class_default"}
# passed by every candidate with a right gate, whatever its tie-break
ALSO = {"topk_ties": ["unspecified"]}
ALTERNATIVES = [
    ("yarn_only_when_extended", "yarn_activation", "only_when_extended"),
    ("zero_group_mask", "group_mask", "zero"),
    ("bf16_gate_bias", "gate_precision", "bf16_bias"),
    ("bf16_gate", "gate_precision", "bf16_gate"),
    ("group_score_max", "group_score", "max"),
    ("mscale_not_all_dim", "softmax_mscale", "mscale"),
    ("no_softmax_mscale", "softmax_mscale", "none"),
    ("rotate_half_rope", "rope_layout", "rotate_half"),
    ("mtp_concat_swapped", "mtp_concat", "hidden_first"),
    ("mtp_pre_norm_h0", "mtp_h0", "pre_norm"),
    ("ties_higher_index", "topk_ties", "higher_index"),
    # vLLM, SGLang and llama.cpp: the latent norms at rms_norm_eps (spec section 9.3)
    ("latent_norm_eps_from_config", "latent_norm_eps", "rms_norm_eps"),
]


def _followed(rep):
    return {t: sorted(a for a, ok in alts.items() if ok) for t, alts in rep["conventions"].items()}


def test_the_reference_follows_this_projects_conventions_and_passes(conventions_dir):
    rep = run_check(conventions_dir, load_adapter("oracles.adapters:refimpl_float32"))
    assert _followed(rep) == {t: sorted([a] + ALSO.get(t, [])) for t, a in OURS.items()}
    assert rep["ok"] and rep["counts"]["not_followed"] > 0


@pytest.mark.parametrize("mutant, topic, alternative", ALTERNATIVES)
def test_an_engine_with_another_convention_is_labelled_with_it(conventions_dir, mutant, topic,
                                                              alternative):
    rep = run_check(conventions_dir, load_adapter(f"oracles.mutants:{mutant}"),
                    only=f"conv.{topic}.*")
    assert _followed(rep) == {topic: sorted([alternative] + ALSO.get(topic, []))}


class _Ties:
    """refimpl in float32 with ties to the lower index on even tokens and to the higher index on
    odd ones (neither rule), its router scores optionally scaled (a wrong gate)."""

    def __init__(self, score_scale=1.0):
        self.score_scale = score_scale

    def supports(self, case):
        return True

    def run(self, case):
        out = run_case(case, "float32")
        higher = run_case(case, "float32", MUTANTS["ties_higher_index"])
        for k in ("topk_idx", "topk_weight"):
            out[k][1::2] = higher[k][1::2]
        out["router_scores"] = out["router_scores"] * self.score_scale
        return out


def test_an_engine_with_another_tie_break_is_not_failed_but_a_wrong_gate_is(conventions_dir):
    mixed = run_check(conventions_dir, AdapterCandidate(_Ties(), "mixed"), only="conv.topk_ties.*")
    assert mixed["ok"] and mixed["counts"]["not_followed"] == 2
    assert _followed(mixed) == {"topk_ties": ["unspecified"]}
    wrong = run_check(conventions_dir, AdapterCandidate(_Ties(score_scale=1.01), "wrong"),
                      only="conv.topk_ties.*")
    assert wrong["counts"]["fail"] == 3 and _followed(wrong) == {"topk_ties": []}
