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


def _compared(taint, a, lead: int):
    """The token rows of `a` [*token axes (lead of them), ...] that the checker compares at this
    point of the dataflow: the stream cut (a speculation case whose emulated stream went
    another way) and the tokens downstream of the emulated run's own forgiven routing
    differences left out, exactly as metrics.compare leaves them out of a candidate's."""
    a = np.asarray(a)
    if taint.stream_cut and a.ndim >= 2 and lead >= 2:
        a = a[:, : max(a.shape[1] - taint.stream_cut, 0)]
    return taint.select(a, lead)


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
            # The router's rounding, measured where the checker compares: positions downstream
            # of the emulated run's own forgiven flips (or past its stream cut) carry another
            # expert's output, not rounding (they made layer 2's bf16 margin 0.7-1.6 in the
            # scenario suite, 3.3 in the speculation cases).
            stem = name[: -len("topk_idx")]
            lead = e.ndim - 1
            rs_c, rs_e = (_compared(taint, a[stem + "router_scores"], lead) for a in (emulated, truth))
            ds = float(np.max(np.abs(rs_c - rs_e))) if rs_e.size else 0.0
            m = aux[stem + "topk_margin"]
            flipped = _flipped_margin(_compared(taint, c, lead), _compared(taint, e, lead),
                                      _compared(taint, m, lead)) if np.size(m) else 0.0
            eps["margin_eps"] = max(fl["margin_eps"], K * ds, 2 * flipped)
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
        if "compared" in vals and vals["compared"] < vals["positions"]:
            # the calibration saw only these positions (the rest follow the emulated run's own
            # forgiven flips): its error is a smaller sample than the case's
            entry["calibration_compared"] = f"{vals['compared']} of {vals['positions']}"
        result[name] = entry
    return result
