"""Property-based conformance search: hypothesis draws models, inputs and serving schedules, the
checker judges a live candidate on each, and a divergence is shrunk to the smallest case that
still shows it and written as a golden case (docs/conformance.md section 12).

    oracles search (--adapter pkg.mod:factory | --engine NAME [--engine-option K=V ...]) --out DIR
                   [--profile P] [--max-examples N] [--deadline SECONDS] [--seed N]
                   [--database DIR | --no-database] [--kinds K,...] [--pin AXIS=VALUE ...]

One example is one golden case, made the way the suites make theirs: a config (every axis
below), a checkpoint from refimpl's checkpoint writer (`random_weights`, or the published FP8
block layout), inputs, and for `schedule` cases a serving schedule in the current format
(oracles/authoring/scenarios.py). The golden writer computes its expected outputs and calibrates
the profile's tolerances for this one case (writer.write_suite: the same per-case computation as
every suite); the candidate is then judged by `oracles.checking.check.run_check`, exactly as
`oracles check` judges it: the profile that emulates its mode unless --profile says otherwise,
the reference recomputed on its routing where it resolves a forgiven near-tie the other way
(the command line hands both to the search: the authoring layer does not import the checking
layer). A case whose golden routing is within the profile's rounding (a
token's `topk_margin` at or below the calibrated `margin_eps`, or a greedy step's
`tokens_margin` at or below its `logit_eps`) is rejected before the candidate runs and counted:
a near-tie is neither a divergence nor evidence, so the search draws past it instead of
forgiving it; so is a case with an output beyond the profile's resolution (its calibrated error
times K above the metric's ceiling). Cases the candidate declines (`supports()`) are rejected
and counted with the reason.

A divergence is a case that FAILs (or ERRs) under the checker. Its signature is the first
failing output with layer, request and module numbers generalised (`layers.N.topk_idx`), so
hypothesis shrinks the example to the smallest one that fails at that same output; the shrunk
case is written to OUT/search-<date>/ as a suite of its own (manifest, digest, the repro
command), its id `search.<first failing output>`. The drawn axes are recorded in the case's
manifest entry (`drawn`): `build(axes, case_id)` makes the case again without hypothesis.

Determinism: the draws are seeded with hypothesis's `@seed(--seed)` (not `derandomize`, which
would seed from the test function's hash and so ignore --seed). Under @seed hypothesis turns
its example database off; the search turns it back on with an explicit `settings(database=...)`
(a DirectoryBasedExampleDatabase: it stores choice sequences as bytes, never pickles), so that
a rerun first replays what an earlier run found (hypothesis's reuse phase: a still-failing
shrunk example is reported at once). With an empty database, or --no-database, the same seed
and candidate draw the same examples. The database lives in DIR/database/ unless --database
names another directory, one subdirectory per candidate, profile, kinds and pins.

Shrinking order: every choice shrinks towards its first option (sampled_from) or its lower
bound (integers), and the options are ordered so that the first is DeepSeek-V3's own choice at
the smallest width, or the plainer feature (no YaRN, factor 1.0 scaling): a shrunk case differs
from that baseline where the divergence needs it, and sometimes where hypothesis, changing one
choice at a time, cannot go back without the example passing (another width is another random
model): the axes it holds are sufficient, not all necessary (`off_baseline` lists them).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import shlex
import shutil
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from refimpl.config import Config, RopeScaling
from refimpl.layout import FP8_QUANT_CONFIG
from refimpl.writer import random_weights

from .. import OraclesError
from ..format import tolerances
from ..format.golden import read_tensors
from ..format.schema import Case
from ..format.untrusted import escape
from .edges import fp8_blocks_weights
from .writer import write_suite

SEARCH_TAG = 23  # the weights' generator: default_rng([SEARCH_TAG, weight_seed])
F32 = np.float32

# ---------------------------------------------------------------------------------------------
# The axes: what a draw may choose (first option = the baseline a shrunk case returns to)
# ---------------------------------------------------------------------------------------------

MODEL_KINDS = ("prefill", "decode", "greedy", "schedule", "mtp_prefill")
COMPONENT_KINDS = ("gate", "fp8_act_quant", "fp8_quant")
KINDS = MODEL_KINDS + COMPONENT_KINDS
FP8_KINDS = ("prefill", "decode", "greedy")  # the FP8 block layout (no MTP weights, no schedule)

WIDTHS = {  # small widths; with fp8: above 128 and not multiples of it (partial blocks)
    False: {"hidden_size": (16, 32, 48), "q_lora_rank": (16, 24, None), "kv_lora_rank": (16, 32),
            "intermediate_size": (32, 64), "moe_intermediate_size": (8, 16)},
    True: {"hidden_size": (136, 200), "q_lora_rank": (136, None), "kv_lora_rank": (144,),
           "intermediate_size": (264,), "moe_intermediate_size": (136,)},
}
CHOICES = {
    "vocab_size": (32, 64),
    "num_attention_heads": (1, 2, 4),
    "qk_nope_head_dim": (8, 16),
    "qk_rope_head_dim": (4, 8, 2),
    "v_head_dim": (8, 16),
    "n_routed_experts": (4, 8, 16),
    "n_group": (1, 2, 4, 8),  # those that leave at least 2 experts per group
    "n_shared_experts": (1, 2, 0),  # 0: a spec edge no published model has
    "norm_topk_prob": (True, False),
    "routed_scaling_factor": (1.0, 2.5, 0.5),
    "rms_norm_eps": (1e-6, 1e-5, 1e-4, 1e-2),
    "rope_theta": (10000.0, 100.0, 1e6),
    "yarn": (False, True),
    "factor": (4.0, 40.0, 1.5),
    "original_max_position_embeddings": (4, 8, 16, 64),
    "max_position_embeddings": ("factor x original", 512, 4096),
    "mscale": (1.0, 0.707, 0.5, 0.0),
    "mscale_all_dim": (1.0, 0.707, 0.5, 0.0),
    "beta_fast": (32.0, 8.0, 64.0),
    "beta_slow": (1.0, 0.5, 2.0),
    "num_nextn_predict_layers": (1, 2),
    "fp8": (False, True),
    # the gate bias: (mean, std) of e_score_correction_bias
    "bias": ("small", "negative", "wide"),
    # bias_decided: gate weights x 0.05, so that the bias decides the experts by wide margins
    "router": ("random", "bias_decided"),
    "batch": (1, 2),
    "cache_length": ("short", "past_256"),
    "gate_logit_offset": (0.0, -50.0, -93.0),
    "block": ("normal", "zero", "tiny"),
    "width": (128, 200, 300, 64),
    "rows": (128, 136, 300),
}
INTEGERS = {  # name -> (low, high) over all kinds (a kind may narrow it)
    "num_hidden_layers": (1, 3), "first_k_dense_replace": (0, 3), "topk_group": (1, 8),
    "num_experts_per_tok": (1, 6), "weight_seed": (0, 1023), "input_seed": (0, 1023),
    "seq": (1, 20), "prefill": (1, 12), "decode_steps": (1, 6), "max_new_tokens": (1, 8),
    "requests": (1, 3), "tokens": (1, 8),
}
BIAS = {"small": (0.0, 0.05), "negative": (-0.8, 0.3), "wide": (0.0, 0.5)}
AXES = ("kind",) + tuple(CHOICES) + tuple(INTEGERS) + tuple(WIDTHS[False])


def parse_pins(pairs) -> dict:
    """['n_group=2', 'fp8=false'] -> {'n_group': 2, 'fp8': False}: the value as JSON (a bare
    word is a string), checked against the axis's options; one line naming the pin otherwise."""
    out = {}
    for p in pairs or ():
        name, sep, text = p.partition("=")
        name = name.strip()
        if not sep or not name:
            raise OraclesError(f"--pin {p!r} must look like AXIS=VALUE")
        if name not in AXES:
            raise OraclesError(f"--pin {name}: no such axis; the axes are {', '.join(AXES)}")
        try:
            v = json.loads(text)
        except ValueError:
            v = text.strip()
        options = CHOICES.get(name) or WIDTHS[False].get(name, ()) + WIDTHS[True].get(name, ())
        if isinstance(v, int) and not isinstance(v, bool) and any(type(o) is float for o in options):
            v = float(v)  # --pin mscale=1 means 1.0
        if name == "kind":
            ok = v in KINDS
        elif name == "max_position_embeddings":  # factor x original, or another; checked when drawn
            ok = isinstance(v, int) and not isinstance(v, bool) and v >= 1
        elif name in INTEGERS:
            lo, hi = INTEGERS[name]
            ok = isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi
        else:
            ok = _member(v, options)
        if not ok:
            allowed = (KINDS if name == "kind" else
                       f"{INTEGERS[name][0]}..{INTEGERS[name][1]}" if name in INTEGERS else
                       CHOICES.get(name) or WIDTHS[False][name] + WIDTHS[True][name])
            raise OraclesError(f"--pin {name}={text}: not one of this axis's values ({allowed})")
        out[name] = v
    return out


