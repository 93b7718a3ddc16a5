"""manifest.json as untrusted input: every field the checker reads, validated before it is used.

A suite received from someone else is checked for what can be checked without recomputing it
(docs/conformance.md, "Receiving a suite from someone else"):

- names: case ids are single plain names, file names plain relative names (untrusted.check_name),
  sha256 digests 64 hex digits;
- structure: each case's kind is one this checker knows, its outputs are a non-empty list of
  {name, type, required, shape, dtype} whose type is the one the name implies (schema.output_type),
  and every output its kind's contract requires is present and flagged required (`contract`);
- files: inputs.safetensors and expected.safetensors are listed (model cases also a config.json
  and weights), so no output can be dropped by un-listing its file;
- conventions labels (which turn a failure into NOT_FOLLOWED when another alternative passes):
  only the conventions suite's own cases, conv.<topic>.<alternative>, may carry one;
- tolerances, for every profile this checker judges: every metric the output type is judged on is
  present (a metric left out would not be judged), each tol finite, >= 0, not looser than the
  shipped rule max(K x calibrated, floor) (tolerances.rule: for norm also sqrt of the output's
  calibrated nmse), mismatch tols 0, and
  every tol and margin below a ceiling at which a zero or random output would pass
  (tolerances.CEILINGS).

Errors are one line naming the manifest, the case and the field.
"""

from __future__ import annotations

import math
import re

from .. import OraclesError
from .checkpoint_ref import validate_reference
from . import metrics, tolerances
from .schema import output_type
from .untrusted import check_name

# The outputs each case kind requires: its contract. cases.py registers the same lists with the
# functions that compute them (tests/oracles/test_untrusted.py holds the two equal); they are
# written out here so that reading a suite does not import the forward pass. A callable takes
# (params, config(), input names()): the case's params, and functions that read its config.json
# and the tensor names of its inputs.safetensors (both verified files).
REQUIRED = {
    "rms_norm": ("y",), "yarn_tables": ("inv_freq", "cos", "sin", "softmax_scale"),
    "rope_apply": ("out",), "mla": ("attn_out",), "mla_decode": ("attn_out",),
    "gate": ("topk_idx", "topk_weight"), "moe": ("out",), "fp8_dequant": ("w",),
    "prefill": ("logits",), "decode": ("logits",), "greedy": ("tokens",),
    "mtp_prefill": lambda params, cfg, inputs: ["logits"] + [
        f"mtp.{k}.logits" for k in range(1, cfg().num_nextn_predict_layers + 1)],
    "mtp_module": lambda params, cfg, inputs: [f"mtp.{_int(params['k'])}.logits"],
    "speculative": ("tokens",), "training": ("balance_loss", "bias_updated", "mtp_loss"),
    "fp8_quant": ("q", "scale_inv"), "fp8_act_quant": ("q", "s"),
    # scenario kinds (oracles/authoring/scenarios.py): one request.<r>.logits per request.<r>.input_ids
    "schedule": lambda params, cfg, inputs: [f"request.{r}.logits" for r in range(_requests(inputs()))],
    "mtp_speculation": ("tokens",),
}


def _int(v) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        raise TypeError(f"{v!r} is not an integer")
    return v


def _requests(input_names) -> int:
    """How many requests a scenario case holds: request.0.input_ids, request.1.input_ids, ..."""
    n = 0
    while f"request.{n}.input_ids" in input_names:
        n += 1
    return n

# The labelled alternatives of the conventions suite (suites.conventions(); a test holds them equal).
CONVENTION_ALTERNATIVES = {
    "yarn_activation": ("always", "only_when_extended"), "group_mask": ("neg_inf", "zero"),
    "gate_precision": ("float32", "bf16_bias", "bf16_gate"), "group_score": ("top2_sum", "max"),
    "softmax_mscale": ("mscale_all_dim", "mscale", "none"),
    "rope_layout": ("adjacent_pairs", "rotate_half"), "mtp_concat": ("embedding_first", "hidden_first"),
    "mtp_h0": ("final_norm", "pre_norm"), "topk_ties": ("lower_index", "higher_index", "unspecified"),
    "latent_norm_eps": ("class_default", "rms_norm_eps"),
}

