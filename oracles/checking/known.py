"""Known divergences (`oracles check ... --known FILE`): failures an engine team has looked at.

A known file is TOML (docs/known/*.toml are ready ones for the engines of docs/engines.md):

    [[known]]
    case = "model.prefill.negative_biased"   # a glob of case ids (fnmatch: * ? [..])
    output = "layers.*.topk_idx"             # optional: a glob of the first failing output
    profile = "float32"                      # optional: a profile, or a list of them
    status = "fail"                          # optional: fail (default), error, inconclusive, missing
    engine_options = { dtype = "float32" }   # optional: only when the engine ran with these
    reason = "masks dropped groups with 0.0 instead of -inf"
    link = "https://github.com/ml-explore/mlx-lm/blob/v0.32.2/mlx_lm/models/deepseek_v3.py#L213"
    expires = 2027-06-30                     # optional: a date (TOML date or "YYYY-MM-DD")

Each case of a run (after conventions are marked) is matched against the entries that apply to
the run's profile and engine options, in file order:

- a case whose result has an entry's status (and, for `fail`, whose first failing output
  matches the entry's `output`) is KNOWN: it does not fail the run; the report keeps its
  failure and adds the entry's reason and link;
- a case that PASSes although an entry names it is FIXED: it fails the run unless
  `--allow-fixed`, so that the file stays true (remove the entry);
- an entry whose case glob matches no case of the run is reported (a typo, or a case the
  suite no longer has); it does not fail the run;
- an expired entry (today after `expires`) excuses nothing: the case's failure is a failure
  again, and the report says which entry expired. So a known divergence is re-examined at the
  latest on its date; remove or renew the entry.

SKIP and NOT_FOLLOWED cases are left alone. Anything else in the file (an unknown key, a wrong
type, an empty reason or link, an output glob on a status other than fail) is refused with
one line naming the file and the entry, exit 2.
"""

from __future__ import annotations

import dataclasses
import datetime
import fnmatch
import os
from dataclasses import asdict, dataclass, field

from .. import OraclesError
from ..format.tolerances import PROFILES

KNOWN_STATUSES = ("fail", "error", "inconclusive", "missing")
KEYS = ("case", "output", "profile", "status", "engine_options", "reason", "link", "expires")
MAX_BYTES = 1 << 20


@dataclass
class Entry:
    index: int  # 1-based, in file order
    case: str
    reason: str
    link: str
    output: str | None = None
    profiles: tuple | None = None
    status: str = "fail"
    engine_options: dict | None = None
    expires: datetime.date | None = None

    def applies(self, profile: str, engine_options: dict | None) -> bool:
        if self.profiles is not None and profile not in self.profiles:
            return False
        if self.engine_options:
            got = engine_options or {}
            return all(str(got.get(k)) == str(v) for k, v in self.engine_options.items())
        return True

    def names(self, case_id: str) -> bool:
        return fnmatch.fnmatchcase(case_id, self.case)

    def expired(self, today: datetime.date) -> bool:
        return self.expires is not None and today > self.expires

    def explains(self, result) -> bool:
        """Does this entry describe the failure of `result` (a results.CaseResult)?"""
        if result.status != self.status:
            return False
        if self.output is None:
            return True
        first = result.first_failure
        return isinstance(first, str) and fnmatch.fnmatchcase(first, self.output)

    def label(self) -> str:
        return f"entry {self.index} ({self.case}" + (f" at {self.output}" if self.output else "") + ")"

    def summary(self) -> dict:
        d = asdict(self)
        d["profiles"] = list(self.profiles) if self.profiles else None
        d["expires"] = self.expires.isoformat() if self.expires else None
        return d


@dataclass
class KnownFile:
    path: str
    entries: list = field(default_factory=list)  # [Entry]


def _load_toml(path: str) -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10: the tomli backport (a dependency there)
        import tomli as tomllib
    if not os.path.isfile(path):
        raise OraclesError(f"{path}: known-divergences file not found")
    with open(path, "rb") as f:
        raw = f.read(MAX_BYTES + 1)
    if len(raw) > MAX_BYTES:
        raise OraclesError(f"{path}: larger than {MAX_BYTES} bytes: not a known-divergences file")
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise OraclesError(f"{path}: not UTF-8 ({e})") from None
    except tomllib.TOMLDecodeError as e:
        raise OraclesError(f"{path}: not valid TOML ({e})") from None


def _text(d, key, where, required=True):
    v = d.get(key)
    if v is None and not required:
        return None
    if not isinstance(v, str) or not v.strip() or not v.isprintable():
        raise OraclesError(f"{where}: {key!r} must be a non-empty line of text"
                           + ("" if required else " when given"))
    return v


def _date(v, where):
    if isinstance(v, datetime.datetime):
        raise OraclesError(f"{where}: 'expires' must be a date (YYYY-MM-DD), not a date and time")
    if isinstance(v, datetime.date):
        return v
    if isinstance(v, str):
        try:
            return datetime.date.fromisoformat(v)
        except ValueError:
            pass
    raise OraclesError(f"{where}: 'expires' is {v!r}: must be a date, YYYY-MM-DD")


