"""CuPy's device rules without a GPU (tests/fakecupy.py): refimpl on a stand-in device module
whose arrays refuse every implicit host transfer.  The forward pass, the latent cache, MTP,
decoding, FP8 checkpoints and memory budgets run on it, give the CPU's results bit for bit
(the same numpy arithmetic underneath), and move data between host and device only through
explicit, counted copies."""

import pickle

import numpy as np
import pytest

import refimpl
import tests.fakecupy as fcp
from refimpl import fp8
from refimpl.backend import array_module, device_module, to_numpy
from refimpl.writer import make_checkpoint
from refimpl.generate import decode, greedy
from refimpl.weights import working_sets
from tests.helpers import tiny_model

TINY = refimpl.Config.preset("tiny")
TOKENS = np.random.default_rng(7).integers(0, TINY.vocab_size, (2, 12))
MOE_LAYERS = sum(TINY.is_moe_layer(i) for i in range(TINY.num_hidden_layers))


# ---- the stand-in keeps CuPy's rules -------------------------------------------------------------

def test_implicit_conversions_of_a_device_array_raise():
    x = fcp.asarray(np.arange(6.0).reshape(2, 3))
    s = x.sum()
    assert isinstance(s, fcp.ndarray) and s.shape == ()  # reductions stay on the device
    for implicit in (lambda: np.asarray(x), lambda: np.array(x), lambda: float(s), lambda: int(s),
                     lambda: bool(s), lambda: x.tolist(), lambda: s.item(), lambda: x + np.ones(3),
                     lambda: np.ones(3) + x, lambda: x[np.array([0])], lambda: pickle.dumps(x),
                     lambda: range(10)[s.astype(np.int64)], lambda: x.__setitem__(0, np.ones(3))):
        with pytest.raises(TypeError, match="implicit transfer"):
            implicit()


def test_numpy_functions_on_device_arrays_run_on_the_device_and_copies_are_counted():
    fcp.transfers.reset()
    x = fcp.asarray(np.arange(6.0).reshape(2, 3))
    y = np.exp(x) + 1.0  # a numpy ufunc dispatches to the device, as with CuPy
    z = np.concatenate([x, y], axis=0)
    assert all(isinstance(a, fcp.ndarray) for a in (y, z)) and z.shape == (4, 3)
    assert array_module(z) is fcp and to_numpy(z).shape == (4, 3)
    np.testing.assert_array_equal(to_numpy(y), np.exp(np.arange(6.0).reshape(2, 3)) + 1.0)
    assert (fcp.transfers.to_device, fcp.transfers.to_host) == (1, 2)
    assert fcp.transfers.to_device_bytes == 48 and fcp.transfers.to_host_bytes == 48 + 96


def test_a_device_module_is_accepted_as_a_device():
    assert device_module(fcp) is fcp and device_module("cpu") is np
    with pytest.raises(refimpl.RefimplError, match="not 'cpu', 'gpu' or an array module"):
        device_module(object())


# ---- refimpl on the stand-in: the same bits, explicit transfers ------------------------------

@pytest.fixture(scope="module")
def models():
    return tiny_model(0), tiny_model(0, device=fcp)


def test_forward_and_trace_on_the_device_equal_the_cpu(models):
    cpu, dev = models
    trace = {}
    got = dev.forward(TOKENS, trace=trace)
    assert isinstance(got, fcp.ndarray)
    np.testing.assert_array_equal(got.get(), cpu.forward(TOKENS))
    want = {}
    cpu.forward(TOKENS, trace=want)
    assert list(trace) == list(want) and all(np.array_equal(trace[k], want[k]) for k in want)
    assert all(isinstance(w, fcp.ndarray) for w in dev.weights._resident.values())


def test_transfers_per_forward_are_the_tables_the_ids_and_the_routing(models):
    """After the weights are on the device, one forward copies to the device the RoPE cos and
    sin tables, the causal mask's key and query positions and the token ids (5 copies), and to
    the host the sorted expert ids of each MoE layer (to group tokens by expert) - nothing else,
    whatever the batch, length or cache.  With a trace, each recorded intermediate too."""
    cpu, dev = models
    dev.forward(TOKENS)  # weights now resident
    cache = dev.new_cache(2, 13)
    for tokens, c in ((TOKENS, None), (TOKENS, cache), (TOKENS[:, :1], cache)):
        fcp.transfers.reset()
        dev.forward(tokens, cache=c)
        assert fcp.transfers.to_device == 5 and fcp.transfers.to_host == MOE_LAYERS, \
            fcp.transfers.summary()
    fcp.transfers.reset()
    trace = {}
    dev.forward(TOKENS, trace=trace)
    assert fcp.transfers.to_host == MOE_LAYERS + len(trace)


