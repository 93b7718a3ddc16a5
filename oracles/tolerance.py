"""Tolerance profiles, derived rather than guessed.

For each case and each profile, refimpl runs the case again in that precision (emulate.py:
float32, or bf16 rounding at operator boundaries) and the error against the float64 truth is
measured with the same metrics the checker uses. The tolerance is

    tol = max(K * calibrated error, floor[profile][metric])

and both numbers are recorded in the manifest. Routing margins are calibrated the same way: the
largest router-score error times K (or twice the margin of any token the emulated run routed
differently) is the profile's rounding, and tokens whose margin is within it are forgiven.

The fp8 profile emulates FP8 weights and activations in the linear maps V3 ships in FP8, on top
of the bf16 rounding (emulate.py). The engine-mode profiles f16_kv (llama.cpp's default float16
KV cache), bf16_f32_experts (MLX-LM's bf16 on a CPU: expert GEMMs in float32) and fp8_kv (vLLM's
e4m3 KV cache on bf16) are calibrated the same way from oracles/engines/modes.py's emulation.
"""

from __future__ import annotations

import numpy as np

from . import metrics, taint as taint_mod
from .schema import output_type

K = 4.0
PROFILES = ("float32", "bf16", "fp8", "f16_kv", "bf16_f32_experts", "fp8_kv")
# profile -> emulated precision (the last three: engine modes, oracles/engines/modes.py)
CALIBRATED_BY = {p: p for p in PROFILES}

# Floors: about one operator's rounding error in that precision (unit roundoff u = 2^-24, 2^-8
# and 2^-4 for float32, bf16 and e4m3: nmse ~ a few u^2, max_rel ~ a few u), so that an output
# whose calibration saw no error (or few tokens, see Taint) still allows one rounding.
FLOORS = {
    "float32": {"nmse": 1e-11, "max_rel": 2e-5, "norm": 1e-6, "top1": 0.0, "topk": 0.02,
                "kl": 1e-9, "mismatch": 0.0, "margin_eps": 1e-6, "logit_eps": 1e-4},
    "bf16": {"nmse": 1e-4, "max_rel": 5e-2, "norm": 5e-3, "top1": 0.0, "topk": 0.1,
             "kl": 1e-3, "mismatch": 0.0, "margin_eps": 1e-2, "logit_eps": 0.25},
    "fp8": {"nmse": 5e-3, "max_rel": 0.3, "norm": 2e-2, "top1": 0.0, "topk": 0.2,
            "kl": 1e-2, "mismatch": 0.0, "margin_eps": 3e-2, "logit_eps": 0.5},
}
# Engine modes: float16's unit roundoff is 2^-11; the other two are bf16 at heart (the e4m3 cache
# of fp8_kv is one rounding on top of bf16's, as in the fp8 profile).
FLOORS["f16_kv"] = {"nmse": 1e-7, "max_rel": 2e-3, "norm": 1e-4, "top1": 0.0, "topk": 0.05,
                    "kl": 1e-6, "mismatch": 0.0, "margin_eps": 1e-3, "logit_eps": 2e-2}
FLOORS["bf16_f32_experts"] = dict(FLOORS["bf16"])
FLOORS["fp8_kv"] = dict(FLOORS["fp8"])


# Ceilings, for any profile: a suite whose tolerance (or forgiveness margin) exceeds one is refused
# (manifest.py), since at that level a wrong output passes: a zero output has nmse 1 and norm 1,
# a constant one max_rel >= 1; topk 1 and top1 1 accept any argmax. They sit several times
# above the loosest calibrated values of the shipped suites (fp8 profile: nmse 0.19, norm 0.18,
# max_rel 4.0, topk 0.8, kl 0.045, margin_eps 1.5, logit_eps 11), so a real calibration never
# meets them. Within them a suite's own calibration is trusted unless its digest is pinned.
CEILINGS = {"nmse": 0.5, "max_rel": 16.0, "norm": 0.5, "top1": 0.5, "topk": 0.9, "kl": 1.0,
            "mismatch": 0.0, "margin_eps": 8.0, "logit_eps": 64.0}


def _flipped_margin(c_idx, e_idx, margin) -> float:
    k = e_idx.shape[-1]
    differ = (np.sort(c_idx.reshape(-1, k), -1) != np.sort(e_idx.reshape(-1, k), -1)).any(-1)
    m = np.asarray(margin).reshape(-1)
    return float(m[differ].max()) if differ.any() else 0.0


def conditioned_truth(kind, params, truth: dict, aux: dict, emulated: dict, conditioner,
                      exact_ties: str = "forgiven") -> tuple[dict, list]:
    """The truth (with its margins) recomputed with every routing choice of the emulated run
    that differs from it forced (conditioned.Conditioner), and its token stream (if any)
    continued from the run's own tokens at each parting: what the checker, conditioning on that
    run, compares it against. -> (that, the logit margins at the stream's partings). Exact ties
    are not forced where the case decides them (exact_ties "decided")."""
    expected = {**truth, **aux}
    partings = []
    if "tokens" in truth and "tokens_margin" in aux and hasattr(conditioner, "restream"):
        # a stream that parts at a near-tie is compared on against the reference continued from
        # the candidate's tokens (taint._restream): the margins at its partings, as judged there
        c = np.asarray(emulated["tokens"])
        e, m = truth["tokens"], aux["tokens_margin"]
        for _ in range(taint_mod.MAX_RECOMPUTATIONS):
            differ = np.flatnonzero(c.reshape(-1) != np.asarray(e).reshape(-1))
            if not len(differ):
                break
            partings.append(float(np.asarray(m).reshape(-1)[differ[0]]))
            e, m = conditioner.restream(c.reshape(-1)[: differ[0] + 1])
        if partings:
            expected.update(tokens=e, tokens_margin=m)
            if kind == "mtp_speculation":
                conditioner.tokens = e
                expected.update({k: v for k, v in conditioner.recompute({}).items()
                                 if k in expected and k != "tokens"})
    t = taint_mod.Taint(kind, list(truth), params)
    if "tokens" in truth and "tokens_margin" in aux:  # the stream: its own cut (Taint.stream)
        v = metrics.tokens(emulated["tokens"], expected["tokens"], expected["tokens_margin"], np.inf)
        t.stream(emulated["tokens"], expected["tokens"], v["compared"])
    forced = {}
    for name, e in truth.items():
        margin = aux.get(name[: -len("topk_idx")] + "topk_margin")
        if output_type(name) != "indices" or margin is None:
            continue
        e, c = taint_mod.taint_cut(t, e), taint_mod.taint_cut(t, emulated[name])
        f = taint_mod._sets_differ(c, e)
        if exact_ties != "forgiven":
            f &= np.asarray(taint_mod.taint_cut(t, margin), np.float64).reshape(-1) > 0
        if f.any():
            forced[name] = (f.reshape(e.shape[:-1]), np.asarray(c))
    if not forced:
        return expected, partings
    return taint_mod.substitute(kind, params, expected, conditioner.recompute(forced), forced), partings


