"""Forced routing (moe.route's `forced`, Model.forward's `routes`): a token routed to given
experts instead of its own choice. Forcing a token's own choice changes nothing, bit for bit; a
different choice changes that token at that layer and only what causally follows it."""

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from refimpl import Config, InputError, moe
from refimpl.ops import silu
from tests.helpers import tiny_model

TINY = Config.preset("tiny")


def _block(seed, tokens, n_group=4, per_group=4, topk_group=2, top_k=3, d=8, shared=True):
    rng = np.random.default_rng(seed)
    e = n_group * per_group
    cfg = TINY.replace(hidden_size=d, n_routed_experts=e, n_group=n_group, topk_group=topk_group,
                       num_experts_per_tok=top_k, routed_scaling_factor=2.5)
    experts = [{"gate_proj": rng.normal(size=(6, d)), "up_proj": rng.normal(size=(6, d)),
                "down_proj": rng.normal(size=(d, 6))} for _ in range(e)]
    sh = {"gate_proj": rng.normal(size=(5, d)), "up_proj": rng.normal(size=(5, d)),
          "down_proj": rng.normal(size=(d, 5))} if shared else None
    return (rng.normal(size=(tokens, d)), rng.normal(size=(e, d)), rng.normal(0, 0.3, size=e),
            experts, sh, cfg)


def _run(block, forced=None):
    x, w, b, experts, sh, cfg = block
    rec = {}
    out = moe.moe_ffn(x, w, b, experts, sh, cfg, lambda n, v: rec.__setitem__(n, v), forced=forced)
    return out, rec


@given(st.integers(0, 2**31), st.integers(1, 12))
@example(0, 1)
def test_forcing_tokens_to_their_own_choice_changes_nothing(seed, tokens):
    block = _block(seed, tokens)
    out, rec = _run(block)
    rng = np.random.default_rng(seed)
    which = np.flatnonzero(rng.random(tokens) < 0.6)
    # the same sets in any order
    sets = np.array([rng.permutation(rec["topk_idx"][t]) for t in which], np.int64).reshape(
        len(which), block[-1].num_experts_per_tok)
    out2, rec2 = _run(block, (which, sets))
    assert np.array_equal(out, out2)
    for k in rec:
        assert np.array_equal(rec[k], rec2[k]), k