HEX64 = re.compile(r"[0-9a-f]{64}")
FORMATS = (1, 2, 3)  # suite formats this checker reads (golden.SUITE_FORMAT is the newest)
MAX_RANK, MAX_DIM = 8, 2 ** 40  # as a safetensors header may hold (refimpl.checkpoint)
MAX_PARAM_INT = 2 ** 53  # |integer| in params: JSON's exactly representable range
MAX_MTP = 16  # MTP modules (refimpl.config LIMITS num_nextn_predict_layers)
# metric names judged per output type, and the forgiveness margin it needs
JUDGED = {
    "continuous": (metrics.CONTINUOUS_METRICS, ()),
    "logits": (metrics.LOGIT_METRICS, ("logit_eps",)),
    "indices": (("mismatch",), ("margin_eps",)),
    "routing_weights": (metrics.CONTINUOUS_METRICS, ("margin_eps",)),
    "tokens": (("mismatch",), ("logit_eps",)),
}
MODEL_FILES = "config.json and a *.safetensors checkpoint"


def parse_digest(text: str) -> str:
    """--expect-digest: 64 hex digits, optionally prefixed 'sha256:' -> lower-case hex."""
    d = str(text).strip().lower()
    d = d[len("sha256:"):] if d.startswith("sha256:") else d
    if not HEX64.fullmatch(d):
        raise OraclesError(f"--expect-digest {text!r}: not a sha256 digest (64 hex digits)")
    return d


class _Where:
    def __init__(self, mpath, cid=None):
        self.mpath, self.cid = mpath, cid

    def error(self, field, what):
        at = f"case {self.cid!r}: " if self.cid is not None else ""
        return OraclesError(f"{self.mpath}: {at}field {field!r} {what}")


def _typed(d: dict, key, types, where: _Where, optional=False, field=None):
    field = field or key
    if key not in d:
        if optional:
            return None
        raise where.error(field, "is missing")
    v = d[key]
    names = {bool: "a boolean", str: "a string", dict: "an object", list: "a list", int: "an integer"}
    ok = isinstance(v, types) and not (isinstance(v, bool) and bool not in _tuple(types))
    if not ok:
        want = " or ".join(names.get(t, t.__name__) for t in _tuple(types))
        raise where.error(field, f"must be {want}, not {_json_type(v)}")
    return v


def _tuple(t):
    return t if isinstance(t, tuple) else (t,)


def _json_type(v) -> str:
    return {bool: "a boolean", str: "a string", dict: "an object", list: "a list", int: "an integer",
            float: "a number", type(None): "null"}.get(type(v), type(v).__name__)


def _number(v, field, where, lo=0.0, hi=None) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise where.error(field, f"must be a number, not {_json_type(v)}")
    try:
        x = float(v)
    except OverflowError:  # an integer of hundreds of digits
        raise where.error(field, f"is an integer of {len(str(abs(v))):,} digits: not a usable "
                                 "number") from None
    if not math.isfinite(x) or x < lo:
        raise where.error(field, f"is {v!r}: must be finite and >= {lo:g}")
    if hi is not None and x > hi:
        raise where.error(field, f"is {v!r}: above the ceiling {hi:g} at which a wrong output "
                                 f"would pass (tolerances.CEILINGS); refusing the suite")
    return x


def validate(m, mpath: str) -> dict:
    """The manifest, validated (module docstring) -> it, unchanged."""
    top = _Where(mpath)
    if not isinstance(m, dict):
        raise OraclesError(f"{mpath}: not a JSON object")
    if "format" not in m:
        raise top.error("format", "is missing: every suite records its format")
    fmt = m["format"]
    if isinstance(fmt, bool) or not isinstance(fmt, int):
        raise top.error("format", f"is {fmt!r}: must be the integer "
                                  f"{', '.join(map(str, FORMATS[:-1]))} or {FORMATS[-1]}")
    if fmt > max(FORMATS):
        raise OraclesError(f"{mpath}: suite format {fmt} is newer than this checker reads (up to "
                           f"{max(FORMATS)}); update oracles")
    if fmt not in FORMATS:
        raise top.error("format", f"is {fmt!r}: this checker reads suite formats "
                                  f"{', '.join(map(str, FORMATS))}")
    cases = _typed(m, "cases", list, top)
    if not cases:
        raise top.error("cases", "is an empty list")
    seen = set()
    for i, entry in enumerate(cases):
        if not isinstance(entry, dict):
            raise top.error(f"cases[{i}]", f"must be an object, not {_json_type(entry)}")
        cid = _typed(entry, "id", str, top, field=f"cases[{i}].id")
        check_name(cid, f"{mpath}: case id", nested=False)
        if cid in seen:
            raise top.error(f"cases[{i}].id", f"repeats the case id {cid!r}")
        seen.add(cid)
        validate_case(entry, _Where(mpath, cid))
    return m


