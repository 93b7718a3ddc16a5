"""Calibrating a case's tolerances (the rule and constants: oracles.format.tolerances): the
emulated run's error against the float64 truth, measured exactly as the checker measures a
candidate (against the truth conditioned on the emulated run's routing, oracles.authoring.
conditioned, and with what its forgiven routing differences reach left out), times K, floored
and capped per profile.
"""

from __future__ import annotations

import numpy as np

from ..format import metrics
from ..format import taint as taint_mod
from ..format.schema import output_type
from ..format.tolerances import CEILINGS, FLOORS, K


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
            c_idx = (emulated[name[: -len("topk_weight")] + "topk_idx"]
                     if out_kind == "routing_weights" else None)
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
