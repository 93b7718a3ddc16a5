"""Calibrating a case's tolerances (the rule and constants: oracles.format.tolerances): the
emulated run's error against the float64 truth, measured exactly as the checker measures a
candidate (against the truth conditioned on the emulated run's routing, oracles.authoring.
conditioned, and with what its forgiven routing differences reach left out), times K, floored
and capped per profile (tolerances.rule: the norm tolerance is also at least the run's own
error length, sqrt of its nmse).
"""

from __future__ import annotations

import numpy as np

from ..format import metrics
from ..format import taint as taint_mod
from ..format.schema import output_type
from ..format.tolerances import CEILINGS, FLOORS, K, rule


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


def _rows(taint, name: str, a, lead: int):
    """The token rows of `a` [*token axes (lead of them), ...] that the checker compares at
    output `name`: past the stream cut (a stream that went another way) and what the run's own
    forgiven routing differences reach (taint.py) left out, exactly as metrics.compare leaves
    them out of a candidate's."""
    a = taint_mod.taint_cut(taint, np.asarray(a))
    return taint.select(a, name, min(lead, a.ndim))


def _dataflow_order(taint, names):
    def order(n):
        v = taint.layout.nodes.get(n)
        return (v.block, v.chain) if v is not None else ((taint_mod.UNKNOWN, 0), 0)
    return sorted(names, key=order)