def validate_case(e: dict, where: _Where) -> None:
    kind = _typed(e, "kind", str, where)
    if kind not in REQUIRED:
        raise where.error("kind", f"{kind!r} is not a case kind this checker knows "
                                  f"({', '.join(REQUIRED)})")
    _typed(e, "pins", str, where)
    check_params(_typed(e, "params", dict, where), kind, where)
    is_model = _typed(e, "model", bool, where)
    conv = _typed(e, "conventions", dict, where)
    for k, v in conv.items():
        if not isinstance(v, str):
            raise where.error(f"conventions.{k}", f"must be a string, not {_json_type(v)}")
    if conv:  # a label turns a failure into NOT_FOLLOWED: only the conventions suite's own cases
        (topic, alt), = conv.items() if len(conv) == 1 else ((None, None),)
        if where.cid != f"conv.{topic}.{alt}" or alt not in CONVENTION_ALTERNATIVES.get(topic, ()):
            raise where.error("conventions", f"{conv!r} is not the label of a conventions case "
                                             "this checker knows (conv.<topic>.<alternative>)")
    aux = _typed(e, "aux", list, where, optional=True) or []
    if not all(isinstance(a, str) for a in aux):
        raise where.error("aux", "must be a list of strings")
    # outputs
    outputs = _typed(e, "outputs", list, where)
    if not outputs:
        raise where.error("outputs", "is an empty list: a case must compare something")
    names = []
    for j, o in enumerate(outputs):
        f = f"outputs[{j}]"
        if not isinstance(o, dict):
            raise where.error(f, f"must be an object, not {_json_type(o)}")
        name = _typed(o, "name", str, where, field=f + ".name")
        if not name or not name.isprintable():
            raise where.error(f + ".name", f"{name!r} is empty or holds control characters")
        if name in names:
            raise where.error(f + ".name", f"repeats the output {name!r}")
        names.append(name)
        typ = _typed(o, "type", str, where, field=f + ".type")
        if typ != output_type(name):
            raise where.error(f + ".type", f"is {typ!r}, but output {name!r} is compared as "
                                           f"{output_type(name)!r}")
        _typed(o, "required", bool, where, field=f + ".required")
        shape = _typed(o, "shape", list, where, field=f + ".shape")
        if not (len(shape) <= MAX_RANK and all(isinstance(n, int) and not isinstance(n, bool)
                                               and 0 <= n <= MAX_DIM for n in shape)):
            raise where.error(f + ".shape", f"must be a list of at most {MAX_RANK} integers from 0 "
                                            f"to {MAX_DIM}")
        _typed(o, "dtype", str, where, field=f + ".dtype")
        if typ == "routing_weights" and name[: -len("topk_weight")] + "topk_idx" not in names:
            raise where.error(f + ".name", f"{name!r} needs its topk_idx output listed before it")
    # files
    files = _typed(e, "files", dict, where)
    for fname, digest in files.items():
        check_name(fname, f"{where.mpath}: case {where.cid!r}: file name")
        if not isinstance(digest, str) or not HEX64.fullmatch(digest):
            raise where.error(f"files.{fname}", "must be a sha256 digest (64 lower-case hex digits)")
    for need in ("inputs.safetensors", "expected.safetensors"):
        if need not in files:
            raise where.error("files", f"does not list {need!r}, which every case needs")
    if "checkpoint" in e:  # a model that is the user's checkpoint, referenced by its digest
        validate_reference(e["checkpoint"], where)
        if not is_model or "config.json" not in files:
            raise where.error("files", "does not list config.json, which a case of a checkpoint needs")
    elif is_model:
        base = [f.rsplit("/", 1)[-1] for f in files]
        weights = [b for b in base if b.endswith(".safetensors")
                   and b not in ("inputs.safetensors", "expected.safetensors")]
        if "config.json" not in base or not weights:
            raise where.error("files", f"does not list {MODEL_FILES}, which a model case needs")
    # tolerances
    tols = _typed(e, "tolerances", dict, where)
    for profile in tolerances.PROFILES:
        if profile in tols:
            validate_tolerances(tols[profile], outputs, profile, where)


