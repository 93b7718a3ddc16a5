"""A pytest plugin (entry point `pytest11: oracles`): a golden suite as pytest items.

    pytest --oracles-golden GOLDEN (--oracles-engine NAME [--oracles-engine-option K=V ...]
                                    | --oracles-adapter pkg.mod:factory | --oracles-candidate DIR)
           [--oracles-profile P] [--oracles-known FILE] [--oracles-only GLOB]
           [--oracles-expect-digest HEX] [--oracles-case-timeout S]
           [--oracles-allow-inconclusive] [--oracles-allow-fixed]

One item per golden case, named by its case id (so `-k`, `--lf` and `--deselect` select cases;
`-k` also matches the case's kind), under the collector `oracles`. Each item runs its case
through the same machinery as `oracles check` (the suite opened and verified once, every case's
contract checked at collection, check.check_case, conventions marked as in a run, known.apply):
PASS and NOT_FOLLOWED pass; FAIL, MISSING and ERROR fail with the first failing output and its
numbers and the command that reproduces the case; SKIP skips with its reason; INCONCLUSIVE fails
(skips with --oracles-allow-inconclusive). A case that a known entry names is marked
xfail(strict=True): its known failure is XFAIL with the entry's reason, a pass is XPASS(strict),
which fails (FIXED; --oracles-allow-fixed makes it non-strict), and any other failure of it fails
as usual. The engine (or adapter) is built once per session, on the first case that runs.

Without --oracles-golden the plugin only registers its options: a project's own test run is
left alone.
"""

from __future__ import annotations

import argparse
import copy
import shlex

import pytest


def pytest_addoption(parser):
    g = parser.getgroup("oracles", "DeepSeek-V3 golden suites (oracles check as pytest items)")
    g.addoption("--oracles-golden", metavar="DIR", help="a golden suite: one pytest item per case")
    g.addoption("--oracles-engine", metavar="NAME", help="a built-in engine adapter "
                                                        "(transformers, mlx, llama.cpp, vllm)")
    g.addoption("--oracles-engine-option", action="append", default=[], metavar="KEY=VALUE",
                help="an engine setting; repeatable")
    g.addoption("--oracles-adapter", metavar="MOD:FACTORY", help="a Python engine adapter")
    g.addoption("--oracles-candidate", metavar="DIR",
                help="a candidate directory (cases/<id>/outputs.safetensors)")
    g.addoption("--oracles-profile", default="float32", metavar="P", help="tolerance profile")
    g.addoption("--oracles-known", metavar="FILE", help="known divergences (TOML): xfail(strict)")
    g.addoption("--oracles-only", metavar="GLOB", help="comma-separated globs of case ids")
    g.addoption("--oracles-expect-digest", metavar="HEX",
                help="refuse the suite unless HEX is its question or manifest digest")
    g.addoption("--oracles-case-timeout", type=float, default=600.0, metavar="SECONDS")
    g.addoption("--oracles-allow-inconclusive", action="store_true")
    g.addoption("--oracles-allow-fixed", action="store_true",
                help="a known failure that passes is XPASS, not a failure")


def pytest_configure(config):
    opts = {k: config.getoption(k) for k in ("oracles_engine", "oracles_adapter",
                                              "oracles_candidate", "oracles_known", "oracles_only")}
    if not config.getoption("oracles_golden"):
        given = [k for k, v in opts.items() if v] + (
            ["oracles_engine_option"] if config.getoption("oracles_engine_option") else [])
        if given:
            raise pytest.UsageError(f"--{given[0].replace('_', '-')} needs --oracles-golden")
        return
    ways = [k for k in ("oracles_engine", "oracles_adapter", "oracles_candidate") if opts[k]]
    if len(ways) != 1:
        raise pytest.UsageError("--oracles-golden needs exactly one of --oracles-engine, "
                                "--oracles-adapter or --oracles-candidate")
    if config.getoption("oracles_engine_option") and not opts["oracles_engine"]:
        raise pytest.UsageError("--oracles-engine-option needs --oracles-engine")
    config.addinivalue_line("markers", "oracles: a golden case of oracles (pytest plugin)")
    config.pluginmanager.register(OraclesRun(config), "oracles-run")


class KnownFailure(Exception):
    """A case's failure that a known entry describes (the xfail's `raises`)."""


class CaseFailure(Exception):
    """A case's FAIL, MISSING, ERROR, INCONCLUSIVE: its report line."""


