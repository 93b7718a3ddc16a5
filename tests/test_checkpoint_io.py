"""Checkpoints in the HF layout: round trips, names, and refusal of inconsistent ones."""

import json
import os

import ml_dtypes
import numpy as np
import pytest

import refimpl
from refimpl import CheckpointError, Config
from refimpl.checkpoint import Checkpoint
from refimpl.layout import tensor_plan
from refimpl.writer import make_checkpoint, random_weights, save_checkpoint, write_safetensors
from tests.helpers import rel_err

TINY = Config.preset("tiny")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt") / "tiny"
    make_checkpoint(d, TINY, seed=0)
    return d


def test_checkpoint_round_trip_gives_the_in_memory_model(tiny_dir):
    tokens = np.random.default_rng(0).integers(0, 256, (2, 20))
    from_disk = refimpl.load(tiny_dir).forward(tokens)
    stored = {k: v.astype(np.float32) for k, v in random_weights(TINY, 0).items()}
    in_memory = refimpl.Model.from_arrays(TINY, stored).forward(tokens)
    np.testing.assert_array_equal(from_disk, in_memory)


def test_the_hf_names_are_written(tiny_dir):
    names = set(Checkpoint(tiny_dir).names())
    for n in ("model.layers.0.self_attn.kv_a_proj_with_mqa.weight", "model.layers.0.mlp.gate_proj.weight",
              "model.layers.1.mlp.experts.15.down_proj.weight", "model.layers.1.mlp.gate.weight",
              "model.layers.2.mlp.gate.e_score_correction_bias",
              "model.layers.2.mlp.shared_experts.up_proj.weight", "lm_head.weight",
              "model.layers.3.eh_proj.weight", "model.layers.3.shared_head.head.weight",
              "model.layers.3.enorm.weight", "model.layers.3.embed_tokens.weight"):
        assert n in names
    assert names == set(tensor_plan(TINY))
    assert Checkpoint(tiny_dir).has_mtp()


def test_random_models_are_well_scaled_and_norms_are_not_constant():
    w = random_weights(TINY, 0)
    assert w["model.layers.0.input_layernorm.weight"].std() > 0.1
    assert w["model.layers.1.mlp.gate.e_score_correction_bias"].std() > 0.01
    assert random_weights(TINY, 0)["lm_head.weight"].tobytes() == w["lm_head.weight"].tobytes()
    assert random_weights(TINY, 1)["lm_head.weight"].tobytes() != w["lm_head.weight"].tobytes()


def test_bf16_storage_keeps_the_gate_bias_float32(tmp_path):
    save_checkpoint(tmp_path / "bf16", TINY, random_weights(TINY, 0), store_dtype="bfloat16")
    c = Checkpoint(tmp_path / "bf16")
    assert c.dtype("model.layers.1.self_attn.o_proj.weight") == "BF16"
    assert c.dtype("model.layers.1.mlp.gate.e_score_correction_bias") == "F32"
    tokens = np.arange(10).reshape(1, 10)
    a = refimpl.load(tmp_path / "bf16").forward(tokens)
    w = random_weights(TINY, 0)
    rounded = {k: v if k.endswith("bias") else v.astype(ml_dtypes.bfloat16).astype(np.float64)
               for k, v in w.items()}
    assert rel_err(a, refimpl.Model.from_arrays(TINY, rounded).forward(tokens)) < 1e-14


def _copy_without(src, dst, drop=None, reshape=None, poison=None):
    c = Checkpoint(src)
    arrays = {n: np.array(c.raw(n)) for n in c.names() if n != drop}
    if reshape:
        arrays[reshape] = arrays[reshape][:-1]
    if poison:
        arrays[poison] = arrays[poison].copy()
        arrays[poison].flat[3] = np.nan
    os.makedirs(dst)
    Config.from_json(os.path.join(src, "config.json")).to_json(os.path.join(dst, "config.json"))
    write_safetensors(os.path.join(dst, "model.safetensors"), arrays)


def test_missing_tensor_is_named(tiny_dir, tmp_path):
    _copy_without(tiny_dir, tmp_path / "c", drop="model.layers.2.mlp.experts.3.up_proj.weight")
    with pytest.raises(CheckpointError, match=r"model.layers.2.mlp.experts.3.up_proj.weight is missing"):
        refimpl.load(tmp_path / "c")


def test_wrong_shape_is_named(tiny_dir, tmp_path):
    _copy_without(tiny_dir, tmp_path / "c", reshape="model.layers.0.self_attn.kv_b_proj.weight")
    with pytest.raises(CheckpointError, match=r"kv_b_proj.weight has shape \[127, 32\], config.json implies \[128, 32\]"):
        refimpl.load(tmp_path / "c")


def test_nan_in_a_weight_is_named_with_its_layer(tiny_dir, tmp_path):
    _copy_without(tiny_dir, tmp_path / "c", poison="model.layers.1.self_attn.o_proj.weight")
    m = refimpl.load(tmp_path / "c")
    with pytest.raises(CheckpointError, match=r"o_proj.weight \(layer 1\) contains NaN"):
        m.forward(np.zeros((1, 2), dtype=np.int64))


