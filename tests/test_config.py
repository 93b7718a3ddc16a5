"""Config: both rope spellings, round trips, presets, and refusal of numbers that don't fit."""

import json
import os
import time

import pytest

from refimpl import Config, ConfigError
from refimpl.config import LIMITS, RopeScaling

SHARED_V3 = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "reference",
                         "deepseek-v3-config.json")


def test_deepseek_v3_preset_has_the_published_numbers():
    c = Config.preset("deepseek-v3")
    assert (c.hidden_size, c.num_attention_heads, c.qk_nope_head_dim, c.qk_rope_head_dim,
            c.v_head_dim, c.kv_lora_rank, c.q_lora_rank) == (7168, 128, 128, 64, 128, 512, 1536)
    assert (c.num_hidden_layers, c.first_k_dense_replace, c.intermediate_size) == (61, 3, 18432)
    assert (c.n_routed_experts, c.moe_intermediate_size, c.n_shared_experts,
            c.num_experts_per_tok, c.n_group, c.topk_group) == (256, 2048, 1, 8, 8, 4)
    assert (c.routed_scaling_factor, c.scoring_func, c.topk_method, c.vocab_size) == \
        (2.5, "sigmoid", "noaux_tc", 129280)
    assert c.rope_scaling == RopeScaling(factor=40, original_max_position_embeddings=4096,
                                         beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0)
    assert c.rope_theta == 10000 and c.num_nextn_predict_layers == 1 and c.rms_norm_eps == 1e-6


@pytest.mark.skipif(not os.path.exists(SHARED_V3),
                    reason="the project's shared/reference/deepseek-v3-config.json is not beside "
                           "this checkout")
def test_deepseek_v3_preset_is_exactly_the_reference_file():
    with open(SHARED_V3) as f:
        ref = json.load(f)
    assert Config.preset("deepseek-v3").to_dict() == dict(sorted(ref.items()))


def test_round_trip_through_json_both_rope_forms(tmp_path):
    for name in ("tiny", "deepseek-v3"):
        c = Config.preset(name)
        for form in ("published", "transformers5"):
            p = tmp_path / f"{name}-{form}.json"
            c.to_json(p, rope_form=form)
            assert Config.from_json(p) == c


def test_transformers5_rope_parameters_are_read():
    d = Config.preset("tiny").to_dict()
    del d["rope_scaling"], d["rope_theta"]
    d["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 5000.0, "factor": 4.0,
                            "original_max_position_embeddings": 32, "beta_fast": 32,
                            "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}
    c = Config.from_dict(d)
    assert c.rope_theta == 5000.0
    assert c.rope_scaling.factor == 4.0 and c.rope_scaling.mscale_all_dim == 0.707
    d["rope_parameters"] = {"rope_type": "default", "rope_theta": 5000.0}
    assert Config.from_dict(d).rope_scaling is None


def test_q_lora_rank_null_means_direct_q_proj():
    d = Config.preset("tiny").to_dict()
    d["q_lora_rank"] = None
    assert Config.from_dict(d).q_lora_rank is None


def test_v2_defaults_are_softmax_and_greedy():
    d = Config.preset("tiny").to_dict()
    for k in ("scoring_func", "topk_method", "norm_topk_prob"):
        del d[k]
    d["model_type"] = "deepseek_v2"
    c = Config.from_dict(d)
    assert (c.scoring_func, c.topk_method, c.norm_topk_prob, c.uses_bias) == \
        ("softmax", "greedy", False, False)


@pytest.mark.parametrize("change, field", [
    ({"n_routed_experts": 15}, "n_routed_experts"),
    ({"topk_group": 5}, "topk_group"),
    ({"num_experts_per_tok": 9}, "num_experts_per_tok"),  # 2 kept groups x 4 experts = 8
    ({"qk_rope_head_dim": 7}, "qk_rope_head_dim"),
    ({"hidden_size": 0}, "hidden_size"),
    ({"kv_lora_rank": -4}, "kv_lora_rank"),
    ({"num_attention_heads": 2.5}, "num_attention_heads"),
    ({"scoring_func": "relu"}, "scoring_func"),
    ({"topk_method": "best"}, "topk_method"),
    ({"rms_norm_eps": 0}, "rms_norm_eps"),
    ({"q_lora_rank": 0}, "q_lora_rank"),
    ({"rope_scaling": {"type": "yarn", "factor": 4}}, "original_max_position_embeddings"),
    ({"rope_scaling": {"type": "linear", "factor": 4}}, "rope type"),
    ({"model_type": "llama"}, "model_type"),
    ({"rope_scaling": {"type": "yarn", "factor": 4, "original_max_position_embeddings": 8,
                       "attention_factor": 1.2}}, "attention_factor"),
    ({"rope_scaling": {"type": "yarn", "factor": 4, "original_max_position_embeddings": 8,
                       "truncate": False}}, "truncate"),
])
def test_configs_that_do_not_fit_are_refused_naming_the_field(change, field):
    d = Config.preset("tiny").to_dict()
    d.update(change)
    with pytest.raises(ConfigError, match=field):
        Config.from_dict(d, source="cfg.json")


def test_missing_required_field_is_named(tmp_path):
    d = Config.preset("tiny").to_dict()
    del d["kv_lora_rank"]
    p = tmp_path / "config.json"
    p.write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=r"config.json.*kv_lora_rank"):
        Config.from_json(p)