class OraclesRun:
    """The session's suite, candidate and results."""

    def __init__(self, config):
        self.config = config
        self.golden_path = config.getoption("oracles_golden")
        self.profile = config.getoption("oracles_profile")
        self.known = None
        self.golden = None
        self._candidate = None  # built on first use
        self._candidate_error = None
        self.info = None
        self.raw = {}  # case id -> check_case's result
        self.matched = {}  # known entry index -> case ids its glob matched in this run
        self.notes = []
        self.how = None
        self.entries = []

    # collection ------------------------------------------------------------------------------

    def pytest_sessionstart(self, session):
        """Open the suite (verified once), read the known file, check every case's contract:
        a bad suite or option is one line and pytest's usage-error exit, before anything runs."""
        from . import OraclesError, tolerance
        from .golden import Golden
        from .schema import matches

        config = self.config
        try:
            if self.profile not in tolerance.PROFILES:
                raise OraclesError(f"--oracles-profile {self.profile!r} is not one of "
                                   f"{', '.join(tolerance.PROFILES)}")
            if config.getoption("oracles_known"):
                from .known import load

                self.known = load(config.getoption("oracles_known"))
            self.golden = Golden(self.golden_path,
                                 expect_digest=config.getoption("oracles_expect_digest"))
            self.entries = [e for e in self.golden.manifest["cases"]
                            if matches(e["id"], config.getoption("oracles_only"))]
            if not self.entries:
                raise OraclesError(f"{self.golden_path}: no case matches --oracles-only "
                                   f"{config.getoption('oracles_only')!r}")
            for e in self.entries:  # every case's contract, before running anything
                self.golden.required(e["id"])
        except OraclesError as e:
            from refimpl.errors import printable

            raise pytest.UsageError(f"oracles: {printable(e)}") from None

    @pytest.hookimpl(wrapper=True)
    def pytest_make_collect_report(self, collector):
        """The session collects the `oracles` collector next to whatever else it collects."""
        rep = yield
        if isinstance(collector, pytest.Session) and rep.passed:
            rep.result.append(OraclesCollector.from_parent(collector, name="oracles"))
        return rep

    def items(self, parent):
        out = []
        for e in self.entries:
            item = OraclesCase.from_parent(parent, name=e["id"])
            item.extra_keyword_matches.add(e["kind"])
            item.add_marker(pytest.mark.oracles)
            entry = self._known_entry(e["id"])
            if entry is not None:
                item.add_marker(pytest.mark.xfail(
                    strict=not self.config.getoption("oracles_allow_fixed"), raises=KnownFailure,
                    reason=f"known {entry.status.upper()}: {entry.reason} ({entry.link})"))
            out.append(item)
        return out

    def _live_entries(self):
        import datetime

        if self.known is None:
            return []
        opts = self.info["options"] if self.info else None
        today = datetime.date.today()
        return [e for e in self.known.entries
                if e.applies(self.profile, opts) and not e.expired(today)]

    def _known_entry(self, cid):
        """The first unexpired known entry that names this case (engine options are known only
        once the engine is built: entries with engine_options are matched at run time)."""
        return next((e for e in self._live_entries() if e.names(cid) and not e.engine_options), None)

    # running ---------------------------------------------------------------------------------

    def candidate(self):
        if self._candidate is None and self._candidate_error is None:
            from . import OraclesError

            try:
                self._candidate, self.info, self.how = self._build()
            except OraclesError as e:
                self._candidate_error = str(e)
        if self._candidate_error is not None:
            raise CaseFailure(f"the candidate could not be built: {self._candidate_error}")
        return self._candidate

    def _build(self):
        """The same candidates as `oracles check` (cli): a directory, --adapter or --engine."""
        c = self.config
        if c.getoption("oracles_candidate"):
            from .check import DirCandidate
            from .engines import RecordedSkips, read_info

            d = c.getoption("oracles_candidate")
            cand, info = DirCandidate(d), read_info(d)
            if info:
                cand = RecordedSkips(cand, info.pop("skipped"))
            return cand, info, shlex.quote(d)
        from .cli import _candidate_adapter

        ns = argparse.Namespace(adapter=c.getoption("oracles_adapter"),
                                engine=c.getoption("oracles_engine"),
                                engine_option=c.getoption("oracles_engine_option"),
                                case_timeout=c.getoption("oracles_case_timeout"))
        return _candidate_adapter(ns)

    def _check(self, cid):
        from .check import check_case

        if cid not in self.raw:
            cand = self.candidate()
            stuck = getattr(cand, "stuck", None)
            if stuck:
                e = self.golden.cases[cid]
                self.raw[cid] = {"id": cid, "kind": e["kind"], "pins": e["pins"],
                                 "conventions": e.get("conventions", {}), "outputs": [],
                                 "not_provided": [], "status": "error", "first_failure": None,
                                 "reason": f"not run: the adapter is stuck ({stuck})"}
            else:
                self.raw[cid] = check_case(self.golden, self.golden.cases[cid], cand, self.profile)
        return copy.deepcopy(self.raw[cid])

    def result(self, cid) -> dict:
        """The case's result as `oracles check` reports it: conventions marked against the other
        alternatives of its topic, known entries applied."""
        from .check import _mark_alternatives

        r = self._check(cid)
        topics = set(r.get("conventions", {}))
        if topics and r["status"] in ("fail", "inconclusive"):
            group = [r] + [self._check(o) for o, e in self.golden.cases.items()
                           if o != cid and topics & set(e.get("conventions", {}))]
            _mark_alternatives(group)
        if self.known is not None:
            from .known import apply

            section = apply(self.known, [r], self.profile, self.info["options"] if self.info else None)
            self.notes += section["notes"]  # (entries matching nothing: at the end of the run)
            for e in section["entries"]:
                self.matched.setdefault(e["index"], []).extend(e["matched"])
        if r["status"] in ("fail", "missing", "error", "inconclusive") and self.how:
            r["repro"] = (f"oracles check {shlex.quote(self.golden_path)} {self.how} --only "
                          f"{shlex.quote(cid)} --profile {self.profile}")
        return r

    # reporting -------------------------------------------------------------------------------

    def pytest_report_header(self, config):
        return [f"oracles: {self.golden_path}, {self.profile} profile"
                + (f", known divergences from {config.getoption('oracles_known')}"
                   if config.getoption("oracles_known") else "")]

    def pytest_terminal_summary(self, terminalreporter):
        if self.golden is None:
            return
        from .untrusted import escape

        tr = terminalreporter
        tr.section("oracles")
        tr.write_line(f"suite digest (sha256 of manifest.json): {self.golden.digest}")
        if self.golden.question_digest:
            tr.write_line(f"question digest (what the suite asks): {self.golden.question_digest}")
        if self.info:
            from .engines import label

            tr.write_line(escape(f"engine: {label(self.info)}"))
        for n in dict.fromkeys(self.notes):
            tr.write_line(escape(f"oracles: {n}"))
        if self.known is not None and self.raw:
            for e in self._live_entries():
                if not self.matched.get(e.index):
                    tr.write_line(escape(f"oracles: known {e.label()} matched no case that ran"))