def check_params(params: dict, kind: str, where: _Where) -> dict:
    """A case's params: every number in them finite and of magnitude at most 2^53 (an adapter
    loops or allocates by them), and the ones this checker reads in range: an mtp_module's k
    (1..16), an mtp_speculation's depth and max_new_tokens, whose schedule must say the same
    (schedule.check_speculation)."""
    stack = [(params, "params")]
    while stack:
        v, f = stack.pop()
        if isinstance(v, dict):
            stack.extend((x, f"{f}.{k}") for k, x in v.items())
        elif isinstance(v, list):
            stack.extend((x, f"{f}[{i}]") for i, x in enumerate(v))
        elif isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_PARAM_INT:
            digits = len(str(abs(v)))
            raise where.error(f, f"is an integer of {digits:,} digits, beyond +-2^53")
        elif isinstance(v, float) and not math.isfinite(v):
            raise where.error(f, f"is {v!r}: must be finite")
    if kind == "mtp_module":
        k = params.get("k")
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_MTP:
            raise where.error("params.k", f"is {k!r}: must be an MTP depth from 1 to {MAX_MTP}")
    if kind == "mtp_speculation":
        _check_speculation(params, where)
    return params


def _check_speculation(params: dict, where: _Where) -> None:
    """An mtp_speculation case's depth (1..16) and max_new_tokens (>= 1), and its schedule's
    speculate steps saying the same (the schedule is what an engine reads, params what the
    expected values were computed with)."""
    for k, hi in (("depth", MAX_MTP), ("max_new_tokens", MAX_PARAM_INT)):
        v = params.get(k)
        if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= hi:
            raise where.error(f"params.{k}", f"is {v!r}: must be an integer from 1 to {hi}")
    sched = params.get("schedule")
    steps = sched.get("steps") if isinstance(sched, dict) else None
    if not isinstance(steps, list) or not steps:
        raise where.error("params.schedule", "must be an object with a non-empty list of steps")
    for j, st in enumerate(steps):
        if not isinstance(st, dict) or st.get("op") != "speculate":
            raise where.error(f"params.schedule.steps[{j}]", "is not a speculate step")
        for k in ("depth", "max_new_tokens"):
            if st.get(k) != params[k] or type(st.get(k)) is not int:
                raise where.error(f"params.schedule.steps[{j}].{k}",
                                  f"is {st.get(k)!r}, but params.{k} is {params[k]}: the schedule "
                                  "and the params the expected values follow disagree")


def validate_tolerances(t, outputs, profile: str, where: _Where) -> None:
    """One profile's tolerances: every judged metric present, finite, not looser than the rule,
    under the ceilings."""
    if not isinstance(t, dict):
        raise where.error(f"tolerances.{profile}", f"must be an object, not {_json_type(t)}")
    floors, ceil = tolerances.FLOORS[profile], tolerances.CEILINGS
    for o in outputs:
        name, typ = o["name"], o["type"]
        f0 = f"tolerances.{profile}.{name}"
        ent = t.get(name)
        if not isinstance(ent, dict):
            raise where.error(f0, "is missing or not an object: the output could not be judged")
        judged, eps = JUDGED[typ]
        for m in judged:
            f = f"{f0}.{m}"
            v = ent.get(m)
            if not isinstance(v, dict):
                raise where.error(f, "is missing or not an object: the metric would not be judged")
            tol = _number(v.get("tol"), f + ".tol", where, hi=ceil[m])
            cal = _number(v.get("calibrated"), f + ".calibrated", where)
            nmse = ent.get("nmse") if m == "norm" else None
            nmse_cal = nmse.get("calibrated") if isinstance(nmse, dict) else None
            nmse_cal = _number(nmse_cal, f"{f0}.nmse.calibrated", where) if m == "norm" else 0.0
            rule = tolerances.rule(m, cal, floors[m], nmse_cal)
            if tol > rule * (1 + 1e-12):
                also = f", sqrt(nmse calibrated {nmse_cal:g})" if m == "norm" else ""
                raise where.error(f + ".tol", f"is {tol:g}, looser than this checker's rule "
                                              f"max({tolerances.K:g} x calibrated {cal:g}, floor "
                                              f"{floors[m]:g}{also}) = {rule:g}; refusing the suite")
        for k in eps:
            _number(ent.get(k), f"{f0}.{k}", where, hi=ceil[k])
        ties = ent.get("exact_ties", "forgiven")
        if ties not in ("forgiven", "decided"):
            raise where.error(f"{f0}.exact_ties", f"is {ties!r}: must be 'forgiven' or 'decided'")


