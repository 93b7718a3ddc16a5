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

from . import OraclesError, __version__, tolerance, untrusted
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
    from .conditioned import KINDS_CONDITIONED, Conditioner
    from .emulate import run_case
    from .mutants import MUTANTS

    kind = KINDS[case.kind]
    under = MUTANTS[case.expect_under] if case.expect_under else None
    truth = run_case(case, "float64", under, alone=True)
    aux = kind.aux(case, truth) if kind.aux else {}
    # the tolerances are measured as `oracles check` judges: against the truth conditioned on
    # the emulated run's routing (conditioned.py)
    cond = Conditioner(case, under) if case.kind in KINDS_CONDITIONED else None
    if cond is not None and "tokens" in truth:
        cond.tokens = np.asarray(truth["tokens"], np.int64)
    tols = {}
    for profile in tolerance.PROFILES:
        emulated = run_case(case, tolerance.CALIBRATED_BY[profile], under)
        tols[profile] = tolerance.calibrate(truth, aux, emulated, profile,
                                             causal=case.kind in CAUSAL_KINDS,
                                             exact_ties=case.params.get("exact_ties", "forgiven"),
                                             kind=case.kind, params=case.params,
                                             conditioner=cond)
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
# Reading: a suite is untrusted input (docs/conformance.md, "Receiving a suite from someone else")
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


def _identity(path: str) -> tuple:
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _reject_constant(name):
    raise ValueError(f"{name} is not JSON")


