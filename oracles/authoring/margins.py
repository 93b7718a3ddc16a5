"""Margins by design: model weights whose routing decisions and greedy streams are decided by
far more than any tolerance profile's rounding, while still depending on the input.

A model with random weights routes many tokens at near-ties (the k-th and (k+1)-th biased
scores, or the topk_group-th and next group score, a few hundredths apart), and its greedy
stream parts at steps whose two best logits are a few hundredths apart. In bf16 or fp8 an honest
engine resolves such ties either way, the checker forgives them, and the positions after a
forgiven flip are not compared: a case can end up judging almost nothing. The builders here
put the margins into the weights instead.

Routing (`plant_routing`): E "code channels" of the residual stream (one per routed expert)
carry a per-token code, written into the embedding; every projection that writes into the
residual stream (o_proj, every down_proj; an MTP module's eh_proj passes its embedding's code
through) has zero rows there, so a token's code channels hold exactly its embedding's code at
every layer (after each RMSNorm, scaled by the norm: the sign pattern is unchanged). Each MoE
layer's gate reads one code channel per expert with a large weight (GATE_LOGIT at rms 1) plus a
small random read of every other channel (so the scores still move with the context): sigmoid
gate logits of either sign, |z| >= 4 in practice, scores within 0.02 of 0 or 1. With the
biases drawn once per layer, each token's code is drawn (from the case's generator) until its
biased scores, taken as exactly 0 or 1, clear `margin` + twice that slack at the group cut and
the top-k cut in every MoE layer, at every context scale in SCALES. So every token routes by
its identity, differently from other tokens, with a designed margin, whatever its context;
routing bugs still change the routing of some tokens, and the router scores still carry the
bf16/fp8 rounding of their inputs (far too little to move a saturated sigmoid across a cut).
Softmax scoring (V2) uses graded code levels instead of signs: the top-k experts of topk_group
groups at ON_LEVELS, the rest far below, and for about half the tokens two "decoys" in a
dropped group at DECOY_LEVELS (each below a kept group's best; their sum above it where the
levels are close enough: model.prefill.v2_group_top2), with per-layer permutations that move
whole groups so the structure holds in every layer. Codes of 0 (`levels`) put a sigmoid score
at 1/2, give or take the context read (CONTEXT_SLACK): a chosen expert whose weight the
renormalisation changes (model.prefill.single_expert).

Greedy streams (`plant_stream_margins`): after the routing design, the greedy continuation of
the case's prompt is computed in float64; at the first step whose two best logits are closer
than `margin`, the winner's output-head row is moved along that step's final hidden state
until the gap there is 1.25 `margin` (which changes no other token's logit); every such step at
once, then the stream is recomputed (a change may move other steps, or the stream itself),
until every step clears.

The contract other builders rely on (serving scenarios, hypothesis-drawn configs):
    weights = plant_routing(cfg, weights, rng, margin=ROUTING_MARGIN)
    weights = plant_stream_margins(cfg, weights, prompt, n_new, margin=STREAM_MARGIN)
plant_routing needs n_routed_experts <= hidden_size / 2 and draws from `rng` (so call it at the
same point of a case's draws every time); it raises ValueError when no code clears the margin
for the config. plant_stream_margins raises ValueError when the stream does not clear within
its rounds. Both return new dicts, each tensor in the dtype it came in, and leave the config
alone; `draws.designed(case, routing, stream)` records the margins in the case's params (and
so in the manifest). draws.model_weights / mtp_weights call plant_routing (design=False for
random routing on purpose).
"""

from __future__ import annotations

import numpy as np

from refimpl import names
from refimpl.config import Config
from refimpl.generate import greedy
from refimpl.model import Model

from .kinds import routing_margin

ROUTING_MARGIN = 0.12  # biased-score units: 4x the fp8 profile's margin floor (0.03)
STREAM_MARGIN = 1.5  # logits: 3x the fp8 profile's logit floor (0.5)
GATE_LOGIT = 12.0  # a code channel's gate logit at RMS 1 of the residual stream
BIAS_STD = 0.3  # the designed gate biases: N(mean of the case's biases, BIAS_STD^2)
CONTEXT_READ = 0.05  # the gate's random read of the other channels, relative to random_tensor's
CONTEXT_SLACK = 0.05  # how far the context read moves a score of 1/2 (measured: tests)
SCALES = (0.35, 1.0, 2.0)  # context scales (code channel after RMSNorm / at RMS 1) checked
ON_LEVELS = (0.5, 0.55)  # softmax scoring: the chosen experts' code levels
DECOY_LEVELS = (0.38, 0.42)  # and the decoys'


def moe_layers(cfg: Config, weights: dict) -> list[int]:
    """The MoE layers the checkpoint holds (main model and MTP modules)."""
    return [i for i in range(cfg.num_layers_with_mtp)
            if cfg.is_moe_layer(i) and names.gate_weight(i) in weights]


def _writes_residual(name: str) -> bool:
    """Projections whose output is added to the residual stream."""
    return name.endswith(("self_attn.o_proj.weight", "down_proj.weight"))