def calibrate(truth: dict, aux: dict, emulated: dict, profile: str, causal: bool = False,
              exact_ties: str = "forgiven", kind: str | None = None, params: dict | None = None,
              conditioner=None) -> dict:
    """{output name: {metric: {tol, calibrated}, (margin_eps | logit_eps): value}} for one
    profile, from the emulated run's outputs, measured exactly as the checker measures a
    candidate (taint.settle, check.compare). With a conditioner (conditioned.Conditioner, as
    `oracles check` has for a case with a model): against the truth conditioned on the emulated
    run's routing and stream, every position, and also against the golden as written with what
    the run's forgiven routing differences reach left out (`oracles check --no-conditioning`,
    or a checker without refimpl's forward pass); each tolerance covers both. Without: only
    the latter. The router's rounding (a routing output's margin_eps) is measured where the
    checker compares: against the conditioned truth, and in the golden as written only at
    the positions no earlier forgiven difference of the run reaches (another expert's output
    there is not rounding). exact_ties "decided": the routing outputs are marked so that exact
    ties are not forgiven. kind and params: the case's (its dataflow); without a kind,
    "prefill" when causal, else "gate"."""
    fl = FLOORS[profile]
    kind = kind or ("prefill" if causal else "gate")
    outputs = [(n, output_type(n)) for n in truth]
    plain = {**truth, **aux}
    # the conditioner's stream is the truth's for every profile (a restream moves it)
    stream = getattr(conditioner, "tokens", None)
    expected, partings = plain, []
    if conditioner is not None:
        expected, partings = conditioned_truth(kind, params, truth, aux, emulated, conditioner,
                                               exact_ties)
        conditioner.tokens = stream
    ways = [expected] + ([plain] if expected is not plain else [])
    epss = {}
    routing = [n for n, t in outputs if t == "indices"]
    probe = taint_mod.Taint(kind, list(truth), params)
    for name in _dataflow_order(probe, routing):  # each after the routing outputs before it
        stem = name[: -len("topk_idx")]
        e = np.asarray(truth[name])
        lead = e.ndim - 1
        ds = flipped = 0.0
        for exp in ways:
            # what this way's checker leaves out at this layer: the stream cut and the reach of
            # the run's forgiven differences at the routing outputs before it
            t = taint_mod.Taint(kind, list(truth), params)
            taint_mod.collect(t, outputs, exp, emulated, epss)
            rs_c, rs_e = (_rows(t, stem + "router_scores", a[stem + "router_scores"], lead)
                          for a in (emulated, exp))
            if rs_e.size and rs_c.shape == rs_e.shape:
                ds = max(ds, float(np.max(np.abs(rs_c - rs_e))))
            m = exp.get(stem + "topk_margin")
            if m is None or not np.size(m):
                continue
            c, m = _rows(t, name, emulated[name], lead), _rows(t, name, m, lead)
            # the margins of the tokens it routed differently, as the checker judges them: in
            # the conditioned truth, those forced (they differ from the truth as written) and
            # any that still differ from the conditioned choice
            differ = taint_mod._sets_differ(c, _rows(t, name, exp[name], lead))
            if exp is not plain:
                differ |= taint_mod._sets_differ(c, _rows(t, name, e, lead))
            mm = np.asarray(m, np.float64).reshape(-1)
            if differ.any():
                flipped = max(flipped, float(mm[differ].max()))
        eps = {"margin_eps": min(max(fl["margin_eps"], K * ds, 2 * flipped), CEILINGS["margin_eps"])}
        if exact_ties != "forgiven":
            eps["exact_ties"] = exact_ties
        epss[name] = eps
    for name, out_kind in outputs:
        c = emulated[name]
        eps = {}
        if out_kind == "logits":
            eps["logit_eps"] = max(fl["logit_eps"], K * float(np.max(np.abs(c - expected[name]))))
        elif out_kind == "routing_weights":
            idx_entry = epss.get(name[: -len("topk_weight")] + "topk_idx", {})
            eps.update({k: idx_entry[k] for k in ("margin_eps", "exact_ties") if k in idx_entry})
        elif out_kind == "tokens":
            margin = np.asarray(aux["tokens_margin"]).reshape(-1)
            c1, e1 = c.reshape(-1), np.asarray(truth[name]).reshape(-1)
            diff = np.nonzero(c1[: len(e1)] != e1)[0]
            first = [float(margin[diff[0]])] if len(diff) else []
            eps["logit_eps"] = max([fl["logit_eps"]] + [2 * x for x in first + partings])
        if out_kind != "indices":
            epss[name] = {k: min(v, CEILINGS[k]) if k in CEILINGS and isinstance(v, float) else v
                          for k, v in eps.items()}
    # measured as the checker measures (taint.settle, then metrics.compare per output): with
    # the conditioner (every position, against the reference recomputed on the run's routing and
    # stream) and without it; each tolerance covers both
    scored = [n for n, t in outputs if t in ("logits", "continuous")]
    measured = []
    for cond in ([conditioner, None] if conditioner is not None else [None]):
        settled = taint_mod.settle(kind, outputs, plain, emulated, epss, params,
                                   conditioner=cond, scored=scored)
        if cond is not None:
            cond.tokens = stream
        exp, taint = settled.expected, settled.taint
        per = {}
        for name, out_kind in outputs:
            c_idx = (emulated[name[: -len("topk_weight")] + "topk_idx"]
                     if out_kind == "routing_weights" else None)
            per[name] = metrics.compare(name, out_kind, emulated[name], exp[name], exp, epss[name],
                                        taint, c_idx)
        measured.append(per)
    result = {}
    for name, _ in outputs:
        names = measured[0][name][1]
        # nothing compared (every token downstream of a flip): no error seen, the floor applies
        worst = {m: max(per[name][0].get(m, 0.0) for per in measured) for m in names}
        # A tolerance never exceeds its ceiling (CEILINGS: what a received suite may hold): where
        # the profile's own rounding nearly destroys an output (router scores of e^-93 in bf16,
        # gate.logits_below_88) it is clamped there, and the emulated run still has to pass it.
        # tolerances.rule: max(K x error, floor), and for norm the error's own length too
        entry = {m: {"tol": min(rule(m, worst[m], fl[m], worst.get("nmse", 0.0)), CEILINGS[m]),
                     "calibrated": worst[m]} for m in names}
        entry.update(epss[name])
        seen = [per[name][0] for per in measured if "compared" in per[name][0]]
        best = max(seen, key=lambda v: v["compared"], default=None)
        if best is not None and best["compared"] < best["positions"]:
            # no way of checking saw every position (the rest follow the emulated run's own
            # forgiven flips, or a stream that went another way): a smaller sample than the case's
            entry["calibration_compared"] = f"{best['compared']} of {best['positions']}"
        result[name] = entry
    return result