def test_incremental_decode_through_the_device_latent_cache(models):
    cpu, dev = models
    c_cpu, c_dev = cpu.new_cache(2, 12), dev.new_cache(2, 12)
    assert all(isinstance(a, fcp.ndarray) for a in c_dev.c_kv + c_dev.k_rope)
    cpu.forward(TOKENS[:, :9], cache=c_cpu)
    dev.forward(TOKENS[:, :9], cache=c_dev)
    for j in range(9, 12):
        np.testing.assert_array_equal(dev.forward(TOKENS[:, j:j + 1], cache=c_dev).get(),
                                      cpu.forward(TOKENS[:, j:j + 1], cache=c_cpu))
    np.testing.assert_array_equal(c_dev.c_kv[-1].get(), c_cpu.c_kv[-1])


def test_mtp_and_decoding_on_the_device(models):
    cpu, dev = models
    logits, mtp_logits = dev.forward(TOKENS, mtp=True)
    want, want_mtp = cpu.forward(TOKENS, mtp=True)
    np.testing.assert_array_equal(logits.get(), want)
    assert all(np.array_equal(a.get(), b) for a, b in zip(mtp_logits, want_mtp))
    prompt = TOKENS[0, :5]
    assert greedy(dev, prompt, 5) == greedy(cpu, prompt, 5)
    for kw in ({"use_mtp": True}, {"temperature": 0.8, "seed": 3},
               {"use_mtp": True, "temperature": 0.8, "seed": 3}):
        assert decode(dev, prompt, 6, **kw).as_dict() == decode(cpu, prompt, 6, **kw).as_dict(), kw


def test_an_fp8_checkpoint_is_decoded_on_the_device_under_a_budget(tmp_path):
    """FP8 weights cross as their stored bytes and scales (fp8.dequantize_bits); a budget
    releases and re-reads device weights and streams a large head in row chunks."""
    path = tmp_path / "fp8"
    make_checkpoint(path, TINY, seed=1, fp8=True, shards=2)
    want = refimpl.load(path).forward(TOKENS)
    dev = refimpl.load(path, device=fcp)
    np.testing.assert_array_equal(dev.forward(TOKENS).get(), want)
    tight = refimpl.load(path, device=fcp)
    budget = max(sum(tight.weights.nbytes(n) for n in names)
                 for i in range(TINY.num_hidden_layers) for names in working_sets(TINY, i))
    assert tight.weights.nbytes("lm_head.weight") > budget // 2  # so the head is streamed
    tight.weights.max_bytes = budget
    np.testing.assert_array_equal(tight.forward(TOKENS).get(), want)
    assert "lm_head.weight" not in tight.weights._resident
    first = tight.weights.materialised
    np.testing.assert_array_equal(tight.forward(TOKENS).get(), want)
    assert tight.weights.materialised > first  # released on the device and read again
    assert tight.weights.peak_bytes <= budget


@pytest.mark.parametrize("rows,cols", [(1, 1), (128, 128), (130, 300), (300, 129)])
def test_dequantize_bits_on_the_device_equals_the_host(rows, cols):
    rng = np.random.default_rng(rows * cols)
    u = rng.integers(0, 256, (rows, cols), dtype=np.uint8)
    s = rng.uniform(1e-4, 1.0, fp8.scale_shape((rows, cols))).astype(np.float32)
    for dtype in (np.float64, np.float32):
        with np.errstate(invalid="ignore"):
            got = fp8.dequantize_bits(fcp.asarray(u), s, dtype=dtype)
            want = fp8.dequantize(u.view(fp8.E4M3), s, dtype=dtype)
        assert isinstance(got, fcp.ndarray)
        np.testing.assert_array_equal(got.get().view(np.uint8), want.view(np.uint8))