def load(path: str) -> KnownFile:
    """Read and check a known-divergences file (module docstring)."""
    doc = _load_toml(path)
    extra = [k for k in doc if k != "known"]
    if extra:
        raise OraclesError(f"{path}: unknown top-level key {extra[0]!r}: a known file holds "
                           "[[known]] entries only")
    items = doc.get("known", [])
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise OraclesError(f"{path}: 'known' must be an array of tables ([[known]] entries)")
    entries = []
    for i, d in enumerate(items, 1):
        where = f"{path}: entry {i}"
        bad = [k for k in d if k not in KEYS]
        if bad:
            raise OraclesError(f"{where}: unknown key {bad[0]!r} (keys: {', '.join(KEYS)})")
        case = _text(d, "case", where)
        output = _text(d, "output", where, required=False)
        status = d.get("status", "fail")
        if status not in KNOWN_STATUSES:
            raise OraclesError(f"{where}: 'status' is {status!r}: one of {', '.join(KNOWN_STATUSES)}")
        if output is not None and status != "fail":
            raise OraclesError(f"{where}: 'output' names the first failing output of a failure; "
                               f"a {status} has none")
        prof = d.get("profile")
        if prof is not None:
            prof = (prof,) if isinstance(prof, str) else prof
            if not isinstance(prof, (list, tuple)) or not prof or \
                    not all(isinstance(p, str) and p in PROFILES for p in prof):
                raise OraclesError(f"{where}: 'profile' is {d.get('profile')!r}: a profile or a "
                                   f"list of them ({', '.join(PROFILES)})")
            prof = tuple(prof)
        opts = d.get("engine_options")
        if opts is not None and (not isinstance(opts, dict) or not all(
                isinstance(v, (str, int, float, bool)) for v in opts.values())):
            raise OraclesError(f"{where}: 'engine_options' must be a table of option = value")
        expires = _date(d["expires"], where) if "expires" in d else None
        entries.append(Entry(i, case, _text(d, "reason", where), _text(d, "link", where), output,
                             prof, status, opts, expires))
    return KnownFile(path, entries)


def apply(known: KnownFile, results: list, profile: str, engine_options: dict | None = None,
          today: datetime.date | None = None) -> tuple[list, dict]:
    """The report's case results (results.CaseResult) with KNOWN and FIXED marked (module
    docstring) -> (the new results, the report's "known" section: the file, every entry with
    the cases it matched, and notes)."""
    today = today or datetime.date.today()
    opts = _options(engine_options)
    live = [e for e in known.entries if e.applies(profile, opts)]
    matched = {e.index: [] for e in known.entries}
    notes, out = [], []
    for r in results:
        naming = [e for e in live if e.names(r.id)]
        for e in naming:
            matched[e.index].append(r.id)
        out.append(_marked(known, r, naming, today, notes))
    unmatched = [e for e in live if not matched[e.index]]
    entries = []
    for e in known.entries:
        s = e.summary()
        s.update(applies=e in live, matched=matched[e.index], expired=e.expired(today))
        entries.append(s)
    return out, {"file": known.path, "today": today.isoformat(), "entries": entries,
                 "unmatched": [e.index for e in unmatched], "notes": notes,
                 "unmatched_notes": [f"known {e.label()} matches no case of this run"
                                     for e in unmatched]}


def _marked(known: KnownFile, r, naming: list, today, notes: list):
    """One case result, KNOWN or FIXED when an entry says so (notes: why not, when one names it)."""
    if not naming or r.status in ("skip", "not_followed"):
        return r
    if r.status == "pass":
        e = next((e for e in naming if not e.expired(today)), None)
        if e is None:
            notes.append(f"{r.id}: passes; known {naming[0].label()} expired on "
                         f"{naming[0].expires.isoformat()}: remove it")
            return r
        return dataclasses.replace(r, status="fixed", known=_record(known, e),
                                   reason=f"passes, but known {e.label()} expects "
                                          f"{e.status.upper()}: {e.reason}")
    e = next((e for e in naming if e.explains(r)), None)
    if e is None:
        notes.append(f"{r.id}: known {naming[0].label()} names this case, but not this "
                     f"{r.status.upper()} (at {r.first_failure or r.status})")
        return r
    if e.expired(today):
        notes.append(f"{r.id}: known {e.label()} expired on {e.expires.isoformat()}: its "
                     f"{r.status.upper()} counts again ({e.reason})")
        return r
    return dataclasses.replace(r, status="known", known=_record(known, e), repro=None)


def _record(known: KnownFile, e: Entry) -> dict:
    """What a KNOWN or FIXED case records of its entry (status: the one the entry declares)."""
    return {"file": known.path, "entry": e.index, "status": e.status, "reason": e.reason,
            "link": e.link, **({"expires": e.expires.isoformat()} if e.expires else {})}


def _options(engine_options):
    return None if engine_options is None else dict(engine_options)
