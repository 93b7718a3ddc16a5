"""A catalogue of mutants: each one a bug that public DeepSeek-V3 implementations shipped
(SPEC.md section 9), made by patching ONE refimpl function for the duration of a run.

They serve twice: tests show the default suite fails every mutant and names the right first
intermediate (tests/oracles/test_mutants.py), and the conventions suite uses the ones that are
a published alternative (YaRN only when extended, 0-masked groups, bf16 gate) to label which
convention an engine follows.

Each mutant is also a candidate: `oracles check GOLDEN --adapter oracles.mutants:zero_group_mask`.
`ties_higher_index` is not a bug but an allowed alternative (`allowed=True`: torch.topk leaves
the order of ties unspecified): the default suite passes it and the conventions suite labels it.

Adding one: a function (case) -> context manager, registered with its SPEC.md topic and the bug
in one line, usually replacing one function of a refimpl module (the module attribute the math
looks up, e.g. moe.group_mask, rope.softmax_scale) through `patched`:

    @_register("my_bug", "spec topic", "what the buggy implementation does")
    def _patch_my_bug(case):
        return patched([(moe, "routing_weights", my_buggy_routing_weights)])

A run applies it as `emulate.run_case(case, precision, MUTANTS["my_bug"])`; replacements that
produce an operator's output should pass it through `ops.boundary`, like the function they
replace, so that the bf16 and fp8 runs round it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from dataclasses import dataclass
from typing import Callable

import ml_dtypes
import numpy as np

from refimpl import mla, moe, mtp, rope
from refimpl.backend import array_module
from refimpl.ops import boundary, topk_indices

from .adapters import RefimplAdapter
from .emulate import patched


@dataclass(frozen=True)
class Mutant:
    name: str
    spec_topic: str  # the SPEC.md section 9 row
    bug: str  # what the buggy implementation does
    patch: Callable  # (case) -> context manager
    allowed: bool = False  # not a bug: an alternative the checker accepts (the default suite passes)


MUTANTS: dict[str, Mutant] = {}


def _register(name, topic, bug, allowed=False):
    def deco(fn):
        MUTANTS[name] = Mutant(name, topic, bug, fn, allowed)
        return fn
    return deco


def extent(case) -> int:
    """How many positions the run spans: DeepSeek's model.py compares its runtime max_seq_len
    with original_max_position_embeddings; the smallest such setting that fits the case."""
    inp, p = case.inputs, case.params
    if case.kind in ("prefill", "decode", "mtp_prefill", "mtp_module"):
        return inp["input_ids"].shape[1]
    if case.kind in ("greedy", "speculative"):
        return inp["input_ids"].shape[1] + p["max_new_tokens"]
    if case.kind in ("yarn_tables", "rope_apply"):
        return int(np.max(inp["positions"])) + 1
    if case.kind == "mla":
        return inp["x"].shape[1]
    if case.kind == "mla_decode":
        return inp["cache_c_kv"].shape[1] + 1
    return 0


# ---- routing ----------------------------------------------------------------------------------

@_register("zero_group_mask", "expert-group mask",
           "masks experts of dropped groups with 0.0 instead of -inf: wrong picks when s + b < 0")
def _patch_zero_group_mask(case):
    return patched([(moe, "group_mask", functools.partial(moe.group_mask, fill=0.0))])


@_register("bias_in_weights", "bias in weights",
           "uses the biased scores s + b as routing weights")
def _patch_bias_in_weights(case):
    original_route = moe.route

    def route(u, gate_weight, bias, cfg):
        s, idx, _ = original_route(u, gate_weight, bias, cfg)
        biased = s if (bias is None or not cfg.uses_bias) else s + bias.astype(s.dtype)
        return s, idx, moe.routing_weights(biased, idx, cfg.norm_topk_prob, cfg.routed_scaling_factor)
    return patched([(moe, "route", route)])


@_register("group_score_max", "group score",
           "scores a group by its best expert (V2 style) instead of the sum of its top two")
def _patch_group_score_max(case):
    return patched([(moe, "group_scores", lambda biased, n_group, method:
                     biased.reshape(biased.shape[0], n_group, -1).max(axis=-1))])


def _bf16(x):
    return np.asarray(x).astype(ml_dtypes.bfloat16).astype(np.asarray(x).dtype)


@_register("bf16_gate_bias", "gate precision",
           "casts e_score_correction_bias to bf16 when loading")
def _patch_bf16_gate_bias(case):
    original = moe.select_experts

    def select(scores, bias, *a):
        return original(scores, None if bias is None else _bf16(bias), *a)
    return patched([(moe, "select_experts", select)])


@_register("bf16_gate", "gate precision",
           "runs the whole gate in bf16 (DeepSeek's model.py): inputs, gate weight, bias and "
           "scores rounded to bf16")
def _patch_bf16_gate(case):
    original_scores, original_select = moe.router_scores, moe.select_experts

    def scores(u, w, func):
        return _bf16(original_scores(_bf16(u), _bf16(w), func))

    def select(s, bias, *a):
        return original_select(s, None if bias is None else _bf16(bias), *a)
    return patched([(moe, "router_scores", scores), (moe, "select_experts", select)])


def _topk_higher_index(x, k: int):
    """The k largest along the last axis, largest first, ties to the HIGHER index."""
    return x.shape[-1] - 1 - topk_indices(x[..., ::-1], k)


@_register("ties_higher_index", "top-k ties",
           "breaks exact ties between groups or experts by the higher index (torch.topk leaves "
           "the order unspecified)", allowed=True)
def _patch_ties_higher_index(case):
    return patched([(moe, "topk_indices", _topk_higher_index)])


# ---- RoPE / YaRN ------------------------------------------------------------------------------

@_register("no_softmax_mscale", "mscale",
           "leaves out YaRN's m(s, mscale_all_dim)^2 factor on the softmax scale")
def _patch_no_softmax_mscale(case):
    return patched([(rope, "softmax_scale", lambda cfg: cfg.qk_head_dim ** -0.5)])


@_register("mscale_not_all_dim", "mscale",
           "scales the softmax by m(s, mscale)^2 where m(s, mscale_all_dim)^2 belongs")
def _patch_mscale_not_all_dim(case):
    def scale(cfg):
        rs = cfg.rope_scaling
        s = cfg.qk_head_dim ** -0.5
        return s if rs is None else s * rope.yarn_mscale(rs.factor, rs.mscale) ** 2
    return patched([(rope, "softmax_scale", scale)])


def _apply_rope_halves(x, cos, sin):
    """The bug: rotates (x_i, x_{i + d/2}) (rotate-half) on weights laid out in adjacent pairs."""
    xp = array_module(x)
    c, s = rope.pair_tables(x, cos, sin)
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    return boundary(xp.concatenate([a * c - b * s, a * s + b * c], axis=-1))


@_register("rotate_half_rope", "rope layout",
           "applies rotate-half RoPE to the checkpoint's interleaved (adjacent-pair) weights")
def _patch_rotate_half_rope(case):
    return patched([(rope, "apply_rope", _apply_rope_halves), (mla, "apply_rope", _apply_rope_halves)])


@_register("yarn_only_when_extended", "YaRN activation",
           "applies YaRN (frequencies and softmax factor) only when the run's length exceeds "
           "original_max_position_embeddings (DeepSeek's model.py)")
def _patch_yarn_only_when_extended(case):
    rs = case.config.rope_scaling if case.config is not None else None
    if rs is None or extent(case) > rs.original_max_position_embeddings:
        return contextlib.nullcontext()
    plain = {name: getattr(rope, name) for name in ("inv_freq", "softmax_scale", "cos_sin_factor")}
    return patched([(rope, name, (lambda f: lambda cfg: f(cfg.replace(rope_scaling=None)))(f))
                    for name, f in plain.items()])


# ---- MTP --------------------------------------------------------------------------------------

def _mtp_convention(**change):
    return patched([(mtp, "DEFAULT", dataclasses.replace(mtp.DEFAULT, **change))])


_register("mtp_concat_swapped", "MTP concat",
          "feeds eh_proj [hnorm(h) ; enorm(Emb)], eq. (21) as printed, to weights trained "
          "embedding first")(lambda case: _mtp_convention(concat="hidden_first"))
_register("mtp_pre_norm_h0", "MTP h0",
          "feeds module 1 the last decoder layer's output before the final norm")(
    lambda case: _mtp_convention(h0="pre_norm"))


# ---- candidates -------------------------------------------------------------------------------

def _factory(name):
    def factory():
        return RefimplAdapter(precision="float32", mutant=MUTANTS[name])
    factory.__name__ = name
    what = "one allowed alternative" if MUTANTS[name].allowed else "one bug"
    factory.__doc__ = f"refimpl in float32 with {what}: {MUTANTS[name].bug}"
    return factory


def __getattr__(name):  # `--adapter oracles.mutants:zero_group_mask`
    if name in MUTANTS:
        return _factory(name)
    raise AttributeError(name)

