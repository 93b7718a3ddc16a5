"""The golden suite on disk (DESIGN.md section 6), read side: the layout, and reading a suite as
untrusted input (docs/conformance.md, "Receiving a suite from someone else").

    DIR/manifest.json
    DIR/cases/<id>/model/                 model cases: a clean checkpoint directory that engines
                                          load as is (MODEL_FILES, nothing else)
    DIR/cases/<id>/config.json            component cases that need a config
    DIR/cases/<id>/inputs.safetensors     inputs; parameters as JSON in its metadata ("params")
    DIR/cases/<id>/expected.safetensors   outputs in dataflow order (float64 / int64) + margins

Format 1 (before model/ existed) kept config.json and model.safetensors next to the inputs;
it is still read (Golden.load_case).  Writing a suite is oracles.authoring.writer.
"""

from __future__ import annotations

import hashlib
import json
import os

import numpy as np

from refimpl import jsonfile
from refimpl.checkpoint import MAX_HEADER, SafetensorsFile, parse_header
from refimpl.config import Config
from refimpl.errors import RefimplError, printable

from .. import OraclesError
from . import digest as digests
from .checkpoint_ref import bind
from . import manifest, schedule, untrusted
from .schema import Case

# 3: the manifest records its question digest (digest.py); 2: model cases in cases/<id>/model/
# with tokenizer files; 1: flat. Every format is read.
SUITE_FORMAT = 3
MODEL_DIR = "model"
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
               "generation_config.json")

# "expected_under" of a case whose expected values follow this project's conventions (otherwise
# the name of the mutant they follow), and how suites made before 2026-12-02 spelled it (the
# old text, spelled apart: it cited the team's notes, which are not part of the repository)
OWN_CONVENTIONS = "this project's conventions (spec section 9)"
OWN_CONVENTIONS_BEFORE = ("this project's conventions (" + "SPEC" + ".md section 9)",)

def read_tensors(path: str) -> dict:
    try:
        st = SafetensorsFile(path)
        return {k: np.array(st.array(k)) for k in st.tensors}
    except RefimplError as e:
        raise OraclesError(str(e)) from None


