"""Suites real engines can load: a model case's checkpoint is a clean directory (config.json,
model.safetensors, a byte-level BPE tokenizer matching the vocabulary, generation_config.json,
nothing else); configs are those of published models unless a case is labelled a spec edge; the
engine suite has the real per-head attention widths."""

import json
import os
import shutil

import numpy as np
import pytest
from hypothesis import example, given, settings, strategies as st

import refimpl
from oracles.authoring import writer
from oracles.format import golden
from oracles.authoring import tokenizer
from oracles.authoring.suites import EDGE, suite_cases


def _manifest(path):
    return json.load(open(os.path.join(path, "manifest.json")))


def test_byte_alphabet_is_gpt2s_printable_bijection():
    a = tokenizer.byte_alphabet()
    assert len(set(a.values())) == 256
    # the values every byte-level BPE vocabulary (GPT-2, DeepSeek) uses
    assert a[0x20] == "\u0120" == "Ġ" and a[0x0A] == "\u010a" == "Ċ" and a[0x00] == "\u0100"
    assert a[ord("A")] == "A" and a[0xFF] == "\xff" and a[0xAD] == "\u0143"


@given(st.integers(5, 2000))
@example(5)
@example(64)
@example(256)
@example(258)
@example(259)
@example(129280)
@settings(max_examples=25, deadline=None)
def test_vocabulary_has_exactly_vocab_size_tokens_specials_and_valid_merges(v):
    tokens, merges, special = tokenizer.vocabulary(v, 0, 1)
    assert len(tokens) == v == len(set(tokens))
    assert special == [0, 1] and tokens[0] == tokenizer.BOS and tokens[1] == tokenizer.EOS
    assert len(merges) >= 1
    ids = {t: i for i, t in enumerate(tokens)}
    for rank, (left, right) in enumerate(merges):  # each merge joins two earlier tokens
        assert ids[left] < ids[left + right] and ids[right] < ids[left + right]
    n_bytes = v - 2 - len(merges)
    assert n_bytes == min(256, v - 3)
    assert {tokens[2], tokens[3]} == {"Ċ", "Ġ"}  # newline and space are always in


