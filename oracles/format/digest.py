"""A suite's two digests: what it asks, and every bit of it.

- The **manifest digest** (`suite_digest`) is the sha256 of manifest.json. It covers every file's
  sha256, so it pins every bit of a suite, expected values and calibrated tolerances included.
  Those last bits depend on the machine that generated the suite (its BLAS kernel and thread
  count, numpy's SIMD transcendental functions; docs/conformance.md section 8 has the
  measurements), so two machines that run the same `oracles generate` get two manifest digests.
- The **question digest** (`question_digest`, suite format 3) is the sha256 of the manifest with
  what the machine computed left out: the expected values (the sha256 of expected.safetensors),
  the calibrated tolerances, and the generator's environment (oracles, refimpl, numpy,
  ml_dtypes, Python, platform). What is left is what the suite asks: the format, the suite, its
  cases' ids, kinds, params (schedules included), conventions, input, output and aux names with
  shapes and dtypes, the sha256 of every input and model file (configs, weights, tokenizers),
  and the tolerance rule (K, floors, which emulation calibrates each profile). Inputs and model
  files are drawn from seeded generators and stored as drawn, so the same command gives the
  same question digest on every machine. `oracles verify` ties a suite's answers (expected
  values and tolerances) to this machine's regeneration of them.

The question digest is computed from the manifest as read (canonical JSON: sorted keys, no
whitespace, ASCII), never taken from the manifest's own field, which is only compared with it.
"""

from __future__ import annotations

import hashlib
import json

from .. import OraclesError

# the first suite format whose manifest records its question digest
QUESTION_FORMAT = 3
# top-level fields that describe the machine and the versions that made the suite
MACHINE_FIELDS = ("generator", "refimpl", "numpy", "ml_dtypes", "python", "platform",
                  "question_digest")
# per case: what the machine computed
ANSWER_FIELDS = ("tolerances",)
ANSWER_FILES = ("expected.safetensors",)


def question(m: dict) -> dict:
    """The manifest without what the machine computed (module docstring)."""
    q = {k: v for k, v in m.items() if k not in MACHINE_FIELDS}
    cases = []
    for e in m.get("cases", []) if isinstance(m.get("cases"), list) else []:
        if not isinstance(e, dict):
            cases.append(e)
            continue
        c = {k: v for k, v in e.items() if k not in ANSWER_FIELDS}
        if isinstance(c.get("files"), dict):
            c["files"] = {f: h for f, h in c["files"].items() if f not in ANSWER_FILES}
        cases.append(c)
    if "cases" in m:
        q["cases"] = cases if isinstance(m["cases"], list) else m["cases"]
    return q


# top-level fields that say how the tolerances are made: part of what a suite asks, not of what a
# candidate is asked to compute
RULE_FIELDS = ("tolerance_rule", "tolerance_k", "floors", "calibrated_by")


def inputs_digest(m: dict) -> str:
    """sha256 of the canonical JSON of question(m) without RULE_FIELDS: what a candidate is asked
    to compute (cases, params, inputs, model files, output names and shapes). Two suites with the
    same inputs digest take the same outputs, however their tolerances are made; the engine
    matrix's --rejudge judges an earlier run's outputs against a suite regenerated after the
    tolerance rule changed by it."""
    q = {k: v for k, v in question(m).items() if k not in RULE_FIELDS}
    text = json.dumps(q, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def question_digest(m: dict) -> str:
    """sha256 of the canonical JSON of question(m)."""
    text = json.dumps(question(m), sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def suite_format(m: dict, mpath: str) -> int:
    """The manifest's "format" (1 when absent: the first suites did not record it)."""
    fmt = m.get("format", 1)
    if isinstance(fmt, bool) or not isinstance(fmt, int) or fmt < 1:
        raise OraclesError(f"{mpath}: field 'format' is {fmt!r}: must be a positive integer")
    return fmt


def checked_question_digest(m: dict, mpath: str, newest: int) -> str | None:
    """A format >= 3 manifest's question digest, recomputed and compared with the one it records
    (refused when it records none or another); None for older formats, which record none."""
    fmt = suite_format(m, mpath)
    if fmt > newest:
        raise OraclesError(f"{mpath}: suite format {fmt} is newer than this checker reads "
                           f"(up to {newest}); update oracles")
    if fmt < QUESTION_FORMAT:
        return None
    stored = m.get("question_digest")
    if not isinstance(stored, str):
        raise OraclesError(f"{mpath}: field 'question_digest' is missing or not a string: a format "
                           f"{fmt} suite records the digest of what it asks")
    got = question_digest(m)
    if stored != got:
        raise OraclesError(f"{mpath}: field 'question_digest' is {stored[:16]}..., but the "
                           f"manifest's questions hash to {got[:16]}...: the suite was edited")
    return got