class Golden:
    """A golden suite directory. On opening: manifest.json is read (a regular file inside the
    suite, at most 64 MiB), its sha256 is the suite digest (compared with `expect_digest` when
    given), every field the checker uses is validated (manifest.validate), and every file listed
    is verified against its sha256 (names checked before any path is built; files must be
    regular files inside the suite; nothing unlisted may sit in a case directory). Only listed,
    verified files are read afterwards."""

    def __init__(self, path: str, verify: bool = True, expect_digest: str | None = None):
        from . import manifest

        self.path = os.fspath(path)
        if not os.path.isdir(self.path):
            raise OraclesError(f"{self.path}: not a golden suite directory")
        mpath = os.path.join(self.path, "manifest.json")
        if not os.path.lexists(mpath):
            raise OraclesError(f"{mpath}: missing: not a golden suite directory")
        raw = untrusted.read_bytes(untrusted.inside(self.path, "manifest.json", "manifest.json"),
                                   "manifest.json", untrusted.MAX_MANIFEST)
        self.digest = hashlib.sha256(raw).hexdigest()
        if expect_digest is not None:
            want = manifest.parse_digest(expect_digest)
            if want != self.digest:
                raise OraclesError(f"{self.path}: suite digest {self.digest} is not the expected "
                                   f"{want}: this is not the suite you pinned")
        try:
            m = json.loads(raw.decode("utf-8"), parse_constant=_reject_constant)
        except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as e:
            raise OraclesError(f"{mpath}: not valid JSON ({e})") from None
        except RecursionError:
            raise OraclesError(f"{mpath}: JSON nested too deeply") from None
        self.manifest = manifest.validate(m, mpath)
        self.cases = {c["id"]: c for c in self.manifest["cases"]}
        self._verified = set()
        self._identity = {}  # (case, file) -> what it was when verified
        if verify:
            self.verify()

    def case_dir(self, cid: str) -> str:
        return os.path.join(self.path, "cases", cid)

    def verify(self) -> None:
        """Every file listed is a regular file inside the suite with its recorded sha256, and
        nothing unlisted sits in a case directory."""
        for cid, entry in self.cases.items():
            d = untrusted.inside(self.path, f"cases/{cid}", f"case {cid!r}: its directory", kind="dir")
            for fname, digest in entry["files"].items():
                p = os.path.join(self.case_dir(cid), fname)
                real = untrusted.inside(self.path, f"cases/{cid}/{fname}", f"case {cid!r}: file {fname!r}")
                got = untrusted.sha256_file(real, f"case {cid!r}: file {fname!r}")
                if got != digest:
                    # (the file's own hash is not printed: it is nobody's business what it holds)
                    raise OraclesError(f"{p}: its sha256 does not match the manifest's "
                                       f"{digest[:12]}...: the golden suite was modified; regenerate it")
                self._identity[(cid, fname)] = _identity(real)
            extra = [f for f in untrusted.listed_tree(d) if f not in entry["files"]]
            if extra:
                raise OraclesError(f"{os.path.join(self.case_dir(cid), extra[0])}: not listed in the "
                                   f"manifest's files for case {cid!r}: a suite holds only listed files")
            self._verified.add(cid)

    def file(self, cid: str, name: str, required: bool = True) -> str | None:
        """The checked path of a file of case `cid` that the manifest lists (None when it does not
        list it and not `required`)."""
        entry = self.cases[cid]
        if name not in entry["files"]:
            if not required:
                return None
            raise OraclesError(f"case {cid!r}: the manifest's files do not list {name!r}, which "
                               f"this case needs")
        real = untrusted.inside(self.path, f"cases/{cid}/{name}", f"case {cid!r}: file {name!r}")
        if cid in self._verified and self._identity.get((cid, name)) != _identity(real):
            raise OraclesError(f"{os.path.join(self.case_dir(cid), name)}: replaced or modified "
                               "since its sha256 was verified")
        if cid not in self._verified:
            got = untrusted.sha256_file(real, f"case {cid!r}: file {name!r}")
            if got != entry["files"][name]:
                raise OraclesError(f"{os.path.join(self.case_dir(cid), name)}: its sha256 does not "
                                   "match the manifest's: the golden suite was modified")
        return real

    def _listed(self, cid: str, *names) -> str:
        """The first of `names` the case's files list (a model case keeps its checkpoint in
        model/ since suite format 2, next to the inputs before), else the last."""
        return next((n for n in names if n in self.cases[cid]["files"]), names[-1])

    def _config(self, cid: str):
        p = self.file(cid, self._listed(cid, "model/config.json", "config.json"), required=False)
        if p is None:
            return None
        try:
            return Config.from_json(p)
        except RefimplError as e:
            raise OraclesError(f"case {cid!r}: {e}") from None

    def load_case(self, cid: str) -> Case:
        """The case as a candidate sees it: inputs, params, config, checkpoint (model cases)
        and its directory (`case.path`)."""
        e = self.cases[cid]
        d = self.case_dir(cid)
        md = self.model_dir(cid)
        cfg = self._config(cid)
        weights = read_tensors(self.file(cid, self._listed(cid, "model/model.safetensors",
                                                           "model.safetensors"))) if e["model"] else None
        case = Case(cid, e["kind"], e["pins"], read_tensors(self.file(cid, "inputs.safetensors")),
                    params=e["params"], config=cfg, weights=weights, conventions=e["conventions"],
                    path=d, model_path=md, edge=e.get("edge"))
        return case

    def required(self, cid: str) -> set:
        """The outputs the case's kind requires (its contract, manifest.REQUIRED), from its params
        and config; the manifest may flag more as required, never fewer."""
        from .manifest import contract

        def input_names():
            try:
                return set(SafetensorsFile(self.file(cid, "inputs.safetensors")).tensors)
            except RefimplError as e:
                raise OraclesError(str(e)) from None
        return contract(self.cases[cid], lambda: self._config(cid), input_names)

    def model_dir(self, cid: str) -> str | None:
        """A model case's checkpoint directory (cases/<id>/model since suite format 2, the case
        directory itself in format 1 suites), checked to stay inside the suite; None for
        component cases.  Its files are the ones the manifest lists and hashes."""
        if not self.cases[cid].get("model"):
            return None
        if f"{MODEL_DIR}/config.json" in self.cases[cid]["files"]:
            return untrusted.inside(self.path, f"cases/{cid}/{MODEL_DIR}",
                                    f"case {cid!r}: checkpoint directory", kind="dir")
        return self.case_dir(cid)

    def expected(self, cid: str) -> dict:
        """The expected tensors, checked against the manifest's outputs (every output present,
        with the recorded shape and a dtype of its type) and the margins the checker reads."""
        from .manifest import check_expected
        exp = read_tensors(self.file(cid, "expected.safetensors"))
        check_expected(self.cases[cid], exp, os.path.join(self.case_dir(cid), "expected.safetensors"))
        return exp


def suite_size(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(root, f)) for f in files)
    return total