def read_metadata(path: str) -> dict:
    """A safetensors file's __metadata__ (strings), its header read and checked as strictly as
    every safetensors header (refimpl.checkpoint.parse_header)."""
    shown = printable(path)
    fd, st = jsonfile.open_regular(path, OraclesError)
    with os.fdopen(fd, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n > min(st.st_size - 8, MAX_HEADER):
            raise OraclesError(f"{shown}: header length {n} does not fit the file: not safetensors")
        raw = f.read(n)
    try:
        parse_header(raw, st.st_size, shown)
    except RefimplError as e:
        raise OraclesError(str(e)) from None
    return jsonfile.loads(raw, shown, OraclesError).get("__metadata__", {})


# the files a model case's checkpoint directory may hold besides its weights
MODEL_AUX_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json")
MODEL_INDEX = "model.safetensors.index.json"


def _canonical(v) -> str:
    """JSON with sorted keys: equal for equal values of equal JSON types (1, 1.0 and true differ)."""
    return json.dumps(v, sort_keys=True)


def _identity(path: str) -> tuple:
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class Golden:
    """A golden suite directory. On opening: manifest.json is read (a regular file inside the
    suite, at most 64 MiB), its sha256 is the suite digest (compared with `expect_digest` when
    given), every field the checker uses is validated (manifest.validate), and every file listed
    is verified against its sha256 (names checked before any path is built; files must be
    regular files inside the suite; nothing unlisted may sit in a case directory). Only listed,
    verified files are read afterwards."""

    def __init__(self, path: str, verify: bool = True, expect_digest: str | None = None,
                 checkpoint: str | None = None):
        self.path = os.fspath(path)
        if not os.path.isdir(self.path):
            raise OraclesError(f"{self.path}: not a golden suite directory")
        mpath = os.path.join(self.path, "manifest.json")
        if not os.path.lexists(mpath):
            raise OraclesError(f"{mpath}: missing: not a golden suite directory")
        raw = untrusted.read_bytes(untrusted.inside(self.path, "manifest.json", "manifest.json"),
                                   "manifest.json", untrusted.MAX_MANIFEST)
        self.digest = hashlib.sha256(raw).hexdigest()
        want = manifest.parse_digest(expect_digest) if expect_digest is not None else None

        def not_pinned(question=None, fmt=None):
            q = (f", nor is its question digest {question}" if question else
                 f" (a format {fmt} suite records no question digest: pin its manifest digest)"
                 if fmt else "")
            return OraclesError(f"{self.path}: suite digest {self.digest} is not the expected "
                                f"{want}{q}: this is not the suite you pinned")
        try:
            # strict JSON (refimpl.jsonfile): no duplicate keys, NaN or Infinity, nesting bounded,
            # integers of at most 4300 digits
            m = jsonfile.loads(raw, printable(mpath), OraclesError)
        except OraclesError:
            if want is not None and want != self.digest:
                raise not_pinned() from None
            raise
        if want is not None and want != self.digest:
            if not isinstance(m, dict):
                raise not_pinned()
            fmt = digests.suite_format(m, mpath)
            q = digests.question_digest(m) if fmt >= digests.QUESTION_FORMAT else None
            if want != q:
                raise not_pinned(q, fmt)
        self.manifest = manifest.validate(m, mpath)
        # what the suite asks (digest.py): recomputed, and compared with the manifest's own record
        self.question_digest = digests.checked_question_digest(m, mpath, SUITE_FORMAT)
        # which digest --expect-digest matched: "manifest" pins every bit, "question" what the
        # suite asks (its answers are then tied by `oracles verify`); None when nothing is pinned
        self.pinned = None if want is None else "manifest" if want == self.digest else "question"
        self.cases = {c["id"]: c for c in self.manifest["cases"]}
        self._verified = set()
        self._identity = {}  # (case, file) -> what it was when verified
        if verify:
            self.verify()
        # cases of a user's checkpoint: bound to --checkpoint DIR, refused unless its digest is
        # the one they were generated from (checkpoint_ref.bind), before anything runs
        memo: dict = {}  # checkpoint directory -> its digest, computed once
        self.checkpoint = checkpoint
        self._bound = {cid: bind(e, checkpoint, memo)
                       for cid, e in self.cases.items() if "checkpoint" in e}

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
            self._check_params(cid)
            self._check_model_files(cid)
            self._config(cid)  # a case's config.json, validated before any case is run

    def _check_params(self, cid: str) -> None:
        """The params the manifest gives a case (what an engine reads: its schedule, its depth)
        are the ones recorded in its hashed inputs.safetensors when it was generated."""
        p = self.file(cid, "inputs.safetensors")
        meta = read_metadata(p)
        if "params" not in meta:
            raise OraclesError(f"{p}: no params in its metadata: the case's params cannot be "
                               "checked against its inputs")
        recorded = jsonfile.loads(meta["params"], f"{printable(p)}: metadata params", OraclesError)
        given = self.cases[cid]["params"]
        if _canonical(recorded) != _canonical(given):
            keys = [k for k in sorted(set(given) | set(recorded)) if _canonical(given.get(k))
                    != _canonical(recorded.get(k))] if isinstance(recorded, dict) else []
            raise OraclesError(f"{self.path}: case {cid!r}: the manifest's params"
                               + (f" ({', '.join(printable(k) for k in keys[:3])})" if keys else "")
                               + " differ from those recorded in its inputs.safetensors: the "
                               "manifest was edited; refusing the suite")

    def _check_model_files(self, cid: str) -> None:
        """A model case's checkpoint directory holds exactly its weights (model.safetensors, or
        the shards its index lists) besides config, tokenizer and generation config: an engine
        loads every *.safetensors it finds there, so an extra one would be loaded too."""
        entry = self.cases[cid]
        if not entry["model"] or "checkpoint" in entry:  # (the user's checkpoint: not in the suite)
            return
        files = entry["files"]
        prefix = f"{MODEL_DIR}/" if f"{MODEL_DIR}/config.json" in files else ""
        fmt = self.manifest["format"]
        if (fmt >= 2) != bool(prefix):
            raise OraclesError(f"{self.path}: case {cid!r}: a format-{fmt} suite keeps a model "
                               f"case's checkpoint {'in' if fmt >= 2 else 'beside'} "
                               f"{MODEL_DIR}/, but its files say otherwise")
        names = [f[len(prefix):] for f in files if f.startswith(prefix)]
        if not prefix:
            names = [f for f in names if f not in ("inputs.safetensors", "expected.safetensors")]
        if MODEL_INDEX in names:
            p = self.file(cid, prefix + MODEL_INDEX)
            doc = jsonfile.load(p, OraclesError)
            wm = doc.get("weight_map") if isinstance(doc, dict) else None
            if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
                raise OraclesError(f"{p}: not an index (needs an object weight_map of file names)")
            weights = set(wm.values())
        else:
            weights = {"model.safetensors"}
        allowed = weights | set(MODEL_AUX_FILES) | {MODEL_INDEX}
        extra = sorted(n for n in names if n not in allowed)
        if extra:
            why = ("is not one of the weights " + (f"its index lists" if MODEL_INDEX in names
                                                   else "(model.safetensors)")
                   if extra[0].endswith(".safetensors") else "is not a file a checkpoint holds")
            raise OraclesError(f"{os.path.join(self.case_dir(cid), prefix + extra[0])}: {why}; an "
                               "engine loading the directory would read it: refusing the suite")
        missing = sorted(w for w in weights if w not in names)
        if missing:
            raise OraclesError(f"{self.path}: case {cid!r}: weights file {printable(missing[0])!r} "
                               "is not listed in the manifest's files")

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
        if cid in self._bound:  # the user's checkpoint, its digest checked
            weights = self._bound[cid]
        else:
            weights = read_tensors(self.file(cid, self._listed(cid, "model/model.safetensors",
                                                               "model.safetensors"))) if e["model"] else None
        case = Case(cid, e["kind"], e["pins"], read_tensors(self.file(cid, "inputs.safetensors")),
                    params=e["params"], config=cfg, weights=weights, conventions=e["conventions"],
                    path=d, model_path=md, edge=e.get("edge"))
        return case

    def required(self, cid: str) -> set:
        """The outputs the case's kind requires (its contract, manifest.REQUIRED), from its params
        and config; the manifest may flag more as required, never fewer."""
        def input_shapes():
            try:
                return {k: v[1] for k, v in SafetensorsFile(self.file(cid, "inputs.safetensors")).tensors.items()}
            except RefimplError as e:
                raise OraclesError(str(e)) from None
        need = manifest.contract(self.cases[cid], lambda: self._config(cid), lambda: set(input_shapes()))
        if self.cases[cid]["kind"] == "schedule":  # the schedule against the inputs and outputs
            schedule.check_entry(self.cases[cid], input_shapes(), f"{self.path}: case {cid!r}")
        return need

    def model_dir(self, cid: str) -> str | None:
        """A model case's checkpoint directory (cases/<id>/model since suite format 2, the case
        directory itself in format 1 suites), checked to stay inside the suite; None for
        component cases.  Its files are the ones the manifest lists and hashes."""
        if not self.cases[cid].get("model"):
            return None
        if cid in self._bound:
            return self._bound[cid].path
        if f"{MODEL_DIR}/config.json" in self.cases[cid]["files"]:
            return untrusted.inside(self.path, f"cases/{cid}/{MODEL_DIR}",
                                    f"case {cid!r}: checkpoint directory", kind="dir")
        return self.case_dir(cid)

    def expected(self, cid: str) -> dict:
        """The expected tensors, checked against the manifest's outputs (every output present,
        with the recorded shape and a dtype of its type) and the margins the checker reads."""
        exp = read_tensors(self.file(cid, "expected.safetensors"))
        manifest.check_expected(self.cases[cid], exp, os.path.join(self.case_dir(cid), "expected.safetensors"))
        return exp
