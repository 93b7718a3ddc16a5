"""CuPy against NumPy on identical inputs: every component and the tiny model, float64 within
1e-12 relative. Skipped, with the reason, where no GPU is present."""

import numpy as np
import pytest

from refimpl import Config, mla, moe, rope
from refimpl.backend import gpu_available, to_numpy
from refimpl.norm import rms_norm
from tests.helpers import rel_err, tiny_model

ok, why = gpu_available()
if not ok:
    print(f"\ntests/gpu skipped: {why}")
pytestmark = pytest.mark.skipif(not ok, reason=f"no GPU: {why}")

TOL = 1e-12


@pytest.fixture
def cp():
    import cupy

    return cupy


def test_rms_norm_and_rope(cp):
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=(2, 5, 64)), rng.uniform(0.5, 1.5, 64)
    assert rel_err(to_numpy(rms_norm(cp.asarray(x), cp.asarray(w), 1e-6)), rms_norm(x, w, 1e-6)) < TOL
    f = rope.inv_freq(Config.preset("deepseek-v3"))
    pos = np.array([0, 4095, 4096, 100_000])
    c_np, s_np = rope.cos_sin(pos, f)
    c_cp, s_cp = rope.cos_sin(pos, f, xp=cp)
    q = rng.normal(size=(1, 4, 3, 64))
    assert rel_err(to_numpy(rope.apply_rope(cp.asarray(q), c_cp, s_cp)),
                   rope.apply_rope(q, c_np, s_np)) < TOL


def test_mla_both_forms(cp):
    rng = np.random.default_rng(1)
    args = [rng.normal(size=s) for s in ((2, 3, 4, 16), (2, 3, 4, 8), (2, 7, 32), (2, 7, 8),
                                         (4 * 32, 32))]
    mask = mla.causal_mask(np.arange(4, 7), np.arange(7), np)
    for f in (mla.attention_naive, mla.attention_absorbed):
        want = f(*args, 0.2, mask)
        got = f(*[cp.asarray(a) for a in args], 0.2, cp.asarray(mask))
        assert rel_err(to_numpy(got), want) < TOL


def test_routing_and_dispatch(cp):
    cfg = Config.preset("tiny")
    rng = np.random.default_rng(2)
    u, gate, bias = rng.normal(size=(9, 64)), rng.normal(size=(16, 64)) * 0.1, rng.normal(0, .05, 16)
    s, idx, g = moe.route(u, gate, bias, cfg)
    s2, idx2, g2 = moe.route(cp.asarray(u), cp.asarray(gate), cp.asarray(bias), cfg)
    np.testing.assert_array_equal(to_numpy(idx2), idx)
    assert rel_err(to_numpy(g2), g) < TOL
    experts = [{k: rng.normal(size=sh) for k, sh in (("gate_proj", (8, 64)), ("up_proj", (8, 64)),
                                                     ("down_proj", (64, 8)))} for _ in range(16)]
    want = moe.routed_experts(u, idx, g, experts)
    got = moe.routed_experts(cp.asarray(u), idx2, g2,
                             [{k: cp.asarray(v) for k, v in e.items()} for e in experts])
    assert rel_err(to_numpy(got), want) < TOL


def test_tiny_model_prefill_and_decode(cp):
    tokens = np.random.default_rng(3).integers(0, 256, (2, 70))
    cpu, gpu = tiny_model(0), tiny_model(0, device="gpu")
    assert rel_err(to_numpy(gpu.forward(tokens)), cpu.forward(tokens)) < TOL
    c1, c2 = cpu.new_cache(2, 70), gpu.new_cache(2, 70)
    cpu.forward(tokens[:, :69], cache=c1)
    gpu.forward(tokens[:, :69], cache=c2)
    assert rel_err(to_numpy(gpu.forward(tokens[:, 69:], cache=c2)),
                   cpu.forward(tokens[:, 69:], cache=c1)) < TOL


def test_fp8_checkpoint_dequantised_on_the_device(cp, tmp_path):
    """FP8 weights cross to the device as stored bytes and are decoded there: same logits."""
    import refimpl
    from refimpl.writer import make_checkpoint

    make_checkpoint(tmp_path / "fp8", Config.preset("tiny"), seed=0, fp8=True, shards=2)
    tokens = np.random.default_rng(4).integers(0, 256, (1, 40))
    cpu = refimpl.load(tmp_path / "fp8").forward(tokens)
    gpu = refimpl.load(tmp_path / "fp8", device="gpu").forward(tokens)
    assert rel_err(to_numpy(gpu), cpu) < TOL