def _member(v, options) -> bool:
    return any(v == o and type(v) is type(o) for o in options)


# ---------------------------------------------------------------------------------------------
# Drawing an example: named choices through a Drawer (hypothesis, or the baseline)
# ---------------------------------------------------------------------------------------------

class Rejected(Exception):
    """A draw that cannot be made (a pinned value that does not fit the other choices)."""


class Drawer:
    """The choices of one example. `choose(options)`, `integer(lo, hi)` and `integers(n, lo, hi)`
    make the raw draws (hypothesis's strategies, or the baseline's first options); each named
    choice (an axis) is recorded in `axes` in draw order, or takes its pinned value."""

    def __init__(self, choose, integer, integers, pins=None):
        self._choose, self._integer, self._integers = choose, integer, integers
        self.pins = pins or {}
        self.axes = {}

    def pick(self, name, options):
        options = tuple(dict.fromkeys(options))
        if name in self.pins:
            v = self.pins[name]
            if not _member(v, options):
                raise Rejected(f"pinned {name}={v!r} is not one of {options} here")
        else:
            v = self._choose(options)
        self.axes[name] = v
        return v

    def integer(self, name, lo, hi, record=True):
        if record and name in self.pins:
            v = self.pins[name]
            if not lo <= v <= hi:
                raise Rejected(f"pinned {name}={v} is not within {lo}..{hi} here")
        else:
            v = self._integer(lo, hi)
        if record:
            self.axes[name] = v
        return v

    def fixed(self, name, value):
        """An axis this example does not draw (it has one possible value)."""
        if name in self.pins and self.pins[name] != value:
            raise Rejected(f"pinned {name}={self.pins[name]!r}, but this draw has {value!r}")
        self.axes[name] = value
        return value

    def token_ids(self, n, vocab):
        """n token ids: drawn one by one (they shrink to 0) up to 64, from a drawn seed beyond."""
        if n <= 64:
            return [int(t) for t in self._integers(n, 0, vocab - 1)]
        rng = np.random.default_rng([SEARCH_TAG, self._integer(0, 2**16)])
        return rng.integers(0, vocab, n).tolist()


def baseline_drawer(pins=None) -> Drawer:
    """Every choice at its first option or lower bound: the simplest example of each kind."""
    return Drawer(lambda options: options[0], lambda lo, hi: lo, lambda n, lo, hi: [lo] * n, pins)