def test_tokenizer_files_load_and_round_trip_with_the_tokenizers_library(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    cfg = refimpl.Config.preset("tiny")
    tokenizer.write(str(tmp_path), cfg)
    tok = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert tok.get_vocab_size() == cfg.vocab_size
    enc = tok.encode("the cat\nsat on a mat!")
    assert tok.decode(enc.ids) == "the cat\nsat on a mat!"
    assert "Ġ!" in tok.get_vocab()  # the first merge
    assert tok.encode(" !").tokens == ["Ġ!"]  # ... is applied
    assert tok.token_to_id(tokenizer.BOS) == 0 and tok.token_to_id(tokenizer.EOS) == 1
    tc = json.load(open(tmp_path / "tokenizer_config.json"))
    gc = json.load(open(tmp_path / "generation_config.json"))
    assert tc["bos_token"] == tokenizer.BOS and gc["eos_token_id"] == cfg.eos_token_id == 1


def test_model_cases_are_clean_checkpoint_directories(default_dir):
    m = _manifest(default_dir)
    assert m["format"] == golden.SUITE_FORMAT == 3  # 3: format 2 and its question digest
    models = [e for e in m["cases"] if e["model"]]
    assert len(models) >= 15
    for e in models:
        d = os.path.join(default_dir, "cases", e["id"])
        assert sorted(os.listdir(os.path.join(d, "model"))) == sorted(golden.MODEL_FILES), e["id"]
        assert {"inputs.safetensors", "expected.safetensors", "model"} == set(os.listdir(d))
        assert e["model_dir"] == "model" and "model/model.safetensors" in e["files"]
        cfg = refimpl.Config.from_json(os.path.join(d, "model", "config.json"))
        tok = json.load(open(os.path.join(d, "model", "tokenizer.json")))
        assert len(tok["model"]["vocab"]) == cfg.vocab_size and tok["model"]["merges"]


def test_published_configs_are_the_default_and_spec_edges_are_labelled(default_dir):
    for e in _manifest(default_dir)["cases"]:
        if not e["model"]:
            assert "edge" not in e
            continue
        cfg = refimpl.Config.from_json(os.path.join(default_dir, "cases", e["id"], "model", "config.json"))
        arch = json.load(open(os.path.join(default_dir, "cases", e["id"], "model", "config.json")))["architectures"]
        if cfg.topk_method == "noaux_tc":
            assert cfg.model_type == "deepseek_v3" and arch == ["DeepseekV3ForCausalLM"], e["id"]
        else:  # V2 routing is labelled as DeepSeek-V2 ships it
            assert cfg.model_type == "deepseek_v2" and arch == ["DeepseekV2ForCausalLM"], e["id"]
        in_the_wild = cfg.n_shared_experts >= 1 and cfg.q_lora_rank is not None
        assert ("edge" in e) == (not in_the_wild), e["id"]
        if "edge" in e:
            assert e["edge"] in EDGE.values()
    ids = {e["id"] for e in _manifest(default_dir)["cases"] if "edge" in e}
    assert ids == {"model.prefill.q_lora_null", "model.prefill.no_shared_experts"}


def test_engine_suite_has_the_real_attention_widths():
    cases = [b(cid) for cid, b in suite_cases("engine")]
    assert {c.kind for c in cases} == {"prefill", "decode", "greedy"}
    for c in cases:
        cfg = c.config
        assert (cfg.kv_lora_rank, cfg.qk_rope_head_dim, cfg.qk_nope_head_dim, cfg.v_head_dim) == (512, 64, 128, 128)
        assert cfg.kv_lora_rank + cfg.qk_rope_head_dim == 576  # vLLM's CPU MLA kernel's only width
        assert cfg.num_attention_heads <= 8 and cfg.num_hidden_layers <= 3 and cfg.n_routed_experts <= 16
        assert cfg.vocab_size <= 1024 and cfg.n_shared_experts >= 1 and cfg.q_lora_rank is not None


def test_format_1_suites_are_still_read(tmp_path):
    """The flat layout (config.json and model.safetensors next to the inputs) loads as before."""
    new = tmp_path / "new"
    writer.generate(new, "smoke", only="model.prefill.tiny")
    old = tmp_path / "old"
    shutil.copytree(new, old)
    d = old / "cases" / "model.prefill.tiny"
    for f in ("config.json", "model.safetensors"):
        os.replace(d / "model" / f, d / f)
    shutil.rmtree(d / "model")
    m = _manifest(old)
    m["format"] = 1
    e = m["cases"][0]
    e.pop("model_dir")
    e["files"] = {k.removeprefix("model/"): v for k, v in e["files"].items()
                  if k.removeprefix("model/") in ("config.json", "model.safetensors")
                  or "/" not in k}
    json.dump(m, open(old / "manifest.json", "w"))
    a, b = golden.Golden(str(new)).load_case(e["id"]), golden.Golden(str(old)).load_case(e["id"])
    assert a.model_path.endswith("model") and b.model_path == str(d)
    assert a.config == b.config
    assert all(np.array_equal(a.weights[k], b.weights[k]) for k in a.weights)


def test_a_vocabulary_too_small_for_a_merge_is_refused():
    with pytest.raises(ValueError, match="no room"):
        tokenizer.vocabulary(4, 0, 1)


def test_our_safetensors_writer_stores_non_contiguous_views_as_they_read(tmp_path):
    """safetensors 0.8.0's save_file writes a non-contiguous numpy view wrong; refimpl's writer
    (used for suites and `oracles run` candidates) makes every array contiguous first."""
    from refimpl.writer import write_safetensors

    x = np.arange(48, dtype=np.float32).reshape(6, 8)
    views = {"strided": x[:, ::2], "transposed": x.T, "reversed": x[::-1], "column": x[:, 3]}
    assert not any(v.flags.c_contiguous for v in views.values())
    write_safetensors(str(tmp_path / "v.safetensors"), views)
    back = golden.read_tensors(str(tmp_path / "v.safetensors"))
    for k, v in views.items():
        np.testing.assert_array_equal(back[k], v, err_msg=k)
