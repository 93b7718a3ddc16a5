"""What checking produces, as named values: one output's comparison, the least-compared required
output of a case, a case's result and the report.  Each serialises to the JSON contract of
`oracles check --json` (docs/conformance.md) with dataclasses.asdict, fields in the report's
order, fields that do not apply (None) left out.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field


def _present(d: dict, keep: tuple = ()) -> dict:
    """d without the fields that do not apply (None), except those in `keep`."""
    return {k: v for k, v in d.items() if v is not None or k in keep}


@dataclass
class OutputResult:
    """One output of a case compared with its expected value."""

    name: str
    type: str  # how it is compared (schema.output_type)
    required: bool
    metrics: dict | None = None  # metric -> value (and compared / positions counts)
    tol: dict | None = None  # metric -> the tolerance it was held to
    status: str | None = None  # pass, fail or not_compared
    message: str | None = None  # why it failed, or what was forgiven

    def as_dict(self) -> dict:
        return _present(dataclasses.asdict(self))


@dataclass(frozen=True)
class Coverage:
    """How much of its required outputs a case compared: the least-compared one (`output`),
    `positions` of `of` token positions compared, `exact_tie_positions` of those left out
    because an exact tie went the other way (they do not count against the case)."""

    output: str
    positions: int
    of: int
    exact_tie_positions: int
    fraction: float  # positions / (of - exact_tie_positions)

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "fraction": round(self.fraction, 6)}


@dataclass
class Comparison:
    """Every output of a case compared, in dataflow order (checking.check.compare)."""

    outputs: list  # [OutputResult], the outputs the candidate gave and the required ones
    not_provided: list  # names of optional outputs the candidate did not give
    assumed: bool  # a routing output it did not give was taken from the golden's margins
    not_compared: str | None = None  # the most positions one output left out, in words
    conditioned: dict | None = None  # {forced, recomputations, routing[, note]} (taint.settle)


@dataclass
class Verdict:
    """A case's verdict from its comparison (checking.check.verdict)."""

    status: str  # pass, fail or inconclusive
    first_failure: str | None
    reason: str | None
    checked: int  # required outputs that passed
    compared: Coverage | None


@dataclass
class CaseResult:
    """One case of the report."""

    id: str
    kind: str
    pins: str
    conventions: dict
    outputs: list = field(default_factory=list)  # [OutputResult]
    not_provided: list = field(default_factory=list)
    not_compared: str | None = None  # positions left out downstream of forgiven routing differences
    conditioned: dict | None = None  # the reference recomputed on the candidate's routing
    checked: int | None = None  # None: the case was not judged (skip, error, missing)
    compared: Coverage | None = None
    first_failure: str | None = None  # written for every status but skip (None when none)
    status: str | None = None  # checking.check.STATUSES
    reason: str | None = None
    repro: str | None = None  # the command that reruns the case alone
    known: dict | None = None  # KNOWN and FIXED (--known): the entry (known.py)
    seconds: float | None = None  # how long checking the case took

    def as_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["outputs"] = [o.as_dict() for o in self.outputs]
        d["compared"] = self.compared.as_dict() if self.compared else None
        d = _present(d, keep=() if self.status == "skip" else ("first_failure",))
        if self.checked is None and "first_failure" in d:  # not judged (error, missing): the
            order = [k for k in d if k not in ("first_failure", "repro")]  # report's order puts
            order += ["first_failure"] + (["repro"] if "repro" in d else [])  # it after the reason
            d = {k: d[k] for k in order}
        return d


@dataclass
class Report:
    """The report of one check: the suite, the candidate, the counts and every case."""

    golden: str
    suite: str | None
    suite_digest: str
    candidate: str
    profile: str
    counts: dict  # status -> number of cases
    checked_outputs: int
    ok: bool
    min_compared: float
    notes: list
    conventions: dict  # topic -> {alternative: passed?}
    cases: list  # [CaseResult]
    question_digest: str | None = None  # what the suite asks (format 3; None for older suites)
    pinned: str | None = None  # which digest --expect-digest matched: manifest or question
    suite_made_with: dict | None = None  # the suite's format, generator and refimpl versions
    known: dict | None = None  # --known: the file, its entries and what they matched
    conditioning: bool = False  # the reference was recomputed on the candidate's routing
    mode: str | None = None  # the profile that emulates the mode the candidate ran in
    profile_vs_mode: str | None = None  # profiles.relation(profile, mode)

    def as_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        d["cases"] = [c.as_dict() for c in self.cases]
        if self.known is None:
            del d["known"]
        if d["profile_vs_mode"] is None:
            del d["profile_vs_mode"]
        return d