@given(st.integers(0, 2**31), st.integers(2, 10), st.booleans())
@example(0, 2, False)
def test_a_forced_token_changes_only_itself_with_weights_from_its_forced_experts(seed, tokens, shared):
    block = _block(seed, tokens, shared=shared)
    x, w, b, experts, sh, cfg = block
    out, rec = _run(block)
    rng = np.random.default_rng(seed + 1)
    t = int(rng.integers(tokens))
    chosen = rng.choice(cfg.n_routed_experts, cfg.num_experts_per_tok, replace=False)
    out2, rec2 = _run(block, (np.array([t]), chosen[None]))
    others = np.arange(tokens) != t
    # the other tokens: the same up to float64 rounding (an expert's GEMM over a different set
    # of tokens may sum in another order)
    np.testing.assert_allclose(out2[others], out[others], rtol=1e-13, atol=1e-13)
    assert np.array_equal(rec2["topk_idx"][others], rec["topk_idx"][others])
    assert np.array_equal(rec2["topk_weight"][others], rec["topk_weight"][others])
    assert np.array_equal(rec2["router_scores"], rec["router_scores"])
    assert sorted(rec2["topk_idx"][t].tolist()) == sorted(chosen.tolist())
    # written out by hand: sigmoid scores, the weights of the forced experts normalised x 2.5,
    # largest biased score first; the output is shared + sum g_j FFN_j
    s = 1 / (1 + np.exp(-(w @ x[t])))
    order = sorted(chosen.tolist(), key=lambda e: (-(s[e] + b[e]), e))
    assert rec2["topk_idx"][t].tolist() == order
    g = s[order] / s[order].sum() * 2.5
    np.testing.assert_allclose(rec2["topk_weight"][t], g, rtol=1e-13)

    def ffn(p, v):
        return p["down_proj"] @ (silu(p["gate_proj"] @ v) * (p["up_proj"] @ v))
    want = sum(gj * ffn(experts[e], x[t]) for gj, e in zip(g, order))
    if shared:
        want = want + ffn(sh, x[t])
    np.testing.assert_allclose(out2[t], want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("forced, words", [
    ((np.array([0]), np.array([[0, 1]])), "2 per token, the model selects 3"),
    ((np.array([0]), np.array([[0, 1, 2, 3]])), "4 per token"),
    ((np.array([0]), np.array([[0, 1, 1]])), "distinct experts"),
    ((np.array([0]), np.array([[0, 1, 16]])), "distinct experts in [0, 16)"),
    ((np.array([5]), np.array([[0, 1, 2]])), "in [0, 5)"),
    ((np.array([1, 1]), np.array([[0, 1, 2], [0, 1, 2]])), "distinct"),
])
def test_bad_forced_experts_are_refused(forced, words):
    with pytest.raises(InputError) as e:
        _run(_block(0, 5), forced)
    assert words in str(e.value)


# ---- the whole model ---------------------------------------------------------------------------

def _trace(model, tokens, routes=None, **kw):
    trace = {}
    model.forward(tokens, trace=trace, routes=routes, **kw)
    return trace


def _other_choice(trace, layer, row, pos, n_experts, rng):
    mine = set(trace[f"layers.{layer}.topk_idx"][row, pos].tolist())
    k = len(mine)
    while True:
        c = rng.choice(n_experts, k, replace=False)
        if set(c.tolist()) != mine:
            return [int(e) for e in c]


POST_ROUTING = ("topk_idx", "topk_weight", "ffn_out", "hidden")


def _changed(a, b, lead):
    """Token positions [n, len(lead)] where a and b differ beyond float64 rounding (an expert's
    GEMM over another set of tokens may sum in another order)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(float(np.max(np.abs(b))), 1e-300)
    return np.argwhere(np.any((np.abs(a - b) > 1e-12 * scale).reshape(*lead, -1), axis=-1))


@settings(max_examples=8, deadline=None)
@given(st.integers(0, 2**31), st.integers(2, 9))
@example(0, 5)
def test_forcing_a_token_in_the_model_changes_only_what_follows_it(seed, length):
    model = tiny_model(0)
    cfg = model.cfg
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.vocab_size, (2, length))
    base = _trace(model, tokens)
    moe_layers = [i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i)]
    layer = int(rng.choice(moe_layers))
    row, pos = int(rng.integers(2)), int(rng.integers(length))
    # its own choice: bit-identical
    own = {layer: {(row, pos): base[f"layers.{layer}.topk_idx"][row, pos].tolist()[::-1]}}
    same = _trace(model, tokens, own)
    assert all(np.array_equal(same[k], base[k]) for k in base)
    forced = {layer: {(row, pos): _other_choice(base, layer, row, pos, cfg.n_routed_experts, rng)}}
    got = _trace(model, tokens, forced)
    last = layer == cfg.num_hidden_layers - 1
    for name, v in base.items():
        changed = _changed(got[name], v, (2, length))
        parts = name.split(".")
        if parts[0] == "layers" and int(parts[1]) < layer:
            assert not len(changed), name
        elif parts[0] == "layers" and int(parts[1]) == layer:
            if parts[2] in POST_ROUTING:
                assert changed.tolist() == [[row, pos]], name
            else:
                assert not len(changed), name
        elif parts[0] == "embed":
            assert not len(changed)
        else:  # later layers, final_hidden, logits: that row, from pos on (at pos only after
            # the last layer: no attention follows it)
            assert all(r == row and (p == pos if last and parts[0] != "layers" else p >= pos)
                       for r, p in changed.tolist()), name
    assert np.any(got["logits"][row, pos] != base["logits"][row, pos])


def test_forced_routes_through_the_cache_equal_the_whole_forward():
    model = tiny_model(1)
    cfg = model.cfg
    tokens = np.random.default_rng(3).integers(0, cfg.vocab_size, (1, 9))
    layer = max(i for i in range(cfg.num_hidden_layers) if cfg.is_moe_layer(i))
    routes = {layer: {(0, 2): [0, 1, 2, 3][:cfg.num_experts_per_tok],
                      (0, 6): [4, 5, 6, 7][:cfg.num_experts_per_tok]}}
    whole = model.forward(tokens, routes=routes)
    cache = model.new_cache(1, 9)
    parts = [model.forward(tokens[:, :4], cache=cache, routes=routes)]
    parts += [model.forward(tokens[:, j:j + 1], cache=cache, routes=routes) for j in range(4, 9)]
    np.testing.assert_allclose(np.concatenate(parts, axis=1), whole, rtol=1e-11, atol=1e-12)
    assert not np.allclose(whole, model.forward(tokens))


def test_forced_routes_in_an_mtp_module_start_there():
    cfg = TINY.replace(num_nextn_predict_layers=2)
    model = tiny_model(0, cfg)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (1, 8))
    base = _trace(model, tokens, mtp=True)
    mtp1 = cfg.num_hidden_layers  # the checkpoint layer of module 1
    mine = set(base["mtp.1.layer.topk_idx"][0, 3].tolist())
    other = [e for e in range(cfg.n_routed_experts) if e not in mine][:cfg.num_experts_per_tok]
    got = _trace(model, tokens, {mtp1: {(0, 3): other}}, mtp=True)
    for name, v in base.items():
        diff = _changed(got[name], v, (1, v.shape[1]))[:, 1]
        last = name.split(".")[-1]
        before = (not name.startswith("mtp.") or name == "mtp.2.embed"
                  or name in ("mtp.1.embed", "mtp.1.h_prev", "mtp.1.eh_proj")
                  or name.startswith("mtp.1.layer.") and last not in POST_ROUTING)
        if before:
            assert not len(diff), name
        elif name.startswith("mtp.1."):  # after the module's routing: index 3 only
            assert diff.tolist() == [3], name
        else:  # module 2 continues index 3 of module 1
            assert len(diff) and diff.min() >= 3, name
    with pytest.raises(InputError, match="dense"):
        model.forward(tokens, routes={0: {(0, 0): other}})
