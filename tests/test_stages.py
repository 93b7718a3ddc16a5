"""Pipeline stages without a cluster (refimpl/stages.py, LocalStages: the same StageWorker and
driver that Ray hosts, in this process): the plan, its refusal, and a pipeline that gives one
process's results bit for bit - logits, traces, decode through the stages' cache slices, MTP
on the last stage, microbatches - on the CPU and on a device stand-in."""

import itertools
import sys

import numpy as np
import pytest

import refimpl
import tests.fakecupy as fcp
from refimpl import stages
from refimpl.layout import layer_plan, tensor_plan
from refimpl.writer import make_checkpoint, random_weights
from refimpl.generate import decode, greedy
from tests.helpers import run_main

TINY = refimpl.Config.preset("tiny")
TOKENS = np.random.default_rng(3).integers(0, TINY.vocab_size, (2, 10))


def test_the_plan_is_contiguous_covers_every_layer_and_puts_the_ends_in_place():
    cfg = refimpl.Config.preset("deepseek-v3")
    for n in (1, 2, 8, 61):
        plan = stages.plan_stages(cfg, n, "float64", storage="fp8")
        assert [s.index for s in plan] == list(range(n))
        assert [i for s in plan for i in s.layers] == list(range(cfg.num_hidden_layers))
        assert plan[0].embedding and plan[-1].head and all(s.layers for s in plan)
        assert sum(s.nbytes for s in plan) == sum(
            stages.tensor_bytes(t, shape, "float64", "fp8")
            for t, shape in tensor_plan(cfg).items())
        assert "model.layers.61.eh_proj.weight" in plan[-1].tensors  # MTP on the last stage


def test_the_plan_minimises_the_largest_stage():
    """Against every contiguous split of a small model (brute force, bytes counted here)."""

    cfg = TINY.replace(num_hidden_layers=6, first_k_dense_replace=2)
    numel = lambda plan: sum(int(np.prod(s)) for s in plan.values())  # noqa: E731
    layer = [4 * numel(layer_plan(cfg, i)) for i in range(6)]
    emb = 4 * cfg.vocab_size * cfg.hidden_size
    ends = 4 * (cfg.hidden_size + cfg.vocab_size * cfg.hidden_size) + 4 * numel(layer_plan(cfg, 6))
    for n in (2, 3, 4):
        plan = stages.plan_stages(cfg, n, "float32")
        best = float("inf")
        for cuts in itertools.combinations(range(1, 6), n - 1):
            b = [0, *cuts, 6]
            parts = [sum(layer[b[k]:b[k + 1]]) for k in range(n)]
            parts[0] += emb
            parts[-1] += ends
            best = min(best, max(parts))
        assert max(s.nbytes for s in plan) == best, n


def test_a_plan_that_does_not_fit_is_refused_naming_the_stage():
    plan = stages.plan_stages(refimpl.Config.preset("deepseek-v3"), 8, "float64")
    biggest = max(plan, key=lambda s: s.nbytes)
    over = next(s for s in plan if s.nbytes > 100 * 10**9)
    with pytest.raises(refimpl.InputError, match=rf"^stage {over.index} \(layers .*more than "
                                                 r"--stage-memory 100.00 GB"):
        stages.check_fits(plan, 100 * 10**9)
    stages.check_fits(plan, biggest.nbytes)  # exactly enough is enough
    with pytest.raises(refimpl.InputError, match="--stages 62: must be between 1 and the 61"):
        stages.plan_stages(refimpl.Config.preset("deepseek-v3"), 62)


@pytest.fixture(scope="module")
def pair():
    w = random_weights(TINY, 0)
    one = refimpl.Model.from_arrays(TINY, w)
    pipe = stages.Pipeline.start(stages.source_of(w, TINY), stages.plan_stages(TINY, 2),
                                 stages.LocalStages())
    return one, pipe


def test_pipeline_logits_and_trace_are_one_process_bit_for_bit(pair):
    one, pipe = pair
    want, got = {}, {}
    np.testing.assert_array_equal(pipe.forward(TOKENS, trace=got), one.forward(TOKENS, trace=want))
    assert list(got) == list(want) and all(np.array_equal(got[k], want[k]) for k in want)


