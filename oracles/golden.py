"""The golden suite on disk (DESIGN.md section 6): writing it and reading it back.

    DIR/manifest.json
    DIR/cases/<id>/model/                 model cases: a clean checkpoint directory that engines
                                          load as is (MODEL_FILES, nothing else)
    DIR/cases/<id>/config.json            component cases that need a config
    DIR/cases/<id>/inputs.safetensors     inputs; parameters as JSON in its metadata ("params")
    DIR/cases/<id>/expected.safetensors   outputs in dataflow order (float64 / int64) + margins

Format 1 (before model/ existed) kept config.json and model.safetensors next to the inputs;
it is still read (Golden.load_case).

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
from refimpl.atomic import atomic_directory, check_destination, write_text
from refimpl.checkpoint import SafetensorsFile, write_safetensors
from refimpl.config import Config
from refimpl.errors import RefimplError

from . import OraclesError, __version__, tolerance
from .schema import CAUSAL_KINDS, Case, matches, output_type

# Writing a suite runs refimpl (cases, emulate, suites, mutants): those are imported by the
# writing functions below, so that reading and checking a suite never imports the forward pass.

SUITE_FORMAT = 2  # 2: model cases in cases/<id>/model/ with tokenizer files (1: flat)
MODEL_DIR = "model"
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
               "generation_config.json")

# The conventions every expected value follows unless a case says otherwise (SPEC.md section 9).
CONVENTIONS = {
    "expert_group_mask": "-inf", "group_score": "sum of the top-2 biased scores",
    "gate_precision": "router in float64 (float32 or better), bias float32 or better",
    "bias_in_weights": "never", "yarn_activation": "always when rope_scaling is yarn",
    "softmax_mscale": "m(s, mscale_all_dim)^2; cos/sin times m(s, mscale)/m(s, mscale_all_dim)",
    "rope_layout": "adjacent pairs (2i, 2i+1)", "topk_ties": "lower index",
    "norm_topk_prob_false": "honoured", "latent_norm_eps": "1e-6",
}


def conventions() -> dict:
    from refimpl import mtp

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


def compute(case: Case) -> tuple[dict, dict, dict]:
    """-> (expected outputs, expected-only aux tensors, tolerances per profile)."""
    from .cases import KINDS
    from .emulate import run_case
    from .mutants import MUTANTS

    kind = KINDS[case.kind]
    under = MUTANTS[case.expect_under] if case.expect_under else None
    truth = run_case(case, "float64", under)
    aux = kind.aux(case, truth) if kind.aux else {}
    tols = {}
    for profile in tolerance.PROFILES:
        emulated = run_case(case, tolerance.CALIBRATED_BY[profile], under)
        tols[profile] = tolerance.calibrate(truth, aux, emulated, profile,
                                             causal=case.kind in CAUSAL_KINDS,
                                             exact_ties=case.params.get("exact_ties", "forgiven"))
    return truth, aux, tols


def write_case(case: Case, case_dir: str) -> dict:
    """Write one case's files -> its manifest entry."""
    from .cases import KINDS
    from .suites import SUITE_SEED

    os.makedirs(case_dir)
    truth, aux, tols = compute(case)
    if case.weights is not None:
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
        "expected_under": case.expect_under or "this project's conventions (SPEC.md section 9)",
        "params": case.params, "model": case.is_model,
        **({"model_dir": MODEL_DIR} if case.is_model else {}),
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
    from .engines import tokenizer

    os.makedirs(model_dir)
    cfg.to_json(os.path.join(model_dir, "config.json"))
    write_safetensors(os.path.join(model_dir, "model.safetensors"), weights, {"format": "pt"})
    tokenizer.write(model_dir, cfg)
    assert sorted(os.listdir(model_dir)) == sorted(MODEL_FILES), os.listdir(model_dir)