def draw_axes(d: Drawer, kinds) -> dict:
    """One example's axes (JSON-able): its kind, config, weights and inputs."""
    kind = d.pick("kind", kinds)
    if kind == "gate":
        d.pick("hidden_size", WIDTHS[False]["hidden_size"][:2])
        _draw_routing(d, shared=False)
        d.integer("tokens", *INTEGERS["tokens"])
        d.pick("gate_logit_offset", CHOICES["gate_logit_offset"])
        d.pick("bias", CHOICES["bias"])
        d.pick("router", CHOICES["router"])
        d.integer("input_seed", *INTEGERS["input_seed"])
        return d.axes
    if kind in ("fp8_act_quant", "fp8_quant"):
        if kind == "fp8_act_quant":
            d.integer("tokens", 1, 4)
        else:
            d.pick("rows", CHOICES["rows"])
        d.pick("width", CHOICES["width"])
        d.pick("block", CHOICES["block"])
        d.integer("input_seed", *INTEGERS["input_seed"])
        return d.axes
    fp8 = d.pick("fp8", CHOICES["fp8"]) if kind in FP8_KINDS else d.fixed("fp8", False)
    vocab = d.pick("vocab_size", CHOICES["vocab_size"])
    widths = WIDTHS[fp8]
    d.pick("hidden_size", widths["hidden_size"])
    for name in ("num_attention_heads",):
        d.pick(name, CHOICES[name])
    d.pick("q_lora_rank", widths["q_lora_rank"])
    d.pick("kv_lora_rank", widths["kv_lora_rank"])
    for name in ("qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
        d.pick(name, CHOICES[name])
    layers = d.integer("num_hidden_layers", *INTEGERS["num_hidden_layers"])
    d.integer("first_k_dense_replace", 0, layers)
    d.pick("intermediate_size", widths["intermediate_size"])
    d.pick("moe_intermediate_size", widths["moe_intermediate_size"])
    _draw_routing(d, shared=True)
    d.pick("rms_norm_eps", CHOICES["rms_norm_eps"])
    d.pick("rope_theta", CHOICES["rope_theta"])
    _draw_yarn(d)
    depth = d.pick("num_nextn_predict_layers", CHOICES["num_nextn_predict_layers"]) \
        if kind == "mtp_prefill" else d.fixed("num_nextn_predict_layers", 0)
    d.pick("bias", CHOICES["bias"])
    d.pick("router", CHOICES["router"])
    d.integer("weight_seed", *INTEGERS["weight_seed"])
    room = d.axes["max_position_embeddings"]  # positions 0..room-1 (refimpl refuses more)
    if kind == "schedule":
        _draw_schedule(d, vocab, room)
        return d.axes
    batch = d.pick("batch", CHOICES["batch"]) if kind != "greedy" else d.fixed("batch", 1)
    if kind == "decode":
        p = d.integer("prefill", 1, min(INTEGERS["prefill"][1], room - 1))
        n = p + d.integer("decode_steps", 1, min(INTEGERS["decode_steps"][1], room - p))
    elif kind == "greedy":
        n = d.integer("seq", 1, min(8, room - 1))
        d.integer("max_new_tokens", 1, min(INTEGERS["max_new_tokens"][1], room - n))
    else:
        n = d.integer("seq", depth + 1, min(INTEGERS["seq"][1], room))
    d.axes["input_ids"] = [d.token_ids(n, vocab) for _ in range(batch)]
    return d.axes


def _draw_routing(d: Drawer, shared: bool) -> None:
    e = d.pick("n_routed_experts", CHOICES["n_routed_experts"])
    g = d.pick("n_group", [g for g in CHOICES["n_group"] if e % g == 0 and (g == 1 or e // g >= 2)])
    m = d.integer("topk_group", 1, g)
    d.integer("num_experts_per_tok", 1, min(m * (e // g), INTEGERS["num_experts_per_tok"][1]))
    if shared:
        d.pick("n_shared_experts", CHOICES["n_shared_experts"])
    d.pick("norm_topk_prob", CHOICES["norm_topk_prob"])
    d.pick("routed_scaling_factor", CHOICES["routed_scaling_factor"])


def _draw_yarn(d: Drawer) -> None:
    if not d.pick("yarn", CHOICES["yarn"]):
        d.fixed("max_position_embeddings", 4096)
        return
    f = d.pick("factor", CHOICES["factor"])
    o = d.pick("original_max_position_embeddings", CHOICES["original_max_position_embeddings"])
    d.pick("max_position_embeddings", (int(f * o), 512, 4096))
    for name in ("mscale", "mscale_all_dim", "beta_fast", "beta_slow"):
        d.pick(name, CHOICES[name])


def _draw_schedule(d: Drawer, vocab: int, room: int) -> None:
    """Requests, their lengths, and the steps that feed them (the `schedule` kind's format 1):
    per forward, which unfinished requests it holds and how many tokens of each (the rest, a
    chunk of it, or one: a decode step); a request that holds nothing yet may first share a
    prefix another request computed. A `past_256` schedule gives request 0 257-272 tokens, so
    that the cache passes the first KV block of 256. refimpl holds the requests in one packed
    cache of at most max_position_embeddings slots (`room`): the lengths sum to no more."""
    n = d.integer("requests", 1, min(INTEGERS["requests"][1], room))
    long = d.pick("cache_length", CHOICES["cache_length"] if room >= 272 + n - 1 else ("short",)) \
        == "past_256"
    lengths, left = [], room
    for r in range(n):
        lo, hi = (257, 272) if long and r == 0 else (1, 16)
        lengths.append(d.integer("length", lo, min(hi, left - (n - r - 1)), record=False))
        left -= lengths[-1]
    held, steps, shares = [0] * n, [], []
    while True:
        active = [r for r in range(n) if held[r] < lengths[r]]
        if not active:
            break
        # a request that shares a prefix computes at least one token of its own
        empty = [r for r in active if held[r] == 0 and lengths[r] > 1]
        donors = [q for q in range(n) if held[q] > 0]
        if empty and donors and d.integer("share", 0, 1, record=False):
            r = empty[d.integer("who", 0, len(empty) - 1, record=False)]
            q = donors[d.integer("from", 0, len(donors) - 1, record=False)]
            length = d.integer("length", 1, min(held[q], lengths[r] - 1), record=False)
            steps.append({"op": "share_prefix", "request": r, "from": q, "length": length})
            shares.append((r, q, length))
            held[r] = length
            continue
        members = [r for r in active if d.integer("in", 0, 1, record=False)] or active[:1]
        batch = []
        for r in members:
            rest = lengths[r] - held[r]
            take = 1 if (held[r] and d.integer("decode", 0, 1, record=False)) else \
                rest - d.integer("chunk", 0, rest - 1, record=False)
            batch.append([r, take])
            held[r] += take
        if steps and steps[-1]["op"] == "forward" and steps[-1]["batch"] == batch:
            steps[-1]["repeat"] = steps[-1].get("repeat", 1) + 1
        else:
            steps.append({"op": "forward", "batch": batch})
    tokens = [d.token_ids(length, vocab) for length in lengths]
    for r, q, length in shares:
        tokens[r][:length] = tokens[q][:length]
    d.axes["schedule"] = {"format": 1, "requests": n, "steps": steps}
    d.axes["request_ids"] = tokens


# ---------------------------------------------------------------------------------------------
# Building the case from its axes (no hypothesis here)
# ---------------------------------------------------------------------------------------------

_BASE = {"vocab_size": 32, "hidden_size": 16, "intermediate_size": 32, "moe_intermediate_size": 8,
         "num_hidden_layers": 1, "num_attention_heads": 1, "kv_lora_rank": 16, "q_lora_rank": 16,
         "qk_nope_head_dim": 8, "qk_rope_head_dim": 4, "v_head_dim": 8, "n_shared_experts": 1,
         "first_k_dense_replace": 0, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
         "max_position_embeddings": 4096, "num_nextn_predict_layers": 0}


def config(axes: dict):
    """The drawn Config (component kinds: the routing axes on a small base model)."""
    a = {**_BASE, **{k: v for k, v in axes.items() if k in _BASE or k in _ROUTING}}
    rs = None
    if axes.get("yarn"):
        rs = RopeScaling(factor=axes["factor"],
                         original_max_position_embeddings=axes["original_max_position_embeddings"],
                         beta_fast=axes["beta_fast"], beta_slow=axes["beta_slow"],
                         mscale=axes["mscale"], mscale_all_dim=axes["mscale_all_dim"])
    extra = {"architectures": ["DeepseekV3ForCausalLM"], "torch_dtype": "float32"}
    if axes.get("fp8"):
        extra["quantization_config"] = dict(FP8_QUANT_CONFIG)
    return Config(scoring_func="sigmoid", topk_method="noaux_tc", rope_scaling=rs, extra=extra,
                  **{k: a[k] for k in (*_BASE, *_ROUTING)})


_ROUTING = ("n_routed_experts", "n_group", "topk_group", "num_experts_per_tok",
            "norm_topk_prob", "routed_scaling_factor")


def _weights(cfg, axes) -> dict:
    """The checkpoint (refimpl's random_weights, float32; or the FP8 block layout of
    edges.fp8_blocks_weights), with the drawn gate bias and router regime."""
    rng = np.random.default_rng([SEARCH_TAG, axes["weight_seed"]])
    if axes.get("fp8"):
        w = fp8_blocks_weights(cfg, rng)
    else:
        w = {k: v.astype(F32) for k, v in random_weights(
            cfg, int(rng.integers(0, 2**31)), mtp=cfg.num_nextn_predict_layers > 0).items()}
    mean, std = BIAS[axes["bias"]]
    for k in sorted(w):
        if k.endswith("e_score_correction_bias"):
            w[k] = rng.normal(mean, std, w[k].shape).astype(F32)
        elif k.endswith("mlp.gate.weight") and axes["router"] == "bias_decided":
            w[k] = (w[k] * F32(0.05)).astype(F32)
    return w


def build(axes: dict, cid: str = "search.example"):
    """The golden case the axes describe."""
    kind, pins = axes["kind"], "drawn by oracles search: " + describe(axes)
    rng = np.random.default_rng([SEARCH_TAG, axes.get("input_seed", 0)])
    if kind == "gate":
        cfg = config(axes)
        d, e, t = cfg.hidden_size, cfg.n_routed_experts, axes["tokens"]
        u = rng.normal(0, 1, (t, d))
        w = rng.normal(0, d ** -0.5, (e, d))
        if axes["gate_logit_offset"]:  # every logit near the offset (edges.gate_logits_below_88)
            w = rng.normal(0, 0.5 * (d - 1) ** -0.5, (e, d))
            u[:, 0], w[:, 0] = 10.0, axes["gate_logit_offset"] / 10.0
        if axes["router"] == "bias_decided":
            w = w * 0.05
        mean, std = BIAS[axes["bias"]]
        inputs = {"u": u.astype(F32), "gate_weight": w.astype(F32),
                  "bias": rng.normal(mean, std, e).astype(F32)}
        return Case(cid, "gate", pins, inputs, config=cfg)
    if kind in ("fp8_act_quant", "fp8_quant"):
        k = axes["width"]
        rows = axes["tokens"] if kind == "fp8_act_quant" else axes["rows"]
        x = rng.normal(0, 1 if kind == "fp8_act_quant" else k ** -0.5, (rows, k))
        if axes["block"] == "zero":
            x[: min(rows, 128) if kind == "fp8_quant" else 1, :128] = 0.0
        elif axes["block"] == "tiny":
            x[: min(rows, 128) if kind == "fp8_quant" else 1, :128] *= 1e-6
        return Case(cid, kind, pins, {"x" if kind == "fp8_act_quant" else "w": x.astype(F32)})
    cfg = config(axes)
    w = _weights(cfg, axes)
    if kind == "schedule":
        inputs = {f"request.{r}.input_ids": np.array([t], np.int64)
                  for r, t in enumerate(axes["request_ids"])}
        return Case(cid, kind, pins, inputs, params={"schedule": axes["schedule"]}, config=cfg,
                    weights=w)
    ids = np.array(axes["input_ids"], np.int64)
    params = {"prefill": axes["prefill"]} if kind == "decode" else \
        {"max_new_tokens": axes["max_new_tokens"]} if kind == "greedy" else {}
    return Case(cid, kind, pins, {"input_ids": ids}, params=params, config=cfg, weights=w)


def features(axes: dict) -> dict:
    """Derived facts for the coverage report: positions past the original context, and for
    schedules the serving paths taken (chunked prefill, shared prefix, mixed decode/prefill
    batch, a decode step past 256 cached tokens)."""
    out = {}
    kind = axes["kind"]
    if kind in MODEL_KINDS:
        if kind == "schedule":
            last = max(len(t) for t in axes["request_ids"]) - 1
        else:
            last = len(axes["input_ids"][0]) - 1 + (axes.get("max_new_tokens", 1) - 1)
        out["last_position"] = last
        if axes.get("yarn"):
            out["beyond_original"] = last >= axes["original_max_position_embeddings"]
    if kind == "schedule":
        held, cached = [0] * axes["schedule"]["requests"], 0
        paths = dict.fromkeys(("chunked_prefill", "shared_prefix", "mixed_batch", "decode_past_256"), False)
        for st in axes["schedule"]["steps"]:
            if st["op"] == "share_prefix":
                paths["shared_prefix"] = True
                held[st["request"]] = st["length"]
                continue
            for _ in range(st.get("repeat", 1)):
                sizes = [n for _, n in st["batch"]]
                paths["chunked_prefill"] |= any(held[r] and n > 1 for r, n in st["batch"])
                paths["mixed_batch"] |= 1 in sizes and any(n > 1 for n in sizes)
                paths["decode_past_256"] |= sum(sizes) == 1 and cached >= 256
                for r, n in st["batch"]:
                    held[r] += n
                cached += sum(sizes)
        out.update(paths)
    return out


def off_baseline(axes: dict) -> dict:
    """The scalar axes whose value is not the baseline's given the other choices (the first
    option, or the lower bound, with every other axis as it is): what a shrunk case needs."""
    scalars = {k: v for k, v in axes.items() if not isinstance(v, (list, dict))}
    out = {}
    for k, v in scalars.items():
        if k == "kind":
            continue
        try:
            base = draw_axes(baseline_drawer({j: w for j, w in scalars.items() if j != k}),
                             (axes["kind"],))
        except Rejected:  # the other choices hold only with this value
            base = {}
        if base.get(k, object()) != v:
            out[k] = v
    return out


def describe(axes: dict) -> str:
    """One line: the kind, the input shape and every scalar axis as name=value."""
    kind = axes["kind"]
    if kind == "schedule":
        shape = "requests of " + ", ".join(str(len(t)) for t in axes["request_ids"]) + " tokens, " + \
                f"{len(axes['schedule']['steps'])} schedule steps"
    elif "input_ids" in axes:
        shape = f"{len(axes['input_ids'])} x {len(axes['input_ids'][0])} tokens"
    else:
        shape = ""
    scalars = [f"{k}={v}" for k, v in axes.items() if k != "kind" and not isinstance(v, (list, dict))]
    return f"{kind}" + (f" of {shape}" if shape else "") + ("; " + ", ".join(scalars) if scalars else "")


def schedule_text(schedule: dict) -> str:
    """A schedule in one line: f[0:5,1:1]x3 is a forward of request 0's next 5 tokens and
    request 1's next one, three times; s1<0:4 shares request 0's first 4 entries with request 1."""
    parts = []
    for st in schedule["steps"]:
        if st["op"] == "share_prefix":
            parts.append(f"s{st['request']}<{st['from']}:{st['length']}")
        else:
            parts.append("f[" + ",".join(f"{r}:{n}" for r, n in st["batch"]) + "]"
                         + (f"x{st['repeat']}" if st.get("repeat", 1) > 1 else ""))
    return " ".join(parts)


# ---------------------------------------------------------------------------------------------
# Judging one example: the golden writer, then the checker as `oracles check` runs it
# ---------------------------------------------------------------------------------------------

SCRATCH_ID = "search.example"


def write_one(path: str, axes: dict, cid: str, profiles, suite: str, doc: str, extra=None,
              describe_entry=None) -> dict:
    return write_suite(path, suite, doc, [(cid, lambda c: build(axes, c))], profiles=profiles,
                       extra=extra, describe=describe_entry)


def near_tie(path: str, entry: dict, profile: str) -> str | None:
    """The first golden routing (or greedy) decision within the profile's rounding, as one
    phrase, or None: a token whose topk_margin <= the calibrated margin_eps of its topk_idx, or
    a greedy step whose tokens_margin <= the logit_eps of tokens."""
    cid = entry["id"]
    exp = read_tensors(os.path.join(path, "cases", cid, "expected.safetensors"))
    tols = entry["tolerances"][profile]
    for name, m in exp.items():
        if name.endswith("topk_margin"):
            idx = name[: -len("topk_margin")] + "topk_idx"
            eps = tols[idx]["margin_eps"]
        elif name == "tokens_margin":
            idx, eps = "tokens", tols["tokens"]["logit_eps"]
        else:
            continue
        if m.size and float(np.min(m)) <= eps:
            return f"{idx} margin {float(np.min(m)):.2g} <= {eps:.2g}"
    return None


def beyond_ceiling(entry: dict, profile: str) -> str | None:
    """The first output whose calibrated error, times K, exceeds its metric's ceiling in this
    profile, as one phrase, or None: the profile's own rounding destroys that output (router
    scores of e^-93 in bf16), its tolerance is clamped at the ceiling, and an honest candidate
    in that precision may exceed it. Such a draw is not evidence either way."""
    for name, ent in entry["tolerances"][profile].items():
        for m, v in ent.items():
            if isinstance(v, dict) and tolerances.K * v["calibrated"] > tolerances.CEILINGS[m]:
                return f"{name} {m}"
    return None


@dataclass
class Verdict:
    """One example judged: the checker's result for its case (None when the draw was rejected
    before the candidate ran), and why the example is not evidence (None when it is)."""

    result: dict | None
    rejected: str | None = None


def judge_example(axes: dict, candidate, profile: str, scratch: str, check) -> Verdict:
    """Write the example's case (its golden calibrated for `profile`) to a scratch suite, reject
    it when its golden routing is a near-tie or an output is beyond the profile's resolution,
    else judge the candidate on it with `check` (oracles.checking.check.run_check, as `oracles
    check` runs it). A case the candidate skips is rejected with its reason."""
    d = tempfile.mkdtemp(dir=scratch)
    try:
        path = os.path.join(d, "suite")
        entry = write_one(path, axes, SCRATCH_ID, (profile,), "search-example",
                          "one drawn example")["cases"][0]
        tie = near_tie(path, entry, profile)
        if tie is not None:
            return Verdict(None, f"near-tie routing ({tie.split(' margin')[0].split('.')[-1]} "
                                 "margin within the profile's rounding)")
        over = beyond_ceiling(entry, profile)
        if over is not None:
            return Verdict(None, f"beyond the profile's resolution ({over}: calibrated error "
                                 "x K above the ceiling)")
        res = check(path, candidate, profile)["cases"][0]
    finally:
        shutil.rmtree(d, ignore_errors=True)
    return Verdict(res, res.get("reason") if res["status"] == "skip" else None)


def signature(result: dict) -> str:
    """What a divergence is, for shrinking: the first failing output with its numbers
    generalised (layers.N.topk_idx), or the status (error, missing)."""
    if result["status"] != "fail" or not result.get("first_failure"):
        return result["status"]
    return ".".join("N" if p.isdigit() else p for p in result["first_failure"].split("."))


class Divergence(Exception):
    """An example the checker failed; one subclass per signature (hypothesis tells failures
    apart by their exception type and shrinks each towards the smallest of its own)."""

    signature = ""

    def __init__(self, axes, result):
        super().__init__(f"{result.get('status')}: {result.get('reason')}")
        self.axes, self.result = axes, result


_DIVERGENCES: dict = {}


def divergence_type(sig: str):
    if sig not in _DIVERGENCES:
        _DIVERGENCES[sig] = type(f"Divergence[{sig}]", (Divergence,), {"signature": sig})
    return _DIVERGENCES[sig]


class Stuck(Exception):
    """The candidate stopped answering (a call timed out): nothing more can be run."""


# ---------------------------------------------------------------------------------------------
# The search
# ---------------------------------------------------------------------------------------------

@dataclass
class Stats:
    """What the search saw. Examples before the first divergence are the search proper; calls
    after it are hypothesis's shrinking."""

    valid: int = 0  # examples judged (PASS, FAIL, ERROR, INCONCLUSIVE) before the first divergence
    calls: int = 0  # every example built, shrinking included
    rejected: Counter = field(default_factory=Counter)  # reason -> count (near-ties, resolution, pins)
    skipped: Counter = field(default_factory=Counter)  # candidate's reason -> count
    inconclusive: int = 0
    statuses: Counter = field(default_factory=Counter)  # of the examples before the divergence
    coverage: dict = field(default_factory=dict)  # axis -> Counter of values (before the divergence)
    first_failure_at: int | None = None  # the example (1-based, among the judged) that first diverged
    first_result: dict | None = None
    shrink_calls: int = 0
    stuck: str | None = None

    def count(self, axes: dict) -> None:
        for k, v in {**axes, **features(axes)}.items():
            if not isinstance(v, (list, dict)):
                self.coverage.setdefault(k, Counter())[json.dumps(v)] += 1


def _progress_bar(enabled: bool, total: int):
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="search", unit="example", file=None)


def database_dir(root: str, label: str, profile: str, kinds, pins) -> str:
    """One example database per candidate, profile, kinds and pins (hypothesis keys its entries
    by the test function, which is the same for every candidate)."""
    key = json.dumps([label, profile, list(kinds), sorted(pins.items())], default=str)
    return os.path.join(root, hashlib.sha256(key.encode()).hexdigest()[:16])


def _hypothesis():
    try:
        import hypothesis
        from hypothesis import strategies
    except ImportError:
        raise OraclesError("oracles search needs hypothesis: pip install "
                           "'deepseek-v3-refimpl[search]'") from None
    return hypothesis, strategies


def strategy(kinds=KINDS, pins=None, on_reject=None):
    """The hypothesis strategy of examples' axes (draw_axes through hypothesis's choices); a
    draw that cannot honour the pins is rejected (`on_reject(reason)` is told why)."""
    hypothesis, st = _hypothesis()

    @st.composite
    def examples(draw):
        d = Drawer(lambda options: draw(st.sampled_from(options)),
                   lambda lo, hi: draw(st.integers(lo, hi)),
                   lambda n, lo, hi: draw(st.lists(st.integers(lo, hi), min_size=n, max_size=n)),
                   pins)
        try:
            return draw_axes(d, tuple(kinds))
        except Rejected as e:
            if on_reject is not None:
                on_reject(str(e))
            hypothesis.reject()
    return examples()


def probe_kinds(candidate, kinds, pins, profile, scratch, check) -> tuple[list, dict]:
    """-> (kinds the candidate runs, {kind: its reason} for the others): each kind's baseline
    example checked; a kind whose baseline the candidate skips is left out with its reason (a
    baseline that fails is searched: the search finds it again, at example 1)."""
    ok, declined = [], {}
    for kind in kinds:
        try:
            axes = draw_axes(baseline_drawer({**pins, "kind": kind}), (kind,))
        except Rejected as e:
            declined[kind] = f"no example fits the pins ({e})"
            continue
        v = judge_example(axes, candidate, profile, scratch, check)
        if v.result is not None and v.result["status"] == "skip":
            declined[kind] = v.rejected
        else:
            ok.append(kind)
    return ok, declined


@dataclass
class Settings:
    """The budget and the knobs of one search."""

    profile: str = "float32"
    max_examples: int = 100
    deadline: float | None = None  # seconds per example (hypothesis's deadline), None: none
    seed: int = 0
    database: str | None = None  # a directory, None: no database
    kinds: tuple = KINDS
    pins: dict = field(default_factory=dict)


def search(candidate, out: str, s: Settings, check, repro: str = "", progress: bool = False,
           date: str | None = None, record: list | None = None) -> dict:
    """Run the search against `candidate` (an AdapterCandidate) -> the report (JSON-able).
    `check(suite path, candidate, profile) -> report` judges each example: the command line
    passes oracles.checking.check.run_check (the authoring layer imports nothing of the
    checking layer; the judge is handed to it). A divergence, shrunk, is written to
    out/search-<date>/ (date: today, YYYY-MM-DD). `record`: a list that receives the axes of
    every example judged, in order (shrinking included)."""
    hypothesis, _ = _hypothesis()
    from hypothesis import HealthCheck, Phase, Verbosity, given, seed, settings
    from hypothesis.database import DirectoryBasedExampleDatabase
    from hypothesis.errors import DeadlineExceeded, Flaky, Unsatisfiable

    if s.profile not in tolerances.PROFILES:
        raise OraclesError(f"profile {s.profile!r} is not one of {', '.join(tolerances.PROFILES)}")
    if s.max_examples < 1:
        raise OraclesError(f"--max-examples {s.max_examples}: must be at least 1")
    for k in s.kinds:
        if k not in KINDS:
            raise OraclesError(f"--kinds: {k!r} is not one of {', '.join(KINDS)}")
    if "kind" in s.pins:
        if s.pins["kind"] not in s.kinds:
            raise OraclesError(f"--pin kind={s.pins['kind']}: not among the kinds searched")
        s = dataclasses.replace(s, kinds=(s.pins["kind"],))
    os.makedirs(out, exist_ok=True)
    t0 = time.perf_counter()
    scratch = tempfile.mkdtemp(prefix="oracles-search-")
    stats = Stats()
    bar = None
    try:
        kinds, declined = probe_kinds(candidate, s.kinds, s.pins, s.profile, scratch, check)
        if not kinds:
            raise OraclesError(f"{candidate.label}: runs none of the kinds searched ("
                               + "; ".join(f"{k}: {r}" for k, r in declined.items()) + ")")
        bar = _progress_bar(progress, s.max_examples)

        def rejected(why):
            stats.rejected[f"pins: {why.split(' is ')[0]}"] += 1

        def judge(axes):
            stats.calls += 1
            searching = stats.first_failure_at is None
            if not searching:
                stats.shrink_calls += 1
                if bar is not None:
                    bar.set_postfix_str(f"shrinking: {stats.shrink_calls} calls")
            if not stats.stuck:
                v = judge_example(axes, candidate, s.profile, scratch, check)
                if candidate.stuck:
                    stats.stuck = f"{candidate.stuck} (on {describe(axes)})"
            if stats.stuck:  # one place: every later call (hypothesis's replays) raises the same
                raise Stuck(stats.stuck)
            if v.rejected is not None:
                if searching:
                    (stats.skipped if v.result else stats.rejected)[v.rejected] += 1
                hypothesis.reject()
            if record is not None:
                record.append(axes)
            status = v.result["status"]
            if searching:
                stats.valid += 1
                stats.statuses[status] += 1
                stats.inconclusive += status == "inconclusive"
                stats.count(axes)
                if bar is not None:
                    bar.update(1)
            if status in ("fail", "error", "missing"):
                if searching:
                    stats.first_failure_at, stats.first_result = stats.valid, v.result
                    if bar is not None:
                        bar.set_description("search: found a divergence")
                raise divergence_type(signature(v.result))(axes, v.result)

        db = None
        if s.database is not None:
            db = DirectoryBasedExampleDatabase(database_dir(s.database, candidate.label, s.profile,
                                                            kinds, s.pins))
        # @seed first: it makes the generate phase a function of s.seed (and sets database=None);
        # the settings applied after it are the search's own, database included (module doc)
        test = settings(
            max_examples=s.max_examples, database=db, derandomize=False,
            deadline=None if s.deadline is None else datetime.timedelta(seconds=s.deadline),
            phases=(Phase.explicit, Phase.reuse, Phase.generate, Phase.shrink),
            report_multiple_bugs=False, suppress_health_check=list(HealthCheck),
            verbosity=Verbosity.quiet, print_blob=False,
        )(seed(s.seed)(given(strategy(tuple(kinds), s.pins, rejected))(judge)))
        found = problem = None
        try:
            test()
        except Divergence as e:
            found = e
        except Stuck as e:
            problem = f"the candidate stopped answering: {e}"
        except Unsatisfiable:
            problem = "no drawn example could be judged (every one rejected or skipped)"
        except DeadlineExceeded as e:
            problem = f"an example took longer than --deadline {s.deadline:g} s ({str(e).splitlines()[0]})"
        except Flaky as e:
            problem = ("the candidate's verdict on one example changed when it was run again "
                       f"(flaky): {str(e).splitlines()[0]}")
    finally:
        if bar is not None:
            bar.close()
        shutil.rmtree(scratch, ignore_errors=True)
    rep = {
        "candidate": candidate.label, "profile": s.profile, "seed": s.seed,
        "seed_machinery": "hypothesis @seed (generate phase); database replayed first when given",
        "max_examples": s.max_examples, "deadline": s.deadline,
        "database": None if db is None else str(db.path),
        "kinds": kinds, "kinds_declined": declined, "pins": s.pins,
        "examples": {"judged": stats.valid, "statuses": dict(stats.statuses),
                     "rejected": dict(stats.rejected), "skipped": dict(stats.skipped),
                     "inconclusive": stats.inconclusive, "calls": stats.calls,
                     "shrink_calls": stats.shrink_calls,
                     "to_first_failure": stats.first_failure_at},
        "coverage": {k: dict(sorted(v.items(), key=lambda kv: -kv[1])) for k, v in stats.coverage.items()},
        "divergence": None, "problem": problem, "ok": found is None and problem is None,
    }
    if found is not None:
        rep["divergence"] = _write_divergence(found, candidate, out, s, check, repro, rep, date)
    if stats.valid == 0 and problem is None and found is None:
        rep["problem"] = "no drawn example could be judged (every one rejected or skipped)"
        rep["ok"] = False
    rep["seconds"] = round(time.perf_counter() - t0, 3)
    return rep


def _suite_dir(out: str, date: str | None) -> str:
    date = date or datetime.date.today().isoformat()
    base = os.path.join(out, f"search-{date}")
    path, n = base, 1
    while os.path.lexists(path):
        n += 1
        path = f"{base}-{n}"
    return path


def _write_divergence(found: Divergence, candidate, out: str, s: Settings, check, repro: str,
                      rep: dict, date) -> dict:
    """The shrunk example as a suite of its own (every profile calibrated), checked once more
    against the candidate -> the report's divergence entry."""
    res = found.result
    name = res.get("first_failure") or res["status"]
    cid = f"search.{name}"
    path = _suite_dir(out, date)
    suite = os.path.basename(path)
    how = [repro] if repro else []
    check_cmd = " ".join(["oracles check", shlex.quote(path), *how, "--profile", s.profile])
    search_cmd = " ".join(
        ["oracles search", *how, "--profile", s.profile, "--seed", str(s.seed), "--max-examples",
         str(s.max_examples), "--out", shlex.quote(out)]
        + [f"--pin {shlex.quote(f'{k}={json.dumps(v)}')}" for k, v in s.pins.items()]
        + ([f"--kinds {','.join(s.kinds)}"] if tuple(s.kinds) != KINDS else []))
    extra = {"search": {"candidate": candidate.label, "profile": s.profile, "seed": s.seed,
                        "examples_to_first_failure": rep["examples"]["to_first_failure"],
                        "first_failure": name, "reason": res.get("reason"),
                        "repro": check_cmd, "search_command": search_cmd}}
    manifest = write_one(path, found.axes, cid, tolerances.PROFILES, suite,
                         f"a divergence oracles search found in {candidate.label} and shrank",
                         extra=extra,
                         describe_entry=lambda case: {"seed": ["oracles search", s.seed],
                                                      "drawn": found.axes})
    again = check(path, candidate, s.profile)
    r = again["cases"][0]
    return {"signature": found.signature, "case": cid, "suite": path,
            "suite_digest": again["suite_digest"], "first_failure": name,
            "status": res["status"], "reason": res.get("reason"), "axes": found.axes,
            "summary": describe(found.axes), "off_baseline": off_baseline(found.axes),
            "schedule": schedule_text(found.axes["schedule"]) if "schedule" in found.axes else None,
            "rechecked": {"status": r["status"], "first_failure": r.get("first_failure"),
                          "reason": r.get("reason")},
            "repro": check_cmd, "search_command": search_cmd, "cases": len(manifest["cases"])}


def format_report(rep: dict) -> str:
    """The text report (everything from the candidate escaped)."""
    ex = rep["examples"]
    lines = [escape(f"search: {rep['candidate']}, {rep['profile']} profile, seed {rep['seed']}, "
                    f"at most {rep['max_examples']} examples")]
    lines.append(f"kinds searched: {', '.join(rep['kinds'])}")
    for k, why in rep["kinds_declined"].items():
        lines.append(escape(f"  not searched: {k}: {why}"))
    if rep["pins"]:
        lines.append("pinned: " + ", ".join(f"{k}={json.dumps(v)}" for k, v in rep["pins"].items()))
    judged = ", ".join(f"{n} {s}" for s, n in sorted(ex["statuses"].items()))
    lines.append(f"examples judged: {ex['judged']}" + (f" ({judged})" if judged else ""))
    for why, n in sorted(ex["rejected"].items(), key=lambda kv: -kv[1]):
        lines.append(escape(f"  rejected {n}: {why}"))
    for why, n in sorted(ex["skipped"].items(), key=lambda kv: -kv[1]):
        lines.append(escape(f"  skipped by the candidate {n}: {why}"))
    lines.append("coverage (value: examples):")
    for axis, values in rep["coverage"].items():
        if len(values) > 8:
            nums = sorted(json.loads(v) for v in values)
            text = f"{nums[0]}..{nums[-1]} ({len(values)} values)"
        else:
            text = ", ".join(f"{v}: {n}" for v, n in values.items())
        lines.append(escape(f"  {axis}: {text}"))
    d = rep.get("divergence")
    if d:
        lines.append("")
        lines.append(escape(f"DIVERGENCE at example {ex['to_first_failure']}: {d['reason']}"))
        off = ", ".join(f"{k}={json.dumps(v)}" for k, v in d["off_baseline"].items()) or "none"
        lines.append(escape(f"  shrunk ({ex['shrink_calls']} shrink calls) to {d['summary'].split(';')[0]}; "
                            f"off the baseline: {off}"))
        if d.get("schedule"):
            lines.append(escape(f"  schedule: {d['schedule']}"))
        rc = d["rechecked"]
        lines.append(escape(f"  written: {d['suite']} (case {d['case']}, suite digest {d['suite_digest']}); "
                            f"checked again: {rc['status'].upper()}"
                            + (f" at {rc['first_failure']}" if rc.get("first_failure") else "")))
        lines.append(escape(f"  reproduce: {d['repro']}"))
    if rep.get("problem"):
        lines.append("")
        lines.append(escape(f"oracles: {rep['problem']}"))
    lines.append("")
    verdict = "1 divergence" if d else "no divergence"
    lines.append(escape(f"{rep['candidate']} ({rep['profile']} profile): {verdict} in {ex['judged']} "
                        f"examples, {rep['seconds']:.1f} s"))
    return "\n".join(lines)
