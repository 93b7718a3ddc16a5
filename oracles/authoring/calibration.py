"""Calibrating a case's tolerances (the rule and constants: oracles.format.tolerances): the
emulated run's error against the float64 truth, measured exactly as the checker measures a
candidate, times K, floored and capped per profile.
"""

from __future__ import annotations

import numpy as np

from ..format import metrics
from ..format.schema import output_type
from ..format.tolerances import CEILINGS, FLOORS, K


def _flipped_margin(c_idx, e_idx, margin) -> float:
    k = e_idx.shape[-1]
    differ = (np.sort(c_idx.reshape(-1, k), -1) != np.sort(e_idx.reshape(-1, k), -1)).any(-1)
    m = np.asarray(margin).reshape(-1)
    return float(m[differ].max()) if differ.any() else 0.0


def calibrate(truth: dict, aux: dict, emulated: dict, profile: str, causal: bool = False,
              exact_ties: str = "forgiven") -> dict:
    """{output name: {metric: {tol, calibrated}, (margin_eps | logit_eps): value}} for one
    profile, from the emulated run's outputs, measured exactly as the checker measures a
    candidate (tokens downstream of a forgiven routing difference left out). exact_ties
    "decided": the routing outputs are marked so that exact ties are not forgiven."""
    fl = FLOORS[profile]
    expected = {**truth, **aux}
    taint = metrics.Taint(causal)
    result = {}
    for name, e in truth.items():
        c = emulated[name]
        kind = output_type(name)
        eps = {}
        c_idx = None
        if kind == "logits":
            eps["logit_eps"] = max(fl["logit_eps"], K * float(np.max(np.abs(c - e))))
        elif kind == "indices":
            stem = name[: -len("topk_idx")]
            ds = float(np.max(np.abs(emulated[stem + "router_scores"] - truth[stem + "router_scores"])))
            eps["margin_eps"] = max(fl["margin_eps"], K * ds,
                                    2 * _flipped_margin(c, e, aux[stem + "topk_margin"]))
            if exact_ties != "forgiven":
                eps["exact_ties"] = exact_ties
        elif kind == "routing_weights":
            idx_entry = result[name[: -len("topk_weight")] + "topk_idx"]
            eps.update({k: idx_entry[k] for k in ("margin_eps", "exact_ties") if k in idx_entry})
            c_idx = emulated[name[: -len("topk_weight")] + "topk_idx"]
        elif kind == "tokens":
            margin = np.asarray(aux["tokens_margin"]).reshape(-1)
            c1, e1 = c.reshape(-1), e.reshape(-1)
            diff = np.nonzero(c1[: len(e1)] != e1)[0]
            eps["logit_eps"] = max(fl["logit_eps"], 2 * float(margin[diff[0]]) if len(diff) else 0.0)
        vals, names = metrics.compare(name, kind, c, e, expected, eps, taint, c_idx)
        # nothing compared (every token downstream of a flip): no error seen, the floor applies
        # A tolerance never exceeds its ceiling (CEILINGS: what a received suite may hold): where
        # the profile's own rounding nearly destroys an output (router scores of e^-93 in bf16,
        # gate.logits_below_88) it is clamped there, and the emulated run still has to pass it.
        entry = {m: {"tol": min(max(K * vals.get(m, 0.0), fl[m]), CEILINGS[m])
                     if m != "mismatch" else 0.0,
                     "calibrated": vals.get(m, 0.0)} for m in names}
        entry.update({k: min(v, CEILINGS[k]) if k in CEILINGS and isinstance(v, float) else v
                      for k, v in eps.items()})
        result[name] = entry
    return result