def test_partial_mtp_layer_is_refused_and_absent_mtp_is_fine(tiny_dir, tmp_path):
    _copy_without(tiny_dir, tmp_path / "partial", drop="model.layers.3.eh_proj.weight")
    with pytest.raises(CheckpointError, match="model.layers.3.eh_proj.weight is missing"):
        refimpl.load(tmp_path / "partial")
    c = Checkpoint(tiny_dir)
    arrays = {n: np.array(c.raw(n)) for n in c.names() if not n.startswith("model.layers.3.")}
    os.makedirs(tmp_path / "nomtp")
    TINY.to_json(tmp_path / "nomtp" / "config.json")
    write_safetensors(str(tmp_path / "nomtp" / "model.safetensors"), arrays)
    assert not Checkpoint(tmp_path / "nomtp").has_mtp()
    refimpl.load(tmp_path / "nomtp")


def test_writing_into_a_non_empty_directory_is_refused_and_leaves_nothing(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "keep").write_text("mine")
    with pytest.raises(CheckpointError, match="already exists"):
        make_checkpoint(tmp_path / "x", TINY)
    assert os.listdir(tmp_path / "x") == ["keep"]
    assert [p for p in os.listdir(tmp_path) if p.startswith(".refimpl")] == []


def test_safetensors_files_are_readable_by_the_safetensors_library(tiny_dir):
    from safetensors.numpy import load_file

    d = load_file(os.path.join(tiny_dir, "model.safetensors"))
    c = Checkpoint(tiny_dir)
    n = "model.layers.1.mlp.experts.0.gate_proj.weight"
    np.testing.assert_array_equal(d[n], c.raw(n))
    assert json.load(open(os.path.join(tiny_dir, "config.json")))["model_type"] == "deepseek_v3"


def test_gate_bias_existence_comes_from_the_checkpoint(tiny_dir, tmp_path):
    """Without any e_score_correction_bias the model selects by the scores alone (as a zero bias
    would); with the bias missing from only some layers the checkpoint is refused."""
    c = Checkpoint(tiny_dir)
    arrays = {n: np.array(c.raw(n)) for n in c.names() if not n.endswith("e_score_correction_bias")}
    os.makedirs(tmp_path / "nobias")
    TINY.to_json(tmp_path / "nobias" / "config.json")
    write_safetensors(str(tmp_path / "nobias" / "model.safetensors"), arrays)
    tokens = np.random.default_rng(1).integers(0, 256, (1, 30))
    got = refimpl.load(tmp_path / "nobias", max_memory=8 * 2**30).forward(tokens)
    zero = {n: np.array(c.raw(n)) for n in c.names()}
    for n in zero:
        if n.endswith("e_score_correction_bias"):
            zero[n] = np.zeros_like(zero[n])
    np.testing.assert_array_equal(got, refimpl.Model.from_arrays(TINY, zero).forward(tokens))
    assert rel_err(got, refimpl.load(tiny_dir).forward(tokens)) > 1e-6  # the bias mattered
    _copy_without(tiny_dir, tmp_path / "partial", drop="model.layers.2.mlp.gate.e_score_correction_bias")
    with pytest.raises(CheckpointError, match="layers.2.mlp.gate.e_score_correction_bias is missing"):
        refimpl.load(tmp_path / "partial")


def test_has_mtp_needs_every_module(tmp_path):
    cfg = TINY.replace(num_nextn_predict_layers=2)
    w = random_weights(cfg, 0)
    save_checkpoint(tmp_path / "d2", cfg, w)
    assert Checkpoint(tmp_path / "d2").has_mtp()
    c = Checkpoint(tmp_path / "d2")
    arrays = {n: np.array(c.raw(n)) for n in c.names() if not n.startswith("model.layers.4.")}
    os.makedirs(tmp_path / "d1")
    cfg.to_json(tmp_path / "d1" / "config.json")
    write_safetensors(str(tmp_path / "d1" / "model.safetensors"), arrays)
    assert not Checkpoint(tmp_path / "d1").has_mtp()


def test_a_biasless_checkpoint_still_runs_its_mtp_module(tiny_dir, tmp_path):
    c = Checkpoint(tiny_dir)
    arrays = {n: np.array(c.raw(n)) for n in c.names() if not n.endswith("e_score_correction_bias")}
    os.makedirs(tmp_path / "nobias")
    TINY.to_json(tmp_path / "nobias" / "config.json")
    write_safetensors(str(tmp_path / "nobias" / "model.safetensors"), arrays)
    assert Checkpoint(tmp_path / "nobias").has_mtp()
    logits, mtp_logits = refimpl.load(tmp_path / "nobias").forward(np.arange(9).reshape(1, 9), mtp=True)
    assert mtp_logits[0].shape == (1, 8, TINY.vocab_size) and np.isfinite(mtp_logits[0]).all()
