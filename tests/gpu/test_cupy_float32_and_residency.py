"""CuPy in float32 (allowed for speed) against numpy, and where things live: results, weights and
the latent cache on the device. Skipped, with the reason, where no GPU is present."""

import numpy as np
import pytest

from refimpl.backend import gpu_available, to_numpy
from tests.helpers import rel_err, tiny_model

ok, why = gpu_available()
pytestmark = pytest.mark.skipif(not ok, reason=f"no GPU: {why}")


@pytest.fixture
def cp():
    import cupy

    return cupy


TOKENS = np.random.default_rng(4).integers(0, 256, (2, 40))


def test_tiny_model_float32_on_cupy_matches_numpy_float32(cp):
    gpu = tiny_model(0, dtype="float32", device="gpu")
    got = gpu.forward(TOKENS)
    assert isinstance(got, cp.ndarray) and got.dtype == cp.float32
    want32 = tiny_model(0, dtype="float32").forward(TOKENS)
    assert rel_err(to_numpy(got), want32) < 1e-5  # float32, different summation orders
    assert 1e-9 < rel_err(to_numpy(got), tiny_model(0).forward(TOKENS)) < 1e-4  # really float32


def test_float32_decode_through_the_device_cache(cp):
    gpu = tiny_model(0, dtype="float32", device="gpu")
    cache = gpu.new_cache(2, 40)
    gpu.forward(TOKENS[:, :39], cache=cache)
    step = gpu.forward(TOKENS[:, 39:], cache=cache)
    full = tiny_model(0, dtype="float32").forward(TOKENS)
    assert rel_err(to_numpy(step), full[:, 39:]) < 1e-5
    assert cache.length == 40


def test_weights_and_latent_cache_live_on_the_device(cp):
    for dtype in ("float64", "float32"):
        gpu = tiny_model(0, dtype=dtype, device="gpu")
        cache = gpu.new_cache(1, 8)
        gpu.forward(TOKENS[:1, :8], cache=cache)
        arrays = [*cache.c_kv, *cache.k_rope]
        assert all(isinstance(a, cp.ndarray) and a.dtype == np.dtype(dtype) for a in arrays)
        for name in ("model.norm.weight", "model.layers.1.mlp.experts.0.up_proj.weight"):
            w = gpu.weights.get(name)
            assert isinstance(w, cp.ndarray) and w.dtype == np.dtype(dtype), name
        # the cache holds what a numpy model computes for the same tokens
        ref = tiny_model(0, dtype=dtype)
        ref_cache = ref.new_cache(1, 8)
        ref.forward(TOKENS[:1, :8], cache=ref_cache)
        tol = 1e-12 if dtype == "float64" else 1e-5
        assert rel_err(to_numpy(cache.c_kv[0]), ref_cache.c_kv[0]) < tol
        assert rel_err(to_numpy(cache.k_rope[-1]), ref_cache.k_rope[-1]) < tol
