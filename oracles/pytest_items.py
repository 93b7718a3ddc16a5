"""The pytest plugin's items and run (pytest_plugin.py registers them with --oracles-golden):
the suite opened once, one item per case, each run through the checker of `oracles check`."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import shlex

import pytest
from refimpl.errors import printable

from . import OraclesError, cli, engines
from .checking import candidates, known as known_divergences
from .checking.check import check_case, mark_alternatives, repro_line
from .checking.results import CaseResult
from .checking.worker import check_timeout
from .format import tolerances
from .format.golden import Golden
from .format.profiles import choose, relation
from .format.schema import matches
from .format.untrusted import escape


class KnownFailure(Exception):
    """A case's failure that a known entry describes (the xfail's `raises`)."""


class CaseFailure(Exception):
    """A case's FAIL, MISSING, ERROR, INCONCLUSIVE: its report line."""


class OraclesRun:
    """The session's suite, candidate and results."""

    def __init__(self, config):
        self.config = config
        self.golden_path = config.getoption("oracles_golden")
        self.profile = None  # chosen at the start of the session, as `oracles check` chooses it
        self.mode = None  # the candidate's recorded mode (None: not known)
        self.versus = None  # the profile against that mode (profiles.relation)
        self.conditioner = None
        self.known = None
        self.golden = None
        self._candidate = None
        self.info = None
        self.raw = {}  # case id -> check_case's result
        self.not_run = set()  # cases not run: the adapter was stuck (no reproduce line)
        self.matched = {}  # known entry index -> case ids its glob matched in this run
        self.notes = []
        self.how = None
        self.repro = None  # `oracles check GOLDEN CANDIDATE ...` (cli.repro_base)
        self.entries = []

    # collection ------------------------------------------------------------------------------

    def pytest_sessionstart(self, session):
        """Open the suite (verified once), read the known file, check every case's contract,
        build the candidate and judge it as `oracles check` does: the profile of the mode it
        recorded unless --oracles-profile (one emulating FP8 the run did not have refused unless
        --oracles-any-profile), the goldens conditioned on its routing unless
        --oracles-no-conditioning. A bad suite, option or candidate is one line and pytest's
        usage-error exit, before any case runs."""
        config = self.config
        try:
            given = config.getoption("oracles_profile")
            if given is not None and given not in tolerances.PROFILES:
                raise OraclesError(f"--oracles-profile {given!r} is not one of "
                                   f"{', '.join(tolerances.PROFILES)}")
            check_timeout(config.getoption("oracles_case_timeout"))  # 0 to 1e6, as --case-timeout
            if config.getoption("oracles_known"):
                self.known = known_divergences.load(config.getoption("oracles_known"))
            self.golden = Golden(self.golden_path,
                                 expect_digest=config.getoption("oracles_expect_digest"))
            self.entries = [e for e in self.golden.manifest["cases"]
                            if matches(e["id"], config.getoption("oracles_only"))]
            if not self.entries:
                raise OraclesError(f"{self.golden_path}: no case matches --oracles-only "
                                   f"{config.getoption('oracles_only')!r}")
            for e in self.entries:  # every case's contract, before running anything
                self.golden.required(e["id"])
            self._candidate, self.info, self.how = self._build()
            # the mode is known once the engine is built (an adapter process reports it)
            self.mode = candidates.run_mode(self._candidate, self.info)
            self.profile = choose(given, self.mode, config.getoption("oracles_any_profile"),
                                  flag="--oracles-profile", any_flag="--oracles-any-profile")
            self.versus = relation(self.profile, self.mode)
            no_cond = config.getoption("oracles_no_conditioning")
            self.conditioner = cli.conditioner(no_cond)
            self.repro = cli.repro_base(self.golden_path, self.how,
                                        config.getoption("oracles_engine"), no_cond,
                                        config.getoption("oracles_any_profile"))
        except OraclesError as e:
            self._close(abort=True)
            raise pytest.UsageError(f"oracles: {printable(e)}") from None
        except BaseException:
            self._close(abort=True)
            raise

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

    def _build(self):
        """The same candidates as `oracles check` (cli): a directory, --adapter or --engine,
        built now (an adapter process: its factory awaited), once per session."""
        c = self.config
        if c.getoption("oracles_candidate"):
            d = c.getoption("oracles_candidate")
            cand, info = candidates.DirCandidate(d), engines.read_info(d)
            if info:
                cand = engines.RecordedSkips(cand, info.pop("skipped"), info.pop("errors"))
            return cand, info, shlex.quote(d)
        ns = argparse.Namespace(adapter=c.getoption("oracles_adapter"),
                                engine=c.getoption("oracles_engine"),
                                engine_option=c.getoption("oracles_engine_option"),
                                case_timeout=c.getoption("oracles_case_timeout"),
                                in_process=c.getoption("oracles_in_process"), prespawned=None)
        cand, how = cli._candidate_adapter(ns)
        self._candidate = cand  # (closed if what follows fails)
        if hasattr(cand, "bind"):  # an adapter process: the cases come in pytest's order, one by one
            cand.bind(self.golden, [])
        return cand, getattr(cand, "info", None), how

    def _close(self, abort: bool = False):
        """The adapter's close() where it was built (its process ended, or its thread)."""
        cand, self._candidate = self._candidate, None
        if cand is not None:
            cli._close(cand, abort=abort)

    def pytest_sessionfinish(self, session):
        self._close()

    def _check(self, cid) -> CaseResult:
        if cid not in self.raw:
            cand = self._candidate
            stuck = getattr(cand, "stuck", None)
            e = self.golden.cases[cid]
            if stuck:
                self.not_run.add(cid)
                self.raw[cid] = CaseResult(cid, e["kind"], e["pins"], e.get("conventions", {}),
                                           status="error",
                                           reason=f"not run: the adapter is stuck ({stuck})")
            else:
                self.raw[cid] = check_case(self.golden, e, cand, self.profile,
                                           conditioner=self.conditioner)
        return self.raw[cid]

    def result(self, cid) -> dict:
        """The case's result as `oracles check` reports it (a dict, its JSON): conventions
        marked against the other alternatives of its topic, known entries applied."""
        r = self._check(cid)
        topics = set(r.conventions)
        if topics and r.status in ("fail", "inconclusive"):
            group = [r] + [self._check(o) for o, e in self.golden.cases.items()
                           if o != cid and topics & set(e.get("conventions", {}))]
            r = mark_alternatives(group)[0]
        if self.known is not None:
            (r,), section = known_divergences.apply(self.known, [r], self.profile,
                                                    self.info["options"] if self.info else None)
            self.notes += section["notes"]  # (entries matching nothing: at the end of the run)
            for e in section["entries"]:
                self.matched.setdefault(e["index"], []).extend(e["matched"])
        if r.status in ("fail", "missing", "error", "inconclusive") and cid not in self.not_run:
            r = dataclasses.replace(r, repro=repro_line(self.repro, cid, self.profile))
        return r.as_dict()

    # reporting -------------------------------------------------------------------------------

    def pytest_report_header(self, config):
        lines = [f"oracles: {self.golden_path}, {self.profile} profile"
                 + (f", known divergences from {config.getoption('oracles_known')}"
                    if config.getoption("oracles_known") else "")]
        if self.versus:  # how the profile relates to the mode the run recorded
            lines.append(f"oracles: profile {self.profile}: {self.versus}")
        lines.append("oracles: the goldens are " + (
            "conditioned on the candidate's routing where it resolved a near-tie the other way"
            if self.conditioner is not None else
            "not conditioned on the candidate's routing (--oracles-no-conditioning): what a "
            "near-tie it resolved the other way reaches is left out"))
        return [escape(x) for x in lines]

    def pytest_terminal_summary(self, terminalreporter):
        if self.golden is None:
            return
        tr = terminalreporter
        tr.section("oracles")
        tr.write_line(f"suite digest (sha256 of manifest.json): {self.golden.digest}")
        if self.golden.question_digest:
            tr.write_line(f"question digest (what the suite asks): {self.golden.question_digest}")
        if self.info:
            tr.write_line(escape(f"engine: {engines.label(self.info)}"))
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
