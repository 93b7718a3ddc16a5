"""Writing a golden suite (DESIGN.md section 6; the layout is oracles.format.golden's): each
case's expected values computed by refimpl in float64, its tolerances calibrated per profile,
its files written and hashed into the manifest.

A suite is written to a temporary sibling directory and renamed when complete. Nothing in it
depends on the time or the machine's state beyond numpy's arithmetic, so regenerating on the same
machine gives byte-identical files.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform

import ml_dtypes
import numpy as np

import refimpl
from refimpl import mtp
from refimpl.atomic import atomic_directory, check_destination, write_text
from refimpl.config import Config
from refimpl.writer import write_safetensors

from .. import OraclesError, __version__
from ..format import tolerances
from ..format.digest import question_digest
from ..format.golden import MODEL_DIR, MODEL_FILES, OWN_CONVENTIONS, SUITE_FORMAT
from ..format.schema import CAUSAL_KINDS, Case, matches, output_type
from . import calibration, tokenizer
from .cases import KINDS
from .checkpoint_cases import CheckpointWeights, reference_of
from .cluster_cases import compute_on_cluster
from .conditioned import KINDS_CONDITIONED, Conditioner
from .emulate import run_case
from .mutants import MUTANTS
from .suites import SUITE_DOCS, SUITE_SEED, suite_cases

# The conventions every expected value follows unless a case says otherwise (spec section 9).
CONVENTIONS = {
    "expert_group_mask": "-inf", "group_score": "sum of the top-2 biased scores",
    "gate_precision": "router in float64 (float32 or better), bias float32 or better",
    "bias_in_weights": "never", "yarn_activation": "always when rope_scaling is yarn",
    "softmax_mscale": "m(s, mscale_all_dim)^2; cos/sin times m(s, mscale)/m(s, mscale_all_dim)",
    "rope_layout": "adjacent pairs (2i, 2i+1)", "topk_ties": "lower index",
    "norm_topk_prob_false": "honoured", "latent_norm_eps": "1e-6",
}


def conventions() -> dict:
    return {**CONVENTIONS, "mtp": mtp.DEFAULT.as_dict()}


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    raise TypeError(type(o).__name__)


def compute(case: Case, profiles=tolerances.PROFILES) -> tuple[dict, dict, dict]:
    """-> (expected outputs, expected-only aux tensors, tolerances per profile); only the given
    profiles are calibrated (oracles search calibrates the one it judges by)."""
    kind = KINDS[case.kind]
    under = MUTANTS[case.expect_under] if case.expect_under else None
    truth = run_case(case, "float64", under, alone=True)
    aux = kind.aux(case, truth) if kind.aux else {}
    # the tolerances are measured as `oracles check` judges: against the truth conditioned on
    # the emulated run's routing and token stream (conditioned.py)
    cond = Conditioner(case, under) if case.kind in KINDS_CONDITIONED else None
    if cond is not None and "tokens" in truth:
        cond.tokens = np.asarray(truth["tokens"], np.int64)
    tols = {}
    for profile in profiles:
        emulated = run_case(case, tolerances.CALIBRATED_BY[profile], under)
        tols[profile] = calibration.calibrate(truth, aux, emulated, profile,
                                               causal=case.kind in CAUSAL_KINDS,
                                               exact_ties=case.params.get("exact_ties", "forgiven"),
                                               kind=case.kind, params=case.params,
                                               conditioner=cond)
    return truth, aux, tols


def compute_job(suite: str, cid: str, case) -> tuple[dict, dict, dict]:
    """compute() of a case given, or built from its suite (a Ray worker's job: cluster_cases)."""
    return compute(dict(suite_cases(suite))[cid](cid) if case is None else case)


def write_case(case: Case, case_dir: str, computed=None, profiles=tolerances.PROFILES) -> dict:
    """Write one case's files -> its manifest entry.  computed: compute(case)'s result when it
    was computed elsewhere (a Ray worker: cluster_cases); profiles: those calibrated."""
    os.makedirs(case_dir)
    truth, aux, tols = compute(case, profiles) if computed is None else computed
    reference = None
    if isinstance(case.weights, CheckpointWeights):  # the user's checkpoint: referenced, not copied
        reference = reference_of(case.weights)
        case.config.to_json(os.path.join(case_dir, "config.json"))
    elif case.weights is not None:
        write_model_dir(os.path.join(case_dir, MODEL_DIR), case.config, case.weights)
    elif case.config is not None:
        case.config.to_json(os.path.join(case_dir, "config.json"))
    params = json.dumps(case.params, sort_keys=True, default=_json_default)
    write_safetensors(os.path.join(case_dir, "inputs.safetensors"), case.inputs,
                      {"format": "pt", "params": params, "case": case.id})
    write_safetensors(os.path.join(case_dir, "expected.safetensors"), {**truth, **aux},
                      {"format": "pt", "case": case.id})
    required = set(KINDS[case.kind].required(case))
    files = sorted(os.path.relpath(os.path.join(root, f), case_dir).replace(os.sep, "/")
                   for root, _, names in os.walk(case_dir) for f in names)
    return {
        "id": case.id, "kind": case.kind, "pins": case.pins, "doc": KINDS[case.kind].doc,
        "seed": [SUITE_SEED, "crc32(id)"], "conventions": case.conventions,
        "expected_under": case.expect_under or OWN_CONVENTIONS,
        "params": case.params, "model": case.is_model,
        **({"checkpoint": reference} if reference is not None else
           {"model_dir": MODEL_DIR} if case.is_model else {}),
        **({"edge": case.edge} if case.edge else {}),
        "inputs": [{"name": k, "shape": list(v.shape), "dtype": str(v.dtype)} for k, v in case.inputs.items()],
        "outputs": [{"name": k, "type": output_type(k), "required": k in required,
                     "shape": list(v.shape), "dtype": str(v.dtype)} for k, v in truth.items()],
        "aux": list(aux),
        "tolerances": tols,
        "files": {f: sha256(os.path.join(case_dir, f)) for f in files},
    }


def write_model_dir(model_dir: str, cfg: Config, weights: dict) -> None:
    """A checkpoint directory engines load as is: config.json, model.safetensors, a byte-level
    BPE tokenizer matching the vocabulary, generation_config.json, and nothing else."""
    os.makedirs(model_dir)
    cfg.to_json(os.path.join(model_dir, "config.json"))
    write_safetensors(os.path.join(model_dir, "model.safetensors"), weights, {"format": "pt"})
    tokenizer.write(model_dir, cfg)
    assert sorted(os.listdir(model_dir)) == sorted(MODEL_FILES), os.listdir(model_dir)


def generate(out: str, suite: str = "default", only: str | None = None, progress=None,
             cases: list | None = None, suite_doc: str | None = None, ray: str | None = None) -> dict:
    """Write the suite (or the cases matching `only`) to `out`, atomically -> the manifest.
    cases: ready Case objects instead of a built-in suite's (a checkpoint golden), described by
    suite_doc.  ray: compute the cases on a Ray cluster's workers ("local" or an address;
    cluster_cases), the files still written here."""
    if cases is not None:
        builders = [(c.id, (lambda cid, c=c: c)) for c in cases if matches(c.id, only)]
    else:
        builders = [(cid, b) for cid, b in suite_cases(suite) if matches(cid, only)]
    if not builders:
        raise OraclesError(f"suite {suite!r}: no case matches --only {only!r}")
    return write_suite(out, suite, suite_doc or SUITE_DOCS[suite], builders, only=only,
                       progress=progress, ray=ray,
                       given={} if cases is None else {c.id: c for c in cases})


def write_suite(out: str, suite: str, doc: str, builders, only: str | None = None, progress=None,
                profiles=tolerances.PROFILES, extra: dict | None = None, describe=None,
                ray: str | None = None, given: dict | None = None) -> dict:
    """Write the cases of builders [(case id, build(case id) -> Case)] to `out` as suite `suite`,
    atomically -> the manifest. `profiles`: the tolerance profiles calibrated; `extra`: fields
    added to the manifest; `describe(case)`: fields added to (or replacing) a case's entry; `ray`
    and `given` (ready cases by id): computed on a Ray cluster's workers (generate)."""
    check_destination(out, "directory", OraclesError)  # before the cases are computed
    computed = {}
    if ray is not None:
        given = given or {}
        computed = compute_on_cluster(ray, compute_job, {cid: (suite, cid, given.get(cid))
                                                         for cid, _ in builders})
    with atomic_directory(out, OraclesError, tag="oracles") as tmp:
        entries = []
        it = builders
        if progress:
            it = progress(builders, desc=f"generating {suite}", unit="case")
        for cid, build in it:
            case = build(cid)
            entry = write_case(case, os.path.join(tmp, "cases", cid), computed.get(cid), profiles)
            entries.append({**entry, **(describe(case) if describe else {})})
        manifest = {
            "suite": suite, "suite_doc": doc, "format": SUITE_FORMAT,
            "only": only, "generator": f"oracles {__version__}", "refimpl": refimpl.__version__,
            "numpy": np.__version__, "ml_dtypes": ml_dtypes.__version__,
            "python": platform.python_version(), "platform": f"{platform.system()} {platform.machine()}",
            "seed": SUITE_SEED, "conventions": conventions(),
            "tolerance_rule": tolerances.RULE,
            "tolerance_k": tolerances.K, "floors": tolerances.FLOORS,
            "calibrated_by": tolerances.CALIBRATED_BY,
            "cases": entries,
            **(extra or {}),
        }
        q = question_digest(manifest)  # recorded next to "format"
        manifest = {k2: v2 for k, v in manifest.items()
                    for k2, v2 in ([(k, v), ("question_digest", q)] if k == "format" else [(k, v)])}
        write_text(os.path.join(tmp, "manifest.json"),
                   json.dumps(manifest, indent=1, default=_json_default) + "\n", OraclesError,
                   tag="oracles")
    return manifest


def suite_size(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total
