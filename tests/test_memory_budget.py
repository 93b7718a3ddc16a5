"""Lazy loading under a memory budget: weights materialised when used, released when the
budget is full, the same logits whatever the budget; --max-memory parsing; FP8 GEMM emulation
as a forward option."""

import math

import numpy as np
import pytest

import refimpl
from refimpl.writer import make_checkpoint
from refimpl.fp8 import BlockFP8
from refimpl.generate import decode
from refimpl.memory import parse_memory
from refimpl.names import layer_of
from refimpl.weights import working_sets
from tests.helpers import rel_err, run_cli

TINY = refimpl.Config.preset("tiny")
TOKENS = np.random.default_rng(1).integers(0, TINY.vocab_size, (2, 20))


@pytest.mark.parametrize("text,n", [("8GB", 8 * 10**9), ("6GiB", 6 * 2**30), ("512M", 512 * 2**20),
                                    ("1.5gb", 1_500_000_000), ("1000", 1000), (" 2 TB ", 2 * 10**12),
                                    ("64KiB", 65536)])
def test_parse_memory_reads_decimal_and_binary_units(text, n):
    assert parse_memory(text) == n


@pytest.mark.parametrize("text", ["", "GB", "8XB", "-1GB", "0", "0.0GB", "8 G B", "1e9", "nan"])
def test_parse_memory_refuses_what_is_not_a_size(text):
    with pytest.raises(refimpl.InputError, match="--max-memory"):
        parse_memory(text)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("m") / "fp8")
    make_checkpoint(path, TINY, seed=2, fp8=True, shards=3)
    return path


def largest_working_set(model):
    return max(sum(model.weights.nbytes(n) for n in names)
               for layer in range(TINY.num_hidden_layers) for names in working_sets(TINY, layer))


def test_a_budget_of_one_working_set_gives_the_same_logits_and_never_holds_more(ckpt):
    free = refimpl.load(ckpt)
    want = free.forward(TOKENS)
    cache = free.new_cache(batch=2, max_len=24)
    want_steps = [free.forward(TOKENS[:, :20], cache=cache)] + \
        [free.forward(TOKENS[:, j:j + 1], cache=cache) for j in range(3)]
    tight = refimpl.load(ckpt)
    budget = largest_working_set(tight)
    tight.weights.max_bytes = budget
    assert np.array_equal(tight.forward(TOKENS), want)
    cache = tight.new_cache(batch=2, max_len=24)
    got_steps = [tight.forward(TOKENS[:, :20], cache=cache)] + \
        [tight.forward(TOKENS[:, j:j + 1], cache=cache) for j in range(3)]
    assert all(np.array_equal(a, b) for a, b in zip(got_steps, want_steps))
    assert tight.weights.peak_bytes <= budget
    assert tight.weights.materialised > free.weights.materialised  # weights were read again
    assert free.weights.peak_bytes > budget  # without a budget it holds everything it used
    assert tight.weights.reused > 0 and free.weights.reused == 0  # released memory written over


def test_a_released_weight_is_written_over_only_when_nobody_else_holds_it(ckpt):
    """The store reuses a released tensor's memory for the next one of the same shape and dtype
    (no page faults for a fresh array), but never memory a caller still holds."""
    model = refimpl.load(ckpt)
    w = model.weights
    up = [f"model.layers.1.mlp.experts.{e}.up_proj.weight" for e in range(3)]
    w.max_bytes = w.nbytes(up[0])  # room for one expert matrix
    address = w.get(up[0]).__array_interface__["data"][0]
    second = w.get(up[1])  # up[0] released: its memory now holds up[1]
    assert second.__array_interface__["data"][0] == address and w.reused == 1
    assert np.array_equal(second, refimpl.load(ckpt).weights.get(up[1]))
    held = second.copy()
    third = w.get(up[2])  # `second` is still referenced here: it must not be written over
    assert w.reused == 1 and not np.shares_memory(third, second)
    assert np.array_equal(second, held)


def test_the_embedding_is_read_by_rows_and_a_large_head_streamed_under_a_budget(ckpt):
    model = refimpl.load(ckpt)
    model.weights.max_bytes = largest_working_set(model)
    head_bytes = model.weights.nbytes("lm_head.weight")
    assert head_bytes > model.weights.max_bytes // 2  # so the head must be streamed
    logits = model.forward(TOKENS)
    assert "model.embed_tokens.weight" not in model.weights._resident
    assert "lm_head.weight" not in model.weights._resident
    assert np.array_equal(logits, refimpl.load(ckpt).forward(TOKENS))


def test_routed_experts_are_read_only_when_a_token_is_routed_to_them(ckpt):
    model = refimpl.load(ckpt)
    trace = {}
    model.forward(TOKENS[:1, :3], trace=trace)
    for layer in range(TINY.first_k_dense_replace, TINY.num_hidden_layers):
        routed = set(trace[f"layers.{layer}.topk_idx"].reshape(-1).tolist())
        held = {int(n.split(".")[5]) for n in model.weights._resident
                if n.startswith(f"model.layers.{layer}.mlp.experts.")}
        assert held == routed
        assert len(routed) < TINY.n_routed_experts


def test_a_budget_below_one_working_set_is_refused_in_one_line(ckpt, tmp_path):
    np.save(tmp_path / "t.npy", TOKENS)
    r = run_cli("logits", "--checkpoint", ckpt, "--tokens", tmp_path / "t.npy", "--out",
                tmp_path / "l.npy", "--max-memory", "10MB")
    assert r.returncode == 2
    assert r.stderr.startswith("refimpl: error: --max-memory") and "too small" in r.stderr
    assert r.stderr.count("\n") == 1
    r = run_cli("logits", "--checkpoint", ckpt, "--tokens", tmp_path / "t.npy", "--out",
                tmp_path / "l.npy", "--max-memory", "lots")
    assert r.returncode == 2 and "--max-memory 'lots'" in r.stderr