def calibrate(truth: dict, aux: dict, emulated: dict, profile: str, causal: bool = False,
              exact_ties: str = "forgiven", kind: str | None = None, params: dict | None = None,
              conditioner=None) -> dict:
    """{output name: {metric: {tol, calibrated}, (margin_eps | logit_eps): value}} for one
    profile, from the emulated run's outputs, measured exactly as the checker measures a
    candidate. With a conditioner (conditioned.Conditioner, as `oracles check` has for a case
    with a model): against the truth conditioned on the emulated run's routing, every position
    (conditioned_truth); router-score errors and the margins of the tokens it routed
    differently are measured there too. Without: positions a forgiven routing difference
    reaches left out (taint.py). exact_ties "decided": the routing outputs are marked so that
    exact ties are not forgiven. kind and params: the case's (its dataflow); without a kind,
    "prefill" when causal, else "gate"."""
    fl = FLOORS[profile]
    kind = kind or ("prefill" if causal else "gate")
    expected = {**truth, **aux}
    partings = []
    if conditioner is not None:
        expected, partings = conditioned_truth(kind, params, truth, aux, emulated, conditioner,
                                               exact_ties)
    ref = {k: expected[k] for k in truth}
    epss = {}
    for name, e in ref.items():
        c = emulated[name]
        out_kind = output_type(name)
        eps = {}
        if out_kind == "logits":
            eps["logit_eps"] = max(fl["logit_eps"], K * float(np.max(np.abs(c - e))))
        elif out_kind == "indices":
            stem = name[: -len("topk_idx")]
            ds = float(np.max(np.abs(emulated[stem + "router_scores"] - ref[stem + "router_scores"])))
            # the margins of the tokens it routed differently, as the checker judges them
            eps["margin_eps"] = max(fl["margin_eps"], K * ds,
                                    2 * _flipped_margin(c, truth[name], expected[stem + "topk_margin"]))
            if exact_ties != "forgiven":
                eps["exact_ties"] = exact_ties
        elif out_kind == "routing_weights":
            idx_entry = epss[name[: -len("topk_weight")] + "topk_idx"]
            eps.update({k: idx_entry[k] for k in ("margin_eps", "exact_ties") if k in idx_entry})
        elif out_kind == "tokens":
            margin = np.asarray(aux["tokens_margin"]).reshape(-1)
            c1, e1 = c.reshape(-1), np.asarray(truth[name]).reshape(-1)
            diff = np.nonzero(c1[: len(e1)] != e1)[0]
            first = [float(margin[diff[0]])] if len(diff) else []
            eps["logit_eps"] = max([fl["logit_eps"]] + [2 * x for x in first + partings])
        epss[name] = {k: min(v, CEILINGS[k]) if k in CEILINGS and isinstance(v, float) else v
                      for k, v in eps.items()}
    # measured as the checker measures: against the conditioned truth (every position), and
    # when there is one, also against the golden as written with what the emulated run's
    # forgiven routing differences reach left out (`oracles check --no-conditioning`, or a
    # checker without refimpl's forward pass): each tolerance covers both
    ways = [expected] + ([{**truth, **aux}] if expected is not None and conditioner is not None else [])
    measured = []
    for exp in ways:
        taint = taint_mod.Taint(kind, list(truth), params)
        taint_mod.collect(taint, [(n, output_type(n)) for n in truth], exp, emulated, epss)
        per = {}
        for name in truth:
            out_kind = output_type(name)
            c_idx = emulated[name[: -len("topk_weight")] + "topk_idx"] if out_kind == "routing_weights" else None
            per[name] = metrics.compare(name, out_kind, emulated[name], exp[name], exp, epss[name],
                                        taint, c_idx)
        measured.append(per)
    result = {}
    for name in truth:
        names = measured[0][name][1]
        # nothing compared (every token downstream of a flip): no error seen, the floor applies
        worst = {m: max(per[name][0].get(m, 0.0) for per in measured) for m in names}
        # A tolerance never exceeds its ceiling (CEILINGS: what a received suite may hold): where
        # the profile's own rounding nearly destroys an output (router scores of e^-93 in bf16,
        # gate.logits_below_88) it is clamped there, and the emulated run still has to pass it.
        entry = {m: {"tol": min(max(K * worst[m], fl[m]), CEILINGS[m]) if m != "mismatch" else 0.0,
                     "calibrated": worst[m]} for m in names}
        entry.update(epss[name])
        result[name] = entry
    return result