def _scores(z, scoring_func):
    if scoring_func == "sigmoid":
        return 1.0 / (1.0 + np.exp(-z))
    z = z - z.max(-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(-1, keepdims=True)


def _gate_logits(codes, perm, sign, scale):
    """codes [N, E] -> the designed gate logits of one layer at one context scale [N, E]."""
    return GATE_LOGIT * scale * sign[None, :] * codes[:, perm]


def _margins(codes, layers, cfg, scoring, scales=SCALES):
    """The smallest designed routing margin of each candidate code over the layers and the
    context scales, with the sigmoid's distance from 0, 1/2 or 1 at that scale counted against
    it (a code 0 sits at 1/2 whatever the scale, give or take the context read: CONTEXT_SLACK)."""
    worst = np.full(len(codes), np.inf)
    for perm, sign, bias in layers:
        for scale in scales:
            z = _gate_logits(codes, perm, sign, scale)
            s = _scores(z, scoring)
            if scoring == "sigmoid":
                ideal = np.where(z > 0, 1.0, np.where(z < 0, 0.0, 0.5))
                slack = np.where(z == 0, CONTEXT_SLACK, np.abs(s - ideal)).max(-1)
                m = routing_margin(ideal, bias, cfg) - 2 * slack
            else:
                m = routing_margin(s, None, cfg)
            worst = np.minimum(worst, m)
    return worst


def _draw_codes(rng, n, cfg, levels=(-1.0, 1.0), on=None, decoy=None):
    """n candidate codes [n, E]. Sigmoid scoring: random values of `levels` (signs, or signs and
    0 for scores of 1/2). Softmax scoring (V2): off (-1)
    everywhere but top-k experts in topk_group groups at levels in ON_LEVELS and, for half of
    them, two decoys in a dropped group at DECOY_LEVELS (each below a kept group's best, their
    sum above it: a group scored by its top-2 sum, not its best, is kept instead)."""
    e = cfg.n_routed_experts
    if cfg.scoring_func == "sigmoid":
        return rng.choice(np.asarray(levels, np.float64), (n, e))
    per, k = cfg.experts_per_group, cfg.num_experts_per_tok
    codes = np.full((n, e), -1.0)
    for t in range(n):
        kept = rng.choice(cfg.n_group, cfg.topk_group, replace=False)
        slots = (kept[:, None] * per + np.arange(per)).reshape(-1)
        chosen = rng.choice(slots, min(k, len(slots)), replace=False)
        codes[t, chosen] = rng.uniform(*(on or ON_LEVELS), len(chosen))
        dropped = np.setdiff1d(np.arange(cfg.n_group), kept)
        if len(dropped) and per >= 2 and rng.random() < 0.5:
            g = rng.choice(dropped)
            codes[t, g * per + rng.choice(per, 2, replace=False)] = rng.uniform(*(decoy or DECOY_LEVELS), 2)
    return codes


def _perm(rng, cfg):
    """Which code index each expert reads: any permutation (sigmoid scoring), or one that moves
    whole groups (softmax scoring, so that a code's group structure holds in every layer)."""
    e = cfg.n_routed_experts
    if cfg.scoring_func == "sigmoid":
        return rng.permutation(e)
    per = cfg.experts_per_group
    return np.concatenate([g * per + rng.permutation(per) for g in rng.permutation(cfg.n_group)])


def plant_routing(cfg: Config, weights: dict, rng, margin: float = ROUTING_MARGIN,
                  amplitude: float = 1.0, levels=(-1.0, 1.0), scales=SCALES, on=None,
                  decoy=None) -> dict:
    """The weights with every token's routing decided by >= `margin` at every MoE layer (see the
    module doc). weights: a checkpoint dict by HF names (the MTP layers optional). amplitude:
    the codes' size in the embedding (1: that of random_tensor's embedding entries; smaller for
    an embedding scaled down). levels: the sigmoid codes' values, -1 and 1 (scores near 0 and
    1), and 0 for scores near 1/2 (a chosen expert whose weight the renormalisation changes).
    scales: the context scales the margin must hold at (the gate logit of a code channel over
    its value at RMS 1: 1 / RMS of the residual stream where the gate reads it). on, decoy:
    softmax scoring's level ranges (ON_LEVELS, DECOY_LEVELS)."""
    layers = moe_layers(cfg, weights)
    if not layers:
        return dict(weights)
    w = {k: np.array(v, np.float64) for k, v in weights.items()}
    dtypes = {k: np.asarray(v).dtype for k, v in weights.items()}
    d, e, v = cfg.hidden_size, cfg.n_routed_experts, cfg.vocab_size
    if 2 * e > d:
        raise ValueError(f"plant_routing: {e} routed experts need {e} code channels of the "
                         f"hidden size {d}, at most half of it")
    chan = np.sort(rng.choice(d, e, replace=False))  # code channel of each "code index"
    scoring = cfg.scoring_func
    for name in w:
        if _writes_residual(name):
            w[name][chan, :] = 0.0  # nothing is added to the code channels
    for k in range(1, cfg.num_nextn_predict_layers + 1):
        m = names.mtp_layer(cfg, k)
        if names.eh_proj(m) in w:  # [d, 2d], input [enorm(embedding) ; hnorm(h)]: pass the
            w[names.eh_proj(m)][chan, :] = 0.0  # embedding's code, at the scale the main
            w[names.eh_proj(m)][chan, chan] = 1.0  # layers see it (enorm 1 there)
            w[names.enorm(m)][chan] = 1.0
    design = []
    for i in layers:
        perm = _perm(rng, cfg)  # expert j reads code index perm[j]
        sign = rng.choice([-1.0, 1.0], e) if scoring == "sigmoid" else np.ones(e)
        bias = None
        if cfg.uses_bias and names.gate_bias(i) in w:
            bias = float(np.mean(w[names.gate_bias(i)])) + rng.normal(0.0, BIAS_STD, e)
            w[names.gate_bias(i)] = bias
        design.append((perm, sign, bias))
    # each token's code: drawn until every MoE layer routes it with the margin
    codes = np.zeros((v, e))
    have = 0
    for _ in range(200):
        cand = _draw_codes(rng, 4096 if scoring == "sigmoid" else 512, cfg, levels, on, decoy)
        ok = cand[_margins(cand, design, cfg, scoring, scales) >= margin]
        take = ok[: v - have]
        codes[have:have + len(take)] = take
        have += len(take)
        if have == v:
            break
    else:
        raise ValueError(f"plant_routing: no code clears a routing margin of {margin} for this "
                         f"config (n_group {cfg.n_group}, topk_group {cfg.topk_group}, "
                         f"top-k {cfg.num_experts_per_tok} of {e})")
    for name in (names.EMBED, *[names.mtp_embed(names.mtp_layer(cfg, k))
                                for k in range(1, cfg.num_nextn_predict_layers + 1)]):
        if name in w:
            w[name][:, chan] = amplitude * codes
    for i, (perm, sign, _) in zip(layers, design):
        g = w[names.gate_weight(i)] * CONTEXT_READ  # [E, d]: a small read of every channel
        g[:, chan] = 0.0
        norm = w[names.post_attention_norm(i)][chan[perm]]  # the gate reads RMSNorm(h) * norm
        g[np.arange(e), chan[perm]] = GATE_LOGIT * sign / norm
        w[names.gate_weight(i)] = g
    return {k: a.astype(dtypes[k]) if dtypes[k] != np.float64 else a for k, a in w.items()}


def greedy_logits(cfg: Config, weights: dict, prompt, n_new: int):
    """(tokens [n_new], logits [n_new, vocab], final hidden [n_new, d]) of the float64 greedy
    continuation of prompt [P]: step j's logits and hidden state are those that chose token j."""
    model = Model.from_arrays(cfg, weights, dtype="float64")
    toks = greedy(model, np.asarray(prompt), n_new)
    seq = np.concatenate([np.asarray(prompt), toks[:-1]])[None, :]
    trace = {}
    logits = np.asarray(model.forward(seq, trace=trace))[0, len(prompt) - 1:]
    return np.asarray(toks), logits, np.asarray(trace["final_hidden"])[0, len(prompt) - 1:]


def plant_stream_margins(cfg: Config, weights: dict, prompt, n_new: int,
                         margin: float = STREAM_MARGIN, rounds: int = 60) -> dict:
    """The weights with the greedy continuation of `prompt` decided by >= `margin` (two best
    logits apart) at every step (see the module doc); the output head rows change (and the MTP
    modules' head copies with them)."""
    w = dict(weights)
    head = names.head(cfg)
    copies = [names.mtp_head(names.mtp_layer(cfg, k)) for k in range(1, cfg.num_nextn_predict_layers + 1)]
    copies = [c for c in copies if c in w and np.array_equal(w[c], w[head])]
    for _ in range(rounds):
        toks, logits, hidden = greedy_logits(cfg, w, prompt, n_new)
        top2 = -np.sort(-logits, axis=-1)[:, :2]
        gap = top2[:, 0] - top2[:, 1]
        bad = np.nonzero(gap < margin)[0]
        if not len(bad):
            return w
        w[head] = np.array(w[head])
        for j in bad:  # each winner's row moved along its step's hidden state
            h = hidden[j]
            w[head][toks[j]] += ((1.25 * margin - gap[j]) * h / (h @ h)).astype(w[head].dtype)
        for c in copies:
            w[c] = w[head]
    raise ValueError(f"plant_stream_margins: the greedy stream still has steps closer than "
                     f"{margin} after {rounds} rounds")


def design_params(routing: float | None = None, stream: float | None = None) -> dict:
    """What a designed case records in its params: the margins it was built to clear."""
    out = {}
    if routing is not None:
        out["routing_margin"] = routing
    if stream is not None:
        out["stream_margin"] = stream
    return {"designed_margins": out}
