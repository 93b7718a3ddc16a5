"""make-checkpoint writes the published layout (spec sections 6-7): which tensors are FP8,
scale shapes, shards and index, MTP names; FP8 and sharded checkpoints give the logits they
should."""

import json
import math
import os
import struct
import time

import numpy as np
import pytest

import refimpl
from refimpl import accounting, fp8
from refimpl.checkpoint import Checkpoint
from refimpl.layout import is_fp8_weight, storage_plan, tensor_plan
from refimpl.writer import make_checkpoint, random_tensor, random_weights, save_checkpoint
from tests.helpers import rel_err, run_cli

V3 = refimpl.Config.preset("deepseek-v3")
TINY = refimpl.Config.preset("tiny")
TOKENS = np.random.default_rng(0).integers(0, TINY.vocab_size, (2, 24))


def test_fp8_plan_of_deepseek_v3_has_the_published_91_991_tensors_and_688_574_839_360_bytes():
    totals = accounting.storage_totals(V3, fp8=True)
    assert totals["tensors"] == 91_991
    assert totals["bytes"] == 688_574_839_360


def test_fp8_plan_of_deepseek_v3_dtypes_and_scale_shapes():
    plan = storage_plan(V3, fp8=True)
    a = "model.layers.5.self_attn."
    assert plan[a + "kv_a_proj_with_mqa.weight"] == ("F8_E4M3", (576, 7168))
    assert plan[a + "kv_a_proj_with_mqa.weight_scale_inv"] == ("F32", (5, 56))
    assert plan[a + "q_b_proj.weight_scale_inv"] == ("F32", (192, 12))
    assert plan["model.layers.5.mlp.experts.255.down_proj.weight_scale_inv"] == ("F32", (56, 16))
    assert plan["model.layers.5.mlp.gate.weight"] == ("BF16", (256, 7168))
    assert plan["model.layers.5.mlp.gate.e_score_correction_bias"] == ("F32", (256,))
    assert plan[a + "kv_a_layernorm.weight"] == ("BF16", (512,))
    assert plan["model.embed_tokens.weight"] == ("BF16", (129280, 7168))
    assert plan["lm_head.weight"] == ("BF16", (129280, 7168))
    m = "model.layers.61."  # the MTP module
    assert plan[m + "eh_proj.weight"] == ("BF16", (7168, 14336))
    assert plan[m + "shared_head.head.weight"] == ("BF16", (129280, 7168))
    assert plan[m + "embed_tokens.weight"] == ("BF16", (129280, 7168))
    for k in ("enorm", "hnorm", "shared_head.norm"):
        assert plan[m + k + ".weight"] == ("BF16", (7168,))
    assert plan[m + "mlp.experts.0.up_proj.weight"] == ("F8_E4M3", (2048, 7168))
    assert "model.layers.62.input_layernorm.weight" not in plan
    fp8_names = [n for n, (d, _) in plan.items() if d == "F8_E4M3"]
    assert all(n + "_scale_inv" in plan for n in fp8_names)
    # 3 dense layers x 8 + 59 MoE layers (MTP included) x (5 + 3 x 257) FP8 projections
    assert len(fp8_names) == 3 * 8 + 59 * (5 + 3 * 257)