def test_max_memory_on_the_command_line_gives_the_unbounded_logits(ckpt, tmp_path):
    np.save(tmp_path / "t.npy", TOKENS)
    r = run_cli("logits", "--checkpoint", ckpt, "--tokens", tmp_path / "t.npy", "--out",
                tmp_path / "l.npy", "--max-memory", "2GB")
    assert r.returncode == 0, r.stderr
    assert np.array_equal(np.load(tmp_path / "l.npy"), refimpl.load(ckpt).forward(TOKENS))


def test_fp8_activation_emulation_keeps_weights_as_stored_and_stays_near_the_float_result(tmp_path):
    # every expert selected, so that routing cannot flip (see test_checkpoint_layout)
    cfg = TINY.replace(n_group=1, topk_group=1, num_experts_per_tok=TINY.n_routed_experts)
    make_checkpoint(tmp_path / "q", cfg, seed=0, fp8=True)
    plain = refimpl.load(tmp_path / "q")
    emu = refimpl.load(tmp_path / "q", fp8_activations=True)
    want, got = plain.forward(TOKENS), emu.forward(TOKENS)
    assert isinstance(emu.weights.get("model.layers.0.self_attn.q_a_proj.weight"), BlockFP8)
    assert not isinstance(emu.weights.get("model.layers.0.self_attn.kv_b_proj.weight"), BlockFP8)
    # activations are quantised like the weights were: rho = 2^-4 / sqrt(8 ln 2) per GEMM input,
    # over layers x 7 GEMMs (kv_b stays dequantised); same first-order argument, g in [0.25, 2]
    rho = 2.0 ** -4 / math.sqrt(8 * math.log(2))
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    n = cfg.num_hidden_layers * 7
    assert 0.25 * math.sqrt(n) * rho < err < 2 * math.sqrt(n) * rho, err
    assert emu.weights.peak_bytes < plain.weights.peak_bytes / 2  # one byte per FP8 weight


def test_fp8_activation_emulation_does_nothing_to_a_float_checkpoint(tmp_path):
    make_checkpoint(tmp_path / "f", TINY, seed=0)
    assert np.array_equal(refimpl.load(tmp_path / "f", fp8_activations=True).forward(TOKENS),
                          refimpl.load(tmp_path / "f").forward(TOKENS))


def test_fp8_activations_on_the_command_line(ckpt, tmp_path):
    np.save(tmp_path / "t.npy", TOKENS)
    r = run_cli("logits", "--checkpoint", ckpt, "--tokens", tmp_path / "t.npy", "--out",
                tmp_path / "l.npy", "--fp8-activations")
    assert r.returncode == 0, r.stderr
    want = refimpl.load(ckpt, fp8_activations=True).forward(TOKENS)
    assert rel_err(np.load(tmp_path / "l.npy"), want) == 0.0


def test_the_mtp_modules_read_the_embedding_by_rows_and_stream_the_head_under_a_budget(ckpt):
    """MTP shares the main model's embedding and head (mtp.Conventions.weights="main"): under a
    budget they are read by rows and streamed there too, never held whole, teacher-forced and
    through the MTP latent cache alike."""
    free = refimpl.load(ckpt)
    want_logits, want_mtp = free.forward(TOKENS, mtp=True)
    want_decode = decode(free, TOKENS[:1], 4, use_mtp=True).tokens
    tight = refimpl.load(ckpt)
    budget = max(sum(tight.weights.nbytes(n) for n in names)
                 for layer in range(TINY.num_layers_with_mtp) for names in working_sets(TINY, layer))
    tight.weights.max_bytes = budget
    assert tight.weights.nbytes("lm_head.weight") > budget // 2  # so the head must be streamed
    whole = []  # tensors materialised whole
    source_weight = tight.weights.source.weight
    tight.weights.source.weight = lambda name, *a, **k: whole.append(name) or source_weight(name, *a, **k)
    logits, got_mtp = tight.forward(TOKENS, mtp=True)
    assert np.array_equal(logits, want_logits)
    assert all(np.array_equal(a, b) for a, b in zip(got_mtp, want_mtp))
    assert decode(tight, TOKENS[:1], 4, use_mtp=True).tokens == want_decode
    assert "model.embed_tokens.weight" not in whole and "lm_head.weight" not in whole
    assert tight.weights.peak_bytes <= budget


def test_the_next_layer_and_the_routed_experts_are_read_ahead_before_they_are_used(ckpt):
    """Read-ahead hints (WeightStore.prefetch -> Checkpoint.prefetch, MADV_WILLNEED): every
    tensor of layer i+1 that every token uses is hinted before layer i+1 runs, the routed experts
    as soon as the gate has chosen them, nothing else; the logits do not change."""
    model = refimpl.load(ckpt)
    src = model.weights.source
    events = []
    real_prefetch, real_weight = src.prefetch, src.weight
    src.prefetch = lambda name: (events.append(("hint", name)), real_prefetch(name))[1]
    src.weight = lambda name, *a, **k: (events.append(("read", name)), real_weight(name, *a, **k))[1]
    assert np.array_equal(model.forward(TOKENS), refimpl.load(ckpt).forward(TOKENS))
    hinted = {n for e, n in events if e == "hint"}
    for k, (e, name) in enumerate(events):
        if e == "read" and (".experts." in name or layer_of(name) not in (None, 0)):
            assert ("hint", name) in events[:k], f"{name} read without a hint first"
    read_experts = {n for e, n in events if e == "read" and ".experts." in n}
    assert {n for n in hinted if ".experts." in n} == read_experts