def test_not_json_is_refused_naming_the_file(tmp_path):
    p = tmp_path / "config.json"
    p.write_text("{not json")
    with pytest.raises(ConfigError, match="config.json: not valid JSON"):
        Config.from_json(p)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="preset 'huge' is unknown"):
        Config.preset("huge")


# ---- untrusted config.json: strict JSON types, finite floats in range, bounded counts ----------

def _written(tmp_path, text):
    p = tmp_path / "config.json"
    p.write_text(text)
    return p


def _refused_json(tmp_path, change, *needles):
    """Write the tiny config with `change` (raw JSON text per key) and expect a ConfigError
    naming the file and `needles`."""
    d = Config.preset("tiny").to_dict()
    text = json.dumps(d)
    for key, raw in change.items():
        assert f'"{key}": ' in text, key
        head, tail = text.split(f'"{key}": ', 1)
        value_end = len(json.dumps(d[key])) if key in d else None
        text = head + f'"{key}": {raw}' + tail[value_end:]
    p = _written(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        Config.from_json(p)
    msg = str(e.value)
    assert "\n" not in msg and str(p) in msg, msg
    for n in needles:
        assert n in msg, msg
    return msg


@pytest.mark.parametrize("key, raw", [
    ("routed_scaling_factor", "NaN"), ("rope_theta", "Infinity"), ("rms_norm_eps", "-Infinity"),
    ("rms_norm_eps", "NaN"),
])
def test_nan_and_infinity_are_refused_naming_the_field(tmp_path, key, raw):
    _refused_json(tmp_path, {key: raw}, key, "finite")


def test_nan_inside_rope_scaling_is_named_by_its_path(tmp_path):
    d = Config.preset("tiny").to_dict()
    text = json.dumps(d).replace('"factor": 40.0', '"factor": NaN')
    with pytest.raises(ConfigError, match=r"rope_scaling\.factor must be a finite number"):
        Config.from_json(_written(tmp_path, text))


@pytest.mark.parametrize("key, raw", [
    ("tie_word_embeddings", '"false"'), ("norm_topk_prob", '"no"'), ("norm_topk_prob", "1"),
    ("attention_bias", '"false"'), ("tie_word_embeddings", "0"), ("norm_topk_prob", "null"),
])
def test_string_or_number_booleans_are_refused(tmp_path, key, raw):
    _refused_json(tmp_path, {key: raw}, key, "true or false")


@pytest.mark.parametrize("key, raw", [
    ("num_hidden_layers", "64.9"), ("hidden_size", "64.0"), ("vocab_size", "true"),
    ("n_routed_experts", '"16"'), ("num_nextn_predict_layers", "[1]"),
])
def test_floats_booleans_or_strings_for_integers_are_refused(tmp_path, key, raw):
    _refused_json(tmp_path, {key: raw}, key, "must be an integer")


@pytest.mark.parametrize("key, raw", [
    ("routed_scaling_factor", "true"), ("rope_theta", '"10000"'), ("rms_norm_eps", "false"),
])
def test_booleans_or_strings_for_floats_are_refused(tmp_path, key, raw):
    _refused_json(tmp_path, {key: raw}, key, "must be a number")


@pytest.mark.parametrize("key, raw", [
    ("rms_norm_eps", "2.0"), ("rope_theta", "1e300"), ("routed_scaling_factor", "-1"),
    ("routed_scaling_factor", "0"),
])
def test_floats_out_of_their_documented_range_are_refused(tmp_path, key, raw):
    _refused_json(tmp_path, {key: raw}, key, "finite number in")


@pytest.mark.parametrize("key, raw", [
    ("scoring_func", '["sigmoid"]'), ("topk_method", "1"), ("hidden_act", '"gelu"'),
    ("model_type", '["deepseek_v3"]'),
])
def test_strings_outside_their_known_sets_are_refused(tmp_path, key, raw):
    _refused_json(tmp_path, {key: raw}, key)


@pytest.mark.parametrize("key", sorted(LIMITS))
def test_every_count_has_a_documented_maximum(key):
    d = Config.preset("tiny").to_dict()
    d[key] = LIMITS[key] + 1
    with pytest.raises(ConfigError, match=f"{key} must be from"):
        Config.from_dict(d, source="cfg.json")


@pytest.mark.parametrize("key, value", [
    ("num_hidden_layers", 10**9), ("n_routed_experts", 10**8), ("num_nextn_predict_layers", 10**8),
    ("vocab_size", 2**63), ("hidden_size", 10**30),
])
def test_huge_counts_are_refused_at_once(key, value):
    d = Config.preset("tiny").to_dict()
    d[key] = value
    t = time.perf_counter()
    with pytest.raises(ConfigError, match=key):
        Config.from_dict(d, source="cfg.json")
    assert time.perf_counter() - t < 0.5


def test_counts_each_within_bounds_whose_product_is_huge_are_refused():
    d = Config.preset("tiny").to_dict()
    d.update(num_hidden_layers=1000, n_routed_experts=4096, n_group=1, topk_group=1)
    with pytest.raises(ConfigError, match="imply about .* tensors, more than the 1,048,576"):
        Config.from_dict(d, source="cfg.json")


def test_duplicate_keys_are_refused(tmp_path):
    text = json.dumps(Config.preset("tiny").to_dict())
    text = text.replace('"hidden_size": 64', '"hidden_size": 64, "hidden_size": 32')
    with pytest.raises(ConfigError, match="duplicate key 'hidden_size'"):
        Config.from_json(_written(tmp_path, text))


@pytest.mark.parametrize("key", ["factor", "original_max_position_embeddings"])
def test_null_for_a_required_yarn_field_is_refused(key):  # found by tests/test_fuzz_inputs.py
    d = Config.preset("tiny").to_dict()
    d["rope_scaling"][key] = None
    with pytest.raises(ConfigError, match=f"rope_scaling.{key} is required for yarn"):
        Config.from_dict(d, source="cfg.json")


def test_float_for_original_max_position_embeddings_is_refused():
    d = Config.preset("tiny").to_dict()
    d["rope_scaling"]["original_max_position_embeddings"] = 64.5
    with pytest.raises(ConfigError, match="original_max_position_embeddings must be an integer"):
        Config.from_dict(d, source="cfg.json")


def test_token_ids_must_be_non_negative_integers():
    for bad in (-1, 1.5, "1", True, [1, "x"]):
        d = Config.preset("tiny").to_dict()
        d["eos_token_id"] = bad
        with pytest.raises(ConfigError, match="eos_token_id must be a token id"):
            Config.from_dict(d, source="cfg.json")


def test_a_fifo_or_directory_is_not_read(tmp_path):
    os.mkfifo(tmp_path / "fifo.json")
    with pytest.raises(ConfigError, match="not a regular file"):
        Config.from_json(tmp_path / "fifo.json")  # would block for ever if opened plainly
    with pytest.raises(ConfigError, match="not a regular file"):
        Config.from_json(tmp_path)


def test_values_from_the_file_are_escaped_in_messages():
    d = Config.preset("tiny").to_dict()
    d["scoring_func"] = "x\nrefimpl: all good\x1b[2K"
    with pytest.raises(ConfigError) as e:
        Config.from_dict(d, source="cfg.json")
    assert "\n" not in str(e.value) and "\x1b" not in str(e.value) and "\\n" in str(e.value)
