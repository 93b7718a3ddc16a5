"""Accounting (spec section 8): the headline numbers come out of the config, and per-part
counts agree with the formulas of spec sections 4-6 written out by hand here."""

import functools
import json

import pytest

import refimpl
from refimpl import accounting
from tests.helpers import run_cli

V3 = refimpl.Config.preset("deepseek-v3")


@functools.lru_cache(maxsize=None)
def v3_summary():
    return accounting.summary(V3)


def attention_params(c):
    """MLA weights from the shapes of spec section 4, norms included."""
    h, d = c.num_attention_heads, c.hidden_size
    qk = c.qk_nope_head_dim + c.qk_rope_head_dim
    if c.q_lora_rank is None:
        q = d * h * qk  # q_proj
    else:
        q = d * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * h * qk  # W^DQ, norm, W^UQ/W^QR
    return (q + d * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank  # W^DKV, W^KR, norm
            + c.kv_lora_rank * h * (c.qk_nope_head_dim + c.v_head_dim)  # W^UK, W^UV
            + h * c.v_head_dim * d)  # W^O


def swiglu_params(d, inter):
    return 3 * d * inter


def test_deepseek_v3_total_is_671_026_419_200():
    s = v3_summary()
    assert s["total_params"] == 671_026_419_200


def test_deepseek_v3_total_equals_the_sum_of_its_parts_by_hand():
    c = V3
    d, v = c.hidden_size, c.vocab_size
    dense = attention_params(c) + 2 * d + swiglu_params(d, c.intermediate_size)
    moe_ffn = (c.n_routed_experts * d + c.n_routed_experts  # gate and its bias
               + (c.n_routed_experts + c.n_shared_experts) * swiglu_params(d, c.moe_intermediate_size))
    moe = attention_params(c) + 2 * d + moe_ffn
    n_dense = c.first_k_dense_replace
    total = 2 * v * d + d + n_dense * dense + (c.num_hidden_layers - n_dense) * moe
    assert v3_summary()["total_params"] == total


def test_deepseek_v3_moe_layer_has_11_320_164_608_params_398_196_992_active():
    layer = accounting.layer_summary(V3, 3)
    assert layer["kind"] == "moe"
    assert layer["ffn_total"] == 11_320_164_608
    assert layer["ffn_active"] == 398_196_992


def test_deepseek_v3_active_per_token_is_about_37_5b_and_36_6b_without_embedding():
    s = v3_summary()
    assert round(s["active_params_per_token"] / 1e9, 1) in (37.5, 37.6)  # 37.55B
    assert round(s["active_params_per_token_without_embedding"] / 1e9, 1) == 36.6
    emb = V3.vocab_size * V3.hidden_size
    assert s["active_params_per_token"] - s["active_params_per_token_without_embedding"] == emb


def test_active_is_total_minus_the_unselected_routed_experts():
    c = V3
    s = v3_summary()
    moe_layers = c.num_hidden_layers - c.first_k_dense_replace
    idle = moe_layers * (c.n_routed_experts - c.num_experts_per_tok) \
        * swiglu_params(c.hidden_size, c.moe_intermediate_size)
    assert s["active_params_per_token"] == s["total_params"] - idle


def test_mtp_module_is_about_11_6b_unique():
    c = V3
    s = v3_summary()
    d = c.hidden_size
    layer = accounting.layer_summary(c, 3)["total"]  # an MoE decoder layer
    unique = layer + 2 * d + 2 * d * d + d  # enorm, hnorm, eh_proj (d x 2d), shared_head.norm
    assert s["mtp_params_unique"] == unique
    assert round(unique / 1e9, 1) == 11.6
    assert s["mtp_params"] == unique + 2 * c.vocab_size * d  # plus the stored emb/head copies


def test_latent_cache_is_576_values_per_token_per_layer_against_40960():
    kv = accounting.kv_cache(V3, "bf16")
    assert kv["mla_values_per_token_per_layer"] == 576
    assert kv["mha_values_per_token_per_layer"] == 128 * (128 + 64) + 128 * 128
    assert kv["mla_bytes_per_token"] == 576 * 61 * 2
    assert kv["mla_bytes_context"] == 576 * 61 * 2 * 128 * 1024
    assert kv["mla_fraction_of_mha"] == pytest.approx(0.0140625)
    assert "multi-head" in kv["baseline"] and "128 heads" in kv["baseline"]


def test_small_config_counts_match_formulas():
    c = refimpl.Config.preset("tiny")
    s = accounting.summary(c)
    d = c.hidden_size
    assert s["main_components"]["attention"] == c.num_hidden_layers * attention_params(c)
    assert s["main_components"]["routed_experts"] == (
        (c.num_hidden_layers - c.first_k_dense_replace) * c.n_routed_experts
        * swiglu_params(d, c.moe_intermediate_size))


def test_q_lora_null_config_counts_the_direct_query_projection():
    c = refimpl.Config.preset("tiny").replace(q_lora_rank=None)
    assert accounting.layer_summary(c, 0)["components"]["attention"] == attention_params(c)


def test_info_cli_prints_the_headline_numbers():
    r = run_cli("info", "--preset", "deepseek-v3")
    assert r.returncode == 0, r.stderr
    assert "671,026,419,200" in r.stdout
    assert "11,320,164,608" in r.stdout and "398,196,992" in r.stdout
    assert "576 values/token/layer" in r.stdout
    assert "91,991 tensors, 688,574,839,360 bytes" in r.stdout
    j = run_cli("info", "--preset", "deepseek-v3", "--json", "--cache-dtype", "fp8")
    info = json.loads(j.stdout)
    assert info["total_params"] == 671_026_419_200
    assert info["kv_cache"]["mla_bytes_per_token"] == 576 * 61


def test_info_cli_reads_a_config_file(tmp_path):
    cfg = refimpl.Config.preset("tiny")
    cfg.to_json(tmp_path / "config.json")
    r = run_cli("info", "--config", tmp_path / "config.json", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["total_params"] == accounting.summary(cfg)["total_params"]


def test_bytes_read_per_decode_token_are_the_active_weights_as_stored():
    c = V3
    s = v3_summary()
    moe_layers = c.num_hidden_layers - c.first_k_dense_replace
    # BF16 everywhere: 2 bytes per active parameter, the embedding as one row, the gate bias F32
    bf16 = accounting.active_bytes_per_token(c, fp8=False)
    assert bf16 == 2 * (s["active_params_per_token_without_embedding"] + c.hidden_size) \
        + 2 * moe_layers * c.n_routed_experts
    fp8 = accounting.active_bytes_per_token(c, fp8=True)
    assert s["fp8_bytes_read_per_decode_token"] == fp8
    assert 0.5 * bf16 < fp8 < 0.6 * bf16  # FP8 halves the projections; head, gate stay BF16