def test_incremental_decode_through_the_stages_cache_slices(pair):
    one, pipe = pair
    c1, c2 = pipe.new_cache(2, 10), one.new_cache(2, 10)
    np.testing.assert_array_equal(pipe.forward(TOKENS[:, :6], cache=c1), one.forward(TOKENS[:, :6], cache=c2))
    for j in range(6, 10):
        np.testing.assert_array_equal(pipe.forward(TOKENS[:, j:j + 1], cache=c1),
                                      one.forward(TOKENS[:, j:j + 1], cache=c2))
    assert c1.length == c2.length == 10
    with pytest.raises(refimpl.InputError, match="overflow the cache"):
        pipe.forward(TOKENS[:, :1], cache=c1)


def test_mtp_runs_on_the_last_stage(pair):
    one, pipe = pair
    (a, am), (b, bm) = pipe.forward(TOKENS, mtp=True), one.forward(TOKENS, mtp=True)
    np.testing.assert_array_equal(a, b)
    assert all(np.array_equal(x, y) for x, y in zip(am, bm))
    prompt = TOKENS[0, :4]
    assert greedy(pipe, prompt, 5) == greedy(one, prompt, 5)
    assert decode(pipe, prompt, 7, use_mtp=True).as_dict() == decode(one, prompt, 7, use_mtp=True).as_dict()


def test_microbatches_give_each_part_its_own_logits(pair):
    one, pipe = pair
    got = pipe.forward_microbatches(TOKENS, 2)
    np.testing.assert_array_equal(got, np.concatenate([one.forward(TOKENS[:1]), one.forward(TOKENS[1:])]))


def test_stages_on_a_device_keep_the_device_rules():
    """Each stage on the stand-in device: hidden states leave a stage as explicit copies."""
    w = random_weights(TINY, 1)
    pipe = stages.Pipeline.start(stages.source_of(w, TINY), stages.plan_stages(TINY, 3),
                                 stages.LocalStages(), device=fcp)
    one = refimpl.Model.from_arrays(TINY, w)
    fcp.transfers.reset()
    np.testing.assert_array_equal(pipe.forward(TOKENS), one.forward(TOKENS))
    assert fcp.transfers.sites[("to_host", "refimpl.stages.layers")] == 3  # one per stage


def test_the_command_line_runs_stages_and_prints_the_plan_first(tmp_path):
    ckpt = tmp_path / "m"
    make_checkpoint(ckpt, TINY, seed=4, fp8=True, shards=2)
    np.save(tmp_path / "t.npy", TOKENS)
    rc, _, _ = run_main("logits", "--checkpoint", ckpt, "--tokens", tmp_path / "t.npy",
                        "--out", tmp_path / "one.npy")
    assert rc == 0
    rc, out, err = run_main("logits", "--checkpoint", ckpt, "--tokens", tmp_path / "t.npy",
                            "--out", tmp_path / "two.npy", "--stages", "2", "--incremental")
    assert rc == 0, err
    assert err.startswith("pipeline plan: 2 stage(s), weights resident in float64\n  stage 0: layers 0-")
    one = np.load(tmp_path / "one.npy")
    assert np.abs(np.load(tmp_path / "two.npy") - one).max() < 1e-12 * np.abs(one).max()
    rc, _, _ = run_main("logits", "--checkpoint", ckpt, "--tokens", tmp_path / "t.npy",
                        "--out", tmp_path / "three.npy", "--stages", "3")
    assert rc == 0 and (np.load(tmp_path / "three.npy") == one).all()
    rc, _, err = run_main("logits", "--checkpoint", ckpt, "--tokens", tmp_path / "t.npy",
                          "--out", tmp_path / "four.npy", "--stages", "2", "--stage-memory", "1MB")
    assert rc == 2 and err.count("\n") == 4 and err.splitlines()[-1].startswith("refimpl: error: stage 0")
    assert not (tmp_path / "four.npy").exists()
    rc, _, err = run_main("generate", "--checkpoint", ckpt, "--prompt", "1,2,3", "--ray")
    assert rc == 2 and "--ray needs --stages N" in err


def test_ray_missing_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    ckpt = tmp_path / "m"
    make_checkpoint(ckpt, TINY, seed=4)
    rc, _, err = run_main("generate", "--checkpoint", ckpt, "--prompt", "1,2,3", "--stages", "2",
                          "--ray", "--quiet")
    assert rc == 2 and err.strip().count("\n") == 0
    assert "--ray needs Ray, which is not installed" in err