def test_make_checkpoint_dry_run_prints_the_published_totals():
    r = run_cli("make-checkpoint", "--preset", "deepseek-v3", "--fp8", "--shards", "163", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert "91,991 tensors, 688,574,839,360 bytes in 163 file(s)" in r.stdout


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    out = {}
    for name, kw in {"float": {}, "fp8": {"fp8": True}, "fp8_sharded": {"fp8": True, "shards": 4},
                     "float_sharded": {"shards": 3}}.items():
        out[name] = str(root / name)
        make_checkpoint(out[name], TINY, seed=0, **kw)
    return out


def test_fp8_checkpoint_on_disk_matches_the_plan(ckpts):
    ck = Checkpoint(ckpts["fp8_sharded"])
    plan = storage_plan(TINY, fp8=True)
    assert sorted(ck.names()) == sorted(plan)
    for name, (dtype, shape) in plan.items():
        assert (ck.dtype(name), ck.shape(name)) == (dtype, shape), name
    files = sorted(os.listdir(ckpts["fp8_sharded"]))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert shards == [f"model-0000{k}-of-00004.safetensors" for k in range(1, 5)]
    index = json.load(open(os.path.join(ckpts["fp8_sharded"], "model.safetensors.index.json")))
    assert set(index["weight_map"].values()) == set(shards)  # no shard is empty
    assert index["metadata"]["total_size"] == accounting.storage_totals(TINY)["bytes"]
    for name in plan:
        if name.endswith("_scale_inv"):  # a weight and its scale share a shard
            assert index["weight_map"][name] == index["weight_map"][name[:-len("_scale_inv")]]
    cfg = json.load(open(os.path.join(ckpts["fp8_sharded"], "config.json")))
    assert cfg["quantization_config"]["weight_block_size"] == [128, 128]
    assert cfg["torch_dtype"] == "bfloat16"


def test_float_checkpoint_does_not_claim_fp8(ckpts, tmp_path):
    make_checkpoint(tmp_path / "v3ish", TINY.replace(extra=dict(V3.extra)))
    cfg = json.load(open(tmp_path / "v3ish" / "config.json"))
    assert "quantization_config" not in cfg and cfg["torch_dtype"] == "float32"


def test_sharded_and_single_file_checkpoints_give_identical_logits(ckpts):
    for single, sharded in (("fp8", "fp8_sharded"), ("float", "float_sharded")):
        a = refimpl.load(ckpts[single]).forward(TOKENS)
        b = refimpl.load(ckpts[sharded]).forward(TOKENS)
        assert np.array_equal(a, b)


def test_fp8_checkpoint_logits_are_those_of_its_dequantised_weights(ckpts):
    ck = Checkpoint(ckpts["fp8"])
    weights = {n: ck.weight(n) for n in ck.names() if not n.endswith("_scale_inv")}
    want = refimpl.Model.from_arrays(TINY, weights).forward(TOKENS)
    assert rel_err(refimpl.load(ckpts["fp8"]).forward(TOKENS), want) < 1e-12


# The FP8 error bound.  Rounding x to e4m3 moves it by u*x*m'/m with the significand m in [1, 2)
# and the offset uniform in [-1, 1] units of u = 2^-4; for values whose significands are spread
# log-uniformly (any smooth, wide distribution) the relative RMS error of a quantised weight is
#     rho = u * sqrt(E[1/m^2] / 3) = u * sqrt(1 / (8 ln 2)) = 0.02654.
# BF16 storage of the other tensors adds 2^-9 relative, negligible.  A token's logits pass
# through N = layers x (5 attention + 3 FFN) quantised projections in sequence (parallel experts
# average and do not add); their errors are independent, so to first order the logits' relative
# (Frobenius) error is g * sqrt(N) * rho, with g the gain of a perturbation to the logits, about
# 1 for this well-scaled residual network.  The test allows g <= 2 and asks g >= 0.25, so that a
# loader that skips or mis-applies the scales, or silently keeps float weights, fails.
# Routing is discontinuous: once a perturbation flips an expert choice the difference is O(1),
# so the bound is taken on the tiny model with every expert selected (routing weights still vary).
RHO = 2.0 ** -4 * math.sqrt(1 / (8 * math.log(2)))


def test_fp8_weights_have_the_predicted_relative_rounding_error():
    w = random_weights(TINY, seed=3)
    for name, a in w.items():
        if is_fp8_weight(name):
            q, s = fp8.quantize(a)
            rho = np.linalg.norm(fp8.dequantize(q, s) - a) / np.linalg.norm(a)
            assert 0.85 * RHO < rho < 1.15 * RHO, name


def test_fp8_checkpoint_logits_match_the_float_original_within_the_derived_bound(tmp_path):
    cfg = TINY.replace(n_group=1, topk_group=1, num_experts_per_tok=TINY.n_routed_experts)
    n_maps = cfg.num_hidden_layers * (5 + 3)
    for seed in (0, 1):
        weights = random_weights(cfg, seed)
        save_checkpoint(tmp_path / f"q{seed}", cfg, weights, store_dtype="bfloat16", fp8=True)
        tokens = np.random.default_rng(seed).integers(0, cfg.vocab_size, (2, 32))
        got = refimpl.load(tmp_path / f"q{seed}").forward(tokens)
        want = refimpl.Model.from_arrays(cfg, weights).forward(tokens)
        err = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert 0.25 * math.sqrt(n_maps) * RHO < err < 2 * math.sqrt(n_maps) * RHO, err


def test_ue8m0_checkpoint_has_power_of_two_scales(tmp_path):
    r = run_cli("make-checkpoint", "--preset", "tiny", "--fp8", "--ue8m0", "--out", tmp_path / "u")
    assert r.returncode == 0, r.stderr
    ck = Checkpoint(tmp_path / "u")
    scales = [np.asarray(ck.raw(n)) for n in ck.names() if n.endswith("_scale_inv")]
    assert scales and all(np.all(np.exp2(np.round(np.log2(s))) == s) for s in scales)
    assert json.load(open(tmp_path / "u" / "config.json"))["quantization_config"]["scale_fmt"] == "ue8m0"


def test_a_failed_write_leaves_nothing(tmp_path):
    r = run_cli("make-checkpoint", "--preset", "tiny", "--shards", "100000", "--out", tmp_path / "x")
    assert r.returncode == 2 and "--shards" in r.stderr
    assert os.listdir(tmp_path) == []
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep").write_text("mine")
    r = run_cli("make-checkpoint", "--preset", "tiny", "--out", tmp_path / "full")
    assert r.returncode == 2 and "not an empty directory" in r.stderr
    assert os.listdir(tmp_path / "full") == ["keep"]


def write_headers_only(out, cfg, shards):
    """The full published layout with real headers and sparse (never written) bodies: a
    checkpoint of the real size that costs no disk, and must not be read."""
    from refimpl.layout import STORAGE_BYTES
    from refimpl.writer import shard_entries, shard_name

    entries = [(n, d, s) for n, (d, s) in storage_plan(cfg, fp8=True).items()]
    os.makedirs(out)
    cfg.to_json(os.path.join(out, "config.json"))
    weight_map = {}
    for k, run in enumerate(shard_entries(entries, shards)):
        header, offset = {}, 0
        for name, dtype, shape in run:
            size = math.prod(shape) * STORAGE_BYTES[dtype]
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
            offset += size
        raw = json.dumps(header).encode()
        with open(os.path.join(out, shard_name(k, shards)), "wb") as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            f.truncate(8 + len(raw) + offset)  # sparse: the bodies take no disk
        weight_map.update({n: shard_name(k, shards) for n, _, _ in run})
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def test_loading_the_full_v3_layout_reads_headers_only_and_takes_seconds(tmp_path):
    out = str(tmp_path / "v3")
    write_headers_only(out, V3, shards=163)
    t0 = time.perf_counter()
    model = refimpl.load(out)
    took = time.perf_counter() - t0
    assert took < 20, took
    assert model.weights.materialised == 0
    r = run_cli("info", "--checkpoint", out, "--json")
    assert r.returncode == 0, r.stderr
    stored = json.loads(r.stdout)["stored"]
    assert stored["tensors"] == 91_991 and stored["bytes"] == 688_574_839_360
    assert stored["files"] == 163 and stored["has_mtp"]
    assert stored["params"] == 671_026_419_200 + json.loads(r.stdout)["mtp_params"]


def test_every_float_dtype_loads_to_the_stored_values(tmp_path):
    import ml_dtypes

    from refimpl.writer import write_safetensors

    rng = np.random.default_rng(0)
    base = rng.normal(0, 1, (130, 200))
    q, s = fp8.quantize(base)
    stored = {"a.f64": base, "a.f32": base.astype(np.float32), "a.f16": base.astype(np.float16),
              "a.bf16": base.astype(ml_dtypes.bfloat16),
              "model.layers.0.self_attn.o_proj.weight": q,
              "model.layers.0.self_attn.o_proj.weight_scale_inv": s}
    write_safetensors(str(tmp_path / "model.safetensors"), stored)
    TINY.to_json(tmp_path / "config.json")
    ck = Checkpoint(tmp_path)
    assert ck.dtype("a.bf16") == "BF16" and ck.dtype("a.f16") == "F16"
    for name, a in stored.items():
        if name.endswith("_scale_inv") or name.endswith("o_proj.weight"):
            continue
        assert np.array_equal(ck.weight(name), a.astype(np.float64)), name
    w = ck.weight("model.layers.0.self_attn.o_proj.weight")
    assert np.array_equal(w, fp8.dequantize(q, s))
    assert np.array_equal(ck.weight("model.layers.0.self_attn.o_proj.weight", np.float32),
                          fp8.dequantize(q, s).astype(np.float32))


def test_writing_more_than_the_free_disk_is_refused_before_writing(tmp_path):
    r = run_cli("make-checkpoint", "--preset", "deepseek-v3", "--fp8", "--shards", "163",
                "--out", tmp_path / "v3")
    if r.returncode == 0:  # pragma: no cover - a disk with 689 GB free
        pytest.skip("this disk has room for the full checkpoint")
    assert r.returncode == 2 and "688,574,839,360 bytes" in r.stderr and "free" in r.stderr
    assert os.listdir(tmp_path) == []


def test_mtp_layer_is_stored_and_loaded_with_its_own_tensors(ckpts):
    import ml_dtypes

    model = refimpl.load(ckpts["fp8_sharded"])
    m = f"model.layers.{TINY.num_hidden_layers}."
    for key in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                "shared_head.head.weight", "embed_tokens.weight"):
        want = random_tensor(m + key, tensor_plan(TINY)[m + key], seed=0)
        got = model.weights.get(m + key)  # BF16 as published: the value rounded to bfloat16
        assert np.array_equal(got, want.astype(ml_dtypes.bfloat16).astype(np.float64)), key
    q = model.weights.get(m + "mlp.experts.3.down_proj.weight")  # the MTP decoder block is FP8
    want = random_tensor(m + "mlp.experts.3.down_proj.weight", q.shape, seed=0)
    assert np.array_equal(q, fp8.dequantize(*fp8.quantize(want)))