class OraclesCollector(pytest.Collector):
    """The suite's cases, one item each."""

    def collect(self):
        return self.config.pluginmanager.get_plugin("oracles-run").items(self)


class OraclesCase(pytest.Item):
    entry: dict

    def _run(self):
        return self.config.pluginmanager.get_plugin("oracles-run")

    def runtest(self):
        run = self._run()
        r = run.result(self.name)
        st = r["status"]
        if st in ("pass", "not_followed"):
            return
        if st == "skip":
            pytest.skip(f"{r.get('reason', '')}")
        marked = self.get_closest_marker("xfail") is not None
        if st == "fixed":
            # the xfail(strict) marker turns this pass into XPASS(strict), a failure; an entry
            # that names engine options is matched only now, without a marker
            if marked or self.config.getoption("oracles_allow_fixed"):
                return
            raise CaseFailure(_message(r))
        if st == "inconclusive" and self.config.getoption("oracles_allow_inconclusive"):
            pytest.skip(f"inconclusive (allowed): {r.get('reason', '')}")
        if st == "known":
            if not marked:
                pytest.xfail(f"known {r['known']['status'].upper()}: {r['known']['reason']} "
                             f"({r['known']['link']})")
            raise KnownFailure(_message(r))
        raise CaseFailure(_message(r))

    def repr_failure(self, excinfo, style=None):
        if isinstance(excinfo.value, (CaseFailure, KnownFailure)):
            return str(excinfo.value)
        return super().repr_failure(excinfo, style)

    def reportinfo(self):
        return self._run().golden_path, None, f"oracles case {self.name}"


def _message(r: dict) -> str:
    from .untrusted import escape

    lines = [f"{r['id']} ({r['kind']}): {r['status'].upper()}: {r.get('reason', '')}"]
    for o in r.get("outputs", []):
        if o.get("status") == "fail":
            lines.append(f"  {o['name']}: {o.get('message', '')}")
    if r.get("known"):
        k = r["known"]
        lines.append(f"  known entry {k['entry']} of {k['file']}: {k['reason']} ({k['link']})")
    if r.get("repro"):
        lines.append(f"  reproduce: {r['repro']}")
    return "\n".join(escape(x) for x in lines)
