"""Pipeline stages as Ray actors on a local cluster (refimpl/cluster.py).  Skipped, with the
reason, where Ray is not installed (it is the optional `cluster` extra, not installed by
scripts/test.sh: docs/full-model.md says why); the pipeline's logic runs in CI without Ray in
tests/test_stages.py.  One cluster for the module: starting Ray costs seconds."""

import numpy as np
import pytest

import refimpl
from refimpl import stages
from refimpl.writer import random_weights
from refimpl.generate import decode
from tests.helpers import ROOT

ray = pytest.importorskip("ray", reason="Ray is not installed (pip install '.[cluster]')")

TINY = refimpl.Config.preset("tiny")
TOKENS = np.random.default_rng(5).integers(0, TINY.vocab_size, (2, 10))


@pytest.fixture(scope="module")
def pair():
    from refimpl.cluster import RayStages

    w = random_weights(TINY, 0)
    ex = RayStages(env={"PYTHONPATH": ROOT})
    pipe = stages.Pipeline.start(stages.source_of(w, TINY), stages.plan_stages(TINY, 2), ex)
    yield refimpl.Model.from_arrays(TINY, w), pipe, ex
    ex.shutdown()
    ray.shutdown()


def test_two_actors_give_one_process_logits_bit_for_bit(pair):
    one, pipe, ex = pair
    assert len(ex.actors) == 2 and [r["stage"] for r in pipe.ready] == [0, 1]
    np.testing.assert_array_equal(pipe.forward(TOKENS), one.forward(TOKENS))
    np.testing.assert_array_equal(pipe.forward_microbatches(TOKENS, 2),
                                  np.concatenate([one.forward(TOKENS[:1]), one.forward(TOKENS[1:])]))


def test_incremental_decode_and_mtp_across_actors(pair):
    one, pipe, _ = pair
    c1, c2 = pipe.new_cache(2, 10), one.new_cache(2, 10)
    pipe.forward(TOKENS[:, :7], cache=c1)
    one.forward(TOKENS[:, :7], cache=c2)
    for j in range(7, 10):
        np.testing.assert_array_equal(pipe.forward(TOKENS[:, j:j + 1], cache=c1),
                                      one.forward(TOKENS[:, j:j + 1], cache=c2))
    (a, am), (b, bm) = pipe.forward(TOKENS, mtp=True), one.forward(TOKENS, mtp=True)
    np.testing.assert_array_equal(a, b)
    assert all(np.array_equal(x, y) for x, y in zip(am, bm))
    prompt = TOKENS[0, :4]
    assert decode(pipe, prompt, 6, use_mtp=True).as_dict() == decode(one, prompt, 6, use_mtp=True).as_dict()


def test_the_command_line_and_oracles_generate_on_the_cluster(pair, tmp_path):
    """`refimpl logits --ray --stages 2` equals one process; `oracles generate --ray` writes the
    suite it writes without Ray, byte for byte; an address that cannot be reached is one line."""
    from refimpl.writer import make_checkpoint
    from tests.helpers import run_main

    make_checkpoint(tmp_path / "m", TINY, seed=6, fp8=True, shards=2)
    np.save(tmp_path / "t.npy", TOKENS)
    for extra, out in (([], "one"), (["--stages", "2", "--ray"], "two")):
        rc, _, err = run_main("logits", "--checkpoint", tmp_path / "m", "--tokens", tmp_path / "t.npy",
                              "--out", tmp_path / f"{out}.npy", *extra)
        assert rc == 0, err
    assert (np.load(tmp_path / "one.npy") == np.load(tmp_path / "two.npy")).all()
    assert err.startswith("pipeline plan: 2 stage(s)")
    for extra, out in (([], "g1"), (["--ray"], "g2")):
        rc, _, err = run_main("generate", "--suite", "smoke", "--out", tmp_path / out, *extra,
                              module="oracles")
        assert rc == 0, err
    for root, _, files in __import__("os").walk(tmp_path / "g1"):
        for f in files:
            a = __import__("pathlib").Path(root) / f
            assert a.read_bytes() == (tmp_path / "g2" / a.relative_to(tmp_path / "g1")).read_bytes(), a
    rc, _, err = run_main("logits", "--checkpoint", tmp_path / "m", "--tokens", tmp_path / "t.npy",
                          "--out", tmp_path / "x.npy", "--stages", "2", "--ray", "127.0.0.1:9")
    assert rc == 2 and err.splitlines()[-1] == ("refimpl: error: --ray: cannot reach the Ray "
                                                "cluster at '127.0.0.1:9' (Connection refused)")
    assert not (tmp_path / "x.npy").exists()


def test_a_killed_stage_is_one_clear_error(pair):
    """Last in the module: it ends a stage."""
    _, pipe, ex = pair
    ex.kill(0)
    with pytest.raises(refimpl.RefimplError, match=r"^pipeline stage 0 \(layers 0-.*\) died "
                                                   r"mid-run \(.*\); no output was written$"):
        pipe.forward(TOKENS)
