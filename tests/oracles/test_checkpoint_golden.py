"""Goldens of a user's checkpoint (oracles/checkpoint_golden.py), tested with a generated FP8
checkpoint in the published layout: the suite references the checkpoint by digest and holds no
copy of it, its expected values are refimpl's own float64 forward of that checkpoint, its
calibrated tolerances pass the reference in each profile's precision and catch a bug, --layers
keeps the first layers, and check/run refuse another checkpoint."""

import json
import os

import numpy as np
import pytest

import refimpl
from oracles.format.checkpoint_ref import checkpoint_digest
from oracles.format.golden import Golden, read_tensors
from refimpl.checkpoint import Checkpoint
from refimpl.layout import tensor_plan
from refimpl.writer import make_checkpoint
from tests.helpers import run_main

TINY = refimpl.Config.preset("tiny")


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckg")
    make_checkpoint(d / "ckpt", TINY, seed=11, fp8=True, shards=3)
    tokens = np.random.default_rng(2).integers(0, TINY.vocab_size, (2, 9))
    np.save(d / "tokens.npy", tokens)
    rc, out, err = run_main("generate", "--checkpoint", d / "ckpt", "--tokens", d / "tokens.npy",
                            "--out", d / "g", module="oracles")
    assert rc == 0, err
    rc, out, err = run_main("generate", "--checkpoint", d / "ckpt", "--tokens", d / "tokens.npy",
                            "--layers", "2", "--out", d / "g2", module="oracles")
    assert rc == 0, err
    return d, tokens


def test_the_suite_references_the_checkpoint_and_holds_no_copy(made):
    d, tokens = made
    m = json.loads((d / "g" / "manifest.json").read_text())
    assert [c["id"] for c in m["cases"]] == ["checkpoint.prefill", "checkpoint.decode",
                                            "checkpoint.greedy", "checkpoint.mtp_prefill"]
    digest = checkpoint_digest(str(d / "ckpt"))
    for c in m["cases"]:
        assert c["model"] and c["checkpoint"] == {"format": 1, "digest": digest, "layers": None,
                                                  "source_layers": TINY.num_hidden_layers}
        assert sorted(c["files"]) == ["config.json", "expected.safetensors", "inputs.safetensors"]
    for root, _, files in os.walk(d / "g"):  # no tensor of the checkpoint is stored in the suite
        for f in files:
            if f.endswith(".safetensors"):
                assert not any(n.startswith(("model.", "lm_head.")) for n in
                               read_tensors(os.path.join(root, f))), f


def test_expected_values_are_the_float64_forward_of_the_checkpoint(made):
    d, tokens = made
    g = Golden(str(d / "g"), checkpoint=str(d / "ckpt"))
    want = refimpl.load(d / "ckpt").forward(tokens)
    np.testing.assert_array_equal(g.expected("checkpoint.prefill")["logits"], want)
    greedy = refimpl.generate.greedy(refimpl.load(d / "ckpt"), tokens[0], 4)
    assert g.expected("checkpoint.greedy")["tokens"].tolist() == [greedy]


def test_layers_keeps_the_first_decoder_layers_and_the_head(made):
    d, tokens = made
    g = Golden(str(d / "g2"), checkpoint=str(d / "ckpt"))
    assert list(g.cases) == ["checkpoint.prefill", "checkpoint.decode", "checkpoint.greedy"]
    cfg = refimpl.Config.from_json(d / "g2" / "cases" / "checkpoint.prefill" / "config.json")
    assert cfg.num_hidden_layers == 2 and cfg.num_nextn_predict_layers == 0
    ck = Checkpoint(d / "ckpt")
    short = {n: ck.weight(n) for n in tensor_plan(cfg) if n in ck}
    want = refimpl.Model.from_arrays(cfg, short).forward(tokens)
    np.testing.assert_array_equal(g.expected("checkpoint.prefill")["logits"], want)


