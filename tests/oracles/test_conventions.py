"""The conventions suite labels each SPEC.md section 9 alternative, so that a check tells which
one an engine follows."""

import pytest

from oracles.adapters import load_adapter
from oracles.check import run_check

OURS = {"yarn_activation": "always", "group_mask": "neg_inf", "gate_precision": "float32",
        "group_score": "top2_sum", "softmax_mscale": "mscale_all_dim", "rope_layout": "adjacent_pairs",
        "mtp_concat": "embedding_first", "mtp_h0": "final_norm"}
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
]


def _followed(rep):
    return {t: sorted(a for a, ok in alts.items() if ok) for t, alts in rep["conventions"].items()}


def test_the_reference_follows_this_projects_conventions_and_passes(conventions_dir):
    rep = run_check(conventions_dir, load_adapter("oracles.adapters:refimpl_float32"))
    assert _followed(rep) == {t: [a] for t, a in OURS.items()}
    assert rep["ok"] and rep["counts"]["not_followed"] > 0


@pytest.mark.parametrize("mutant, topic, alternative", ALTERNATIVES)
def test_an_engine_with_another_convention_is_labelled_with_it(conventions_dir, mutant, topic,
                                                              alternative):
    rep = run_check(conventions_dir, load_adapter(f"oracles.mutants:{mutant}"),
                    only=f"conv.{topic}.*")
    assert _followed(rep) == {topic: [alternative]}
