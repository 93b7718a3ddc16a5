"""Tolerance profiles, derived rather than guessed.

For each case and each profile, refimpl runs the case again in that precision (emulate.py:
float32, or bf16 rounding at operator boundaries) and the error against the float64 truth is
measured with the same metrics the checker uses. The tolerance is

    tol = max(K * calibrated error, floor[profile][metric])

and both numbers are recorded in the manifest. Routing margins are calibrated the same way: the
largest router-score error times K (or twice the margin of any token the emulated run routed
differently) is the profile's rounding, and tokens whose margin is within it are forgiven.

The fp8 profile (FP8 weights and activations) is calibrated once refimpl has activation
quantisation; until then `--profile fp8` is refused with that reason.
"""

from __future__ import annotations

import numpy as np

from . import metrics
from .cases import output_type

K = 4.0
PROFILES = ("float32", "bf16")
CALIBRATED_BY = {"float32": "float32", "bf16": "bf16"}  # profile -> emulated precision

FLOORS = {
    "float32": {"nmse": 1e-11, "max_rel": 2e-5, "norm": 1e-6, "top1": 0.0, "topk": 0.02,
                "kl": 1e-9, "mismatch": 0.0, "margin_eps": 1e-6, "logit_eps": 1e-4},
    "bf16": {"nmse": 1e-4, "max_rel": 5e-2, "norm": 5e-3, "top1": 0.0, "topk": 0.1,
             "kl": 1e-3, "mismatch": 0.0, "margin_eps": 1e-2, "logit_eps": 0.25},
}


def _tol(profile, measured: dict) -> dict:
    fl = FLOORS[profile]
    return {m: {"tol": max(K * v, fl[m]), "calibrated": v} for m, v in measured.items()
            if m in fl}


def _flipped_margin(c_idx, e_idx, margin) -> float:
    k = e_idx.shape[-1]
    differ = (np.sort(c_idx.reshape(-1, k), -1) != np.sort(e_idx.reshape(-1, k), -1)).any(-1)
    m = np.asarray(margin).reshape(-1)
    return float(m[differ].max()) if differ.any() else 0.0


def calibrate(truth: dict, aux: dict, emulated: dict, profile: str) -> dict:
    """{output name: {metric: {tol, calibrated}, (margin_eps | logit_eps): value}} for one
    profile, from the emulated run's outputs."""
    fl = FLOORS[profile]
    result = {}
    for name, e in truth.items():
        c = emulated[name]
        kind = output_type(name)
        if kind == "continuous":
            result[name] = _tol(profile, metrics.continuous(c, e))
        elif kind == "logits":
            eps = max(fl["logit_eps"], K * float(np.max(np.abs(c - e))))
            entry = _tol(profile, metrics.logits(c, e, eps))
            entry["logit_eps"] = eps
            result[name] = entry
        elif kind == "indices":
            scores = name[: -len("topk_idx")] + "router_scores"
            margin = aux[name[: -len("topk_idx")] + "topk_margin"]
            ds = float(np.max(np.abs(emulated[scores] - truth[scores])))
            eps = max(fl["margin_eps"], K * ds, 2 * _flipped_margin(c, e, margin))
            entry = {"mismatch": {"tol": 0.0, "calibrated": metrics.indices(c, e, margin, eps)["mismatch"]},
                     "margin_eps": eps}
            result[name] = entry
        elif kind == "routing_weights":
            idx = name[: -len("topk_weight")] + "topk_idx"
            eps = result[idx]["margin_eps"]
            margin = aux[name[: -len("topk_weight")] + "topk_margin"]
            n_exp = truth[name[: -len("topk_weight")] + "router_scores"].shape[-1]
            # the emulated run's own picks, forgiven tokens left out
            m = metrics.routing_weights(emulated[idx], c, truth[idx], e, n_exp, margin, eps)
            entry = _tol(profile, m)
            entry["margin_eps"] = eps
            result[name] = entry
        elif kind == "tokens":
            margin = np.asarray(aux["tokens_margin"]).reshape(-1)
            c1, e1 = c.reshape(-1), e.reshape(-1)
            diff = np.nonzero(c1[: len(e1)] != e1)[0]
            eps = max(fl["logit_eps"], 2 * float(margin[diff[0]]) if len(diff) else 0.0)
            result[name] = {"mismatch": {"tol": 0.0, "calibrated": float(len(diff) > 0)},
                            "logit_eps": eps}
    return result