def contract(e: dict, get_config, get_input_names) -> set:
    """The outputs the case's kind requires (REQUIRED; some read the case's config.json, params
    or input names), checked against the manifest: each must be listed and flagged required ->
    the set of names."""
    cid, kind = e["id"], e["kind"]
    need = REQUIRED[kind]
    if callable(need):
        try:
            need = need(e["params"], get_config, get_input_names)
        except (KeyError, TypeError, ValueError, AttributeError) as ex:
            raise OraclesError(f"case {cid!r}: its params, config.json or inputs do not give what "
                               f"kind {kind!r} needs ({type(ex).__name__}: {ex})") from None
    flagged = {o["name"]: o["required"] for o in e["outputs"]}
    for n in need:
        if n not in flagged:
            raise OraclesError(f"case {cid!r}: field 'outputs' lacks {n!r}, which kind "
                               f"{kind!r} requires; refusing the suite")
        if not flagged[n]:
            raise OraclesError(f"case {cid!r}: output {n!r} is flagged not required, but kind "
                               f"{kind!r} requires it; refusing the suite")
    return set(need)


def check_expected(e: dict, exp: dict, path: str) -> None:
    """expected.safetensors against the manifest: every output present with its recorded shape
    and a dtype of its type; the margins the checker reads have one value per token."""
    import numpy as np

    cid = e["id"]
    for o in e["outputs"]:
        name, typ = o["name"], o["type"]
        if name not in exp:
            raise OraclesError(f"{path}: case {cid!r}: output {name!r} is listed in the manifest "
                               "but missing from the expected file")
        a = exp[name]
        if list(a.shape) != o["shape"]:
            raise OraclesError(f"{path}: case {cid!r}: output {name!r} has shape {list(a.shape)}, "
                               f"the manifest says {o['shape']}")
        integer = typ in ("indices", "tokens")
        if integer != bool(np.issubdtype(a.dtype, np.integer)) or \
                not (integer or np.issubdtype(a.dtype, np.floating)):
            raise OraclesError(f"{path}: case {cid!r}: output {name!r} has dtype {a.dtype}, not "
                               f"{'an integer' if integer else 'a float'} dtype")
        if typ in ("indices", "logits", "tokens") and (a.ndim < 1 or a.shape[-1] < 1):
            raise OraclesError(f"{path}: case {cid!r}: output {name!r} of shape {list(a.shape)} "
                               "has no last axis to compare along")
        if typ == "routing_weights":
            idx = exp[name[: -len("topk_weight")] + "topk_idx"]
            if a.shape != idx.shape:
                raise OraclesError(f"{path}: case {cid!r}: output {name!r} has shape "
                                   f"{list(a.shape)}, its topk_idx {list(idx.shape)}")
        if typ == "indices":
            scores = exp.get(name[: -len("topk_idx")] + "router_scores")
            if scores is not None and (scores.ndim < 1 or a.size and not (
                    0 <= a.min() and a.max() < scores.shape[-1])):
                raise OraclesError(f"{path}: case {cid!r}: output {name!r} holds expert indices "
                                   "outside its router_scores")
            m = exp.get(name[: -len("topk_idx")] + "topk_margin")
            if m is not None and m.size != a.size // a.shape[-1]:
                raise OraclesError(f"{path}: case {cid!r}: the routing margin of {name!r} has "
                                   f"{m.size} values for {a.size // a.shape[-1]} tokens")
        if typ == "tokens":
            m = exp.get("tokens_margin")
            if m is None or m.size < a.size:
                raise OraclesError(f"{path}: case {cid!r}: 'tokens_margin' is missing or shorter "
                                   "than the token stream")