def generate(out: str, suite: str = "default", only: str | None = None, progress=None) -> dict:
    """Write the suite (or the cases matching `only`) to `out`, atomically -> the manifest."""
    from .suites import SUITE_DOCS, SUITE_SEED, suite_cases

    builders = [(cid, b) for cid, b in suite_cases(suite) if matches(cid, only)]
    if not builders:
        raise OraclesError(f"suite {suite!r}: no case matches --only {only!r}")
    check_destination(out, "directory", OraclesError)  # before the cases are computed
    with atomic_directory(out, OraclesError, tag="oracles") as tmp:
        entries = []
        it = builders
        if progress:
            it = progress(builders, desc=f"generating {suite}", unit="case")
        for cid, build in it:
            case = build(cid)
            entries.append(write_case(case, os.path.join(tmp, "cases", cid)))
        manifest = {
            "suite": suite, "suite_doc": SUITE_DOCS[suite], "format": SUITE_FORMAT,
            "only": only, "generator": f"oracles {__version__}", "refimpl": refimpl.__version__,
            "numpy": np.__version__, "ml_dtypes": ml_dtypes.__version__,
            "python": platform.python_version(), "platform": f"{platform.system()} {platform.machine()}",
            "seed": SUITE_SEED, "conventions": conventions(),
            "tolerance_rule": f"tol = max({tolerance.K:g} x calibrated error, floor)",
            "tolerance_k": tolerance.K, "floors": tolerance.FLOORS,
            "calibrated_by": tolerance.CALIBRATED_BY,
            "cases": entries,
        }
        write_text(os.path.join(tmp, "manifest.json"),
                   json.dumps(manifest, indent=1, default=_json_default) + "\n", OraclesError,
                   tag="oracles")
    return manifest


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------

def read_tensors(path: str) -> dict:
    try:
        st = SafetensorsFile(path)
        return {k: np.array(st.array(k)) for k in st.tensors}
    except RefimplError as e:
        raise OraclesError(str(e)) from None


def read_metadata(path: str) -> dict:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n)).get("__metadata__", {})


class Golden:
    """A golden suite directory, its files verified against the manifest's sha256 on opening."""

    def __init__(self, path: str, verify: bool = True):
        self.path = os.fspath(path)
        mpath = os.path.join(self.path, "manifest.json")
        if not os.path.isdir(self.path):
            raise OraclesError(f"{self.path}: not a golden suite directory")
        try:
            with open(mpath, encoding="utf-8") as f:
                self.manifest = json.load(f)
        except FileNotFoundError:
            raise OraclesError(f"{mpath}: missing: not a golden suite directory") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise OraclesError(f"{mpath}: not valid JSON ({e})") from None
        if not isinstance(self.manifest, dict) or not isinstance(self.manifest.get("cases"), list):
            raise OraclesError(f"{mpath}: no list of cases")
        self.cases = {c["id"]: c for c in self.manifest["cases"]}
        if verify:
            self.verify()

    def case_dir(self, cid: str) -> str:
        return os.path.join(self.path, "cases", cid)

    def verify(self) -> None:
        """Every file listed is present with its recorded sha256."""
        for cid, entry in self.cases.items():
            for fname, digest in entry["files"].items():
                p = os.path.join(self.case_dir(cid), fname)
                if not os.path.exists(p):
                    raise OraclesError(f"{p}: listed in the manifest but missing")
                got = sha256(p)
                if got != digest:
                    raise OraclesError(f"{p}: sha256 {got[:12]}... does not match the manifest's "
                                       f"{digest[:12]}...: the golden suite was modified; regenerate it")

    def load_case(self, cid: str) -> Case:
        """The case as a candidate sees it: inputs, params, config, checkpoint (model cases)
        and its directory (`case.path`)."""
        e = self.cases[cid]
        d = self.case_dir(cid)
        md = self.model_dir(cid)
        cfgp = os.path.join(md or d, "config.json")
        cfg = Config.from_json(cfgp) if os.path.exists(cfgp) else None
        weights = read_tensors(os.path.join(md, "model.safetensors")) if md else None
        case = Case(cid, e["kind"], e["pins"], read_tensors(os.path.join(d, "inputs.safetensors")),
                    params=e["params"], config=cfg, weights=weights, conventions=e["conventions"],
                    path=d, model_path=md, edge=e.get("edge"))
        return case

    def model_dir(self, cid: str) -> str | None:
        """A model case's checkpoint directory (cases/<id>/model; the case directory itself in
        format 1 suites), None for component cases."""
        e = self.cases[cid]
        if not e.get("model"):
            return None
        sub = os.path.join(self.case_dir(cid), MODEL_DIR)
        return sub if os.path.isdir(sub) else self.case_dir(cid)

    def expected(self, cid: str) -> dict:
        return read_tensors(os.path.join(self.case_dir(cid), "expected.safetensors"))


def suite_size(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total