@pytest.mark.parametrize("adapter,profile", [("refimpl_float32", "float32"), ("refimpl_bf16", "bf16"),
                                             ("refimpl_fp8", "fp8")])
def test_the_reference_in_each_precision_passes_its_profile(made, adapter, profile):
    d, _ = made
    for g in ("g", "g2"):
        rc, out, err = run_main("check", d / g, "--checkpoint", d / "ckpt", "--adapter",
                                f"oracles.adapters:{adapter}", "--profile", profile, module="oracles")
        assert rc == 0, out + err


def test_a_bug_fails_and_run_writes_outputs(made, tmp_path):
    d, _ = made
    rc, out, _ = run_main("check", d / "g", "--checkpoint", d / "ckpt", "--adapter",
                          "oracles.mutants:rotate_half_rope", module="oracles")
    assert rc == 1 and "FAIL" in out
    rc, out, err = run_main("run", d / "g2", "--checkpoint", d / "ckpt", "--adapter",
                            "oracles.adapters:refimpl_float32", "--out", tmp_path / "c", module="oracles")
    assert rc == 0, err
    assert "logits" in read_tensors(str(tmp_path / "c" / "cases" / "checkpoint.prefill" / "outputs.safetensors"))
    rc, out, err = run_main("check", d / "g2", tmp_path / "c", "--checkpoint", d / "ckpt", module="oracles")
    assert rc == 0, out + err


def test_another_checkpoint_or_none_is_refused_in_one_line(made, tmp_path):
    d, _ = made
    make_checkpoint(tmp_path / "other", TINY, seed=12, fp8=True, shards=3)  # same headers, other bytes
    for extra in ([], ["--checkpoint", tmp_path / "other"]):
        rc, out, err = run_main("check", d / "g", *extra, "--adapter", "oracles.adapters:refimpl_float32",
                                module="oracles")
        assert rc == 2 and out == "" and err.count("\n") == 1, err
        assert ("pass --checkpoint DIR" in err) if not extra else ("is not the" in err)
    rc, _, err = run_main("generate", "--checkpoint", d / "ckpt", "--out", tmp_path / "x", module="oracles")
    assert rc == 2 and "needs both --checkpoint DIR and --tokens FILE" in err
    rc, _, err = run_main("generate", "--checkpoint", d / "ckpt", "--tokens", d / "tokens.npy",
                          "--layers", "9", "--out", tmp_path / "x", module="oracles")
    assert rc == 2 and "--layers 9: must be between 1 and the checkpoint's 3" in err
    assert not (tmp_path / "x").exists()


def test_a_flip_in_a_checkpoint_case_is_judged_by_the_checkpoints_own_gate(made):
    """The routing check (oracles/checking/routing.py) reads a layer's gate weight and bias from
    the user's checkpoint (CheckpointTensors): the reference's own choices are explained by its
    router input, the experts it scored lowest are not."""
    from oracles.checking.routing import CheckpointTensors, explainer

    d, _ = made
    g = Golden(str(d / "g"), checkpoint=str(d / "ckpt"))
    exp = g.expected("checkpoint.prefill")
    case = g.load_case("checkpoint.prefill")
    name = next(k for k in exp if k.startswith("layers.") and k.endswith("topk_idx"))
    layer = int(name.split(".")[1])
    tensors = CheckpointTensors(str(d / "ckpt"))
    gate = f"model.layers.{layer}.mlp.gate.weight"
    np.testing.assert_array_equal(tensors[gate], Checkpoint(str(d / "ckpt")).weight(gate))
    explain = explainer(exp, lambda: (tensors, case.config), "bf16")
    idx = exp[name]
    flipped = np.ones(idx.shape[:-1], bool)
    assert explain(name, idx, flipped).all()
    scores = exp[name[: -len("topk_idx")] + "router_scores"]
    worst = np.argsort(scores, axis=-1)[..., : idx.shape[-1]]  # the lowest-scored experts
    assert not explain(name, worst, flipped).any()
