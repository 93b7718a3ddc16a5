"""Which tolerance profile emulates the mode an engine ran in, and how another profile relates
to it (docs/conformance.md section 4).

A profile is calibrated from refimpl run in one precision (tolerance.py, emulate.py,
engines/modes.py). A verdict belongs to the profile of the mode that ran: a stricter profile
(float32 for a bf16 run) fails on precision alone, a looser one forgives more noise than the run
had. A profile that emulates FP8 weights (`fp8`) or an FP8 KV cache (`fp8_kv`) is refused for a
run that had neither unless asked for (`--any-profile`), and then labelled as not that run's
verdict.

`choose` is the one choice of `oracles check`, `oracles search` and the pytest plugin: the
profile asked for, else the mode's, else float32, refused as above.
"""

from __future__ import annotations

from .. import OraclesError
from .tolerances import PROFILES

# the profiles that emulate FP8 weights (FP8 GEMMs in the linear maps V3 ships in FP8) and an FP8
# KV cache (tolerances.py, engines' modes)
FP8_WEIGHTS = ("fp8",)
FP8_KV = ("fp8_kv",)
# how much rounding each profile forgives, in order (equal: another mode of the same precision)
NOISE = {"float32": 0, "f16_kv": 1, "bf16": 2, "bf16_f32_experts": 2, "fp8_kv": 3, "fp8": 4}


def mode_of(engine: str, options: dict) -> str | None:
    """The profile that emulates an engine run with these options, or None when no profile does
    (say, float16 weights and activations)."""
    dtype = options.get("dtype", "float32")
    kv = str(options.get("kv_cache_dtype", "auto"))
    if engine in ("transformers", "mlx", "vllm"):
        if kv.startswith("fp8"):
            return "fp8_kv" if dtype == "bfloat16" else None
        if dtype == "float32":
            return "float32"
        if dtype == "bfloat16":
            if engine == "mlx" and options.get("expert_dtype") == "float32":
                return "bf16_f32_experts"
            return "bf16"
        return None
    if engine == "llama.cpp":
        if dtype == "float32":
            return {"f32": "float32", "f16": "f16_kv"}.get(kv)
        if dtype == "bfloat16" and kv == "bf16":  # bf16 GGUF weights and KV cache: the bf16
            return "bf16"  # profile (its activations are rounded too: the closest, not stricter)
        return None
    return None


def refused(profile: str, mode: str | None) -> str | None:
    """Why `profile` cannot be the verdict of a run in `mode` (it emulates FP8 weights or an FP8
    KV cache the run did not have), or None. An unknown mode refuses nothing."""
    if mode is None or profile == mode:
        return None
    if profile in FP8_WEIGHTS and mode not in FP8_WEIGHTS:
        return (f"the {profile} profile emulates FP8 weights, which this run (mode {mode}) did "
                "not have")
    if profile in FP8_KV and mode not in FP8_KV:
        return (f"the {profile} profile emulates an FP8 KV cache, which this run (mode {mode}) "
                "did not have")
    return None


def relation(profile: str, mode: str | None) -> str | None:
    """One sentence placing the profile against the run's mode, or None when the mode is
    unknown (a directory without engine.json, an adapter that does not say)."""
    if mode is None:
        return None
    if profile == mode:
        return f"the {profile} profile emulates this run's mode"
    if mode not in NOISE:
        return f"no profile emulates this run's mode ({mode}); the {profile} profile judges it"
    why = refused(profile, mode)
    if why:
        return f"LOOSER than this run's mode ({mode}): {why}; not this run's verdict"
    if NOISE[profile] < NOISE[mode]:
        return (f"STRICTER than this run's mode ({mode}): a failure may be the run's precision, "
                f"not a bug; its verdict is the {mode} profile's")
    if NOISE[profile] > NOISE[mode]:
        return (f"LOOSER than this run's mode ({mode}): it forgives more rounding than the run "
                f"had; its verdict is the {mode} profile's")
    return (f"another mode of the same precision than this run's ({mode}); its verdict is the "
            f"{mode} profile's")


def choose(given: str | None, mode: str | None, any_profile: bool = False,
           flag: str = "--profile", any_flag: str | None = "--any-profile") -> str:
    """The profile a run in `mode` (None: not known) is judged by: `given` if asked for, else
    the one that emulates the mode, else float32. An unknown profile, or one emulating FP8
    weights or an FP8 KV cache the run did not have (unless any_profile), is an OraclesError
    naming `flag` (the option that asked for it) and `any_flag` (the one that allows it; None
    where there is none)."""
    profile = given or (mode if mode in PROFILES else "float32")
    if profile not in PROFILES:
        raise OraclesError(f"{flag} {profile!r} is not one of {', '.join(PROFILES)}")
    why = refused(profile, mode)
    if why and not any_profile:
        raise OraclesError(f"{flag} {profile}: {why}; check it with {flag} {mode} (the profile "
                           "of its mode)" + (f", or pass {any_flag} to judge it anyway (the report "
                                             "then says it is not this run's verdict)"
                                             if any_flag else ""))
    return profile
