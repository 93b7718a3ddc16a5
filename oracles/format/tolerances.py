"""Tolerance profiles, derived rather than guessed: the constants a suite's tolerances are made
with and checked against (the calibration itself is oracles.authoring.calibration).

For each case and each profile, refimpl runs the case again in that precision (emulate.py:
float32, or bf16 rounding at operator boundaries) and the error against the float64 truth is
measured with the same metrics the checker uses. The tolerance is

    tol = max(K * calibrated error, floor[profile][metric])

and both numbers are recorded in the manifest; the `norm` metric's tolerance is also at least the
length of the emulated run's own error, sqrt(calibrated nmse) (`rule`). Routing margins are
calibrated the same way: the largest router-score error times K (or twice the margin of any token
the emulated run routed differently) is the profile's rounding, and tokens whose margin is within
it are forgiven.

The fp8 profile emulates FP8 weights and activations in the linear maps V3 ships in FP8, on top
of the bf16 rounding (emulate.py). The engine-mode profiles f16_kv (llama.cpp's default float16
KV cache), bf16_f32_experts (MLX-LM's bf16 on a CPU: expert GEMMs in float32) and fp8_kv (vLLM's
e4m3 KV cache on bf16) are calibrated the same way from oracles/authoring/modes.py's emulation.
"""

from __future__ import annotations

K = 4.0
PROFILES = ("float32", "bf16", "fp8", "f16_kv", "bf16_f32_experts", "fp8_kv")
# profile -> emulated precision (the last three: engine modes, oracles/authoring/modes.py)
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


# How the tolerances are made, as a manifest records it (part of what a suite asks: its question
# digest covers it, oracles.format.digest)
RULE = (f"tol = max({K:g} x calibrated error, floor); for norm at least sqrt(calibrated nmse), "
        "the length of the emulated run's own error")


def rule(metric: str, calibrated: float, floor: float, nmse_calibrated: float = 0.0) -> float:
    """The loosest tolerance a calibration may give: max(K x calibrated, floor), and for `norm`
    at least sqrt(nmse_calibrated), the emulated run's own error length relative to the output.

    Why norm differs: norm = | ||c|| / ||e|| - 1 | is the projection of the error c - e on the
    expected output, so | ||c|| - ||e|| | <= ||c - e|| bounds it by sqrt(nmse), and one rounded
    run measures one projection, which may be near 0 however long its error (refimpl's bf16
    emulation of model.prefill.one_token: norm 0.00013 at layers.2.ffn_out for an error of length
    0.0129). Another honest run rounding elsewhere (transformers in bf16: 0.00507 there) projects
    an error of the same size another way. Measured on the default suite (2026-12-03, docs/
    conformance.md section 3): transformers' bf16 norm errors reach at most 0.53 of the
    emulation's sqrt(nmse), while more than a tenth of them exceed K x the emulation's own norm
    error (the floor kept all but that one inside). For a pure scale error s (nmse s^2, norm s)
    the nmse tolerance K x nmse_calibrated lets s reach sqrt(K) = 2 times this bound: the norm
    metric stays the stricter one for a wrong scale. mismatch is exact (0)."""
    if metric == "mismatch":
        return 0.0
    tol = max(K * calibrated, floor)
    return max(tol, nmse_calibrated ** 0.5) if metric == "norm" else tol
