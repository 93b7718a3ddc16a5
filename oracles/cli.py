"""The `oracles` command line (DESIGN.md section 5). User errors: one line, exit 2.

    oracles list     [--suite NAME]
    oracles generate --out DIR [--suite NAME] [--only GLOB]
    oracles check    GOLDEN [CANDIDATE | --adapter pkg.mod:factory] [--profile P] [--any-profile] [--only GLOB] [--json REPORT]
                     [--html REPORT.html] [--expect-digest HEX] [--case-timeout SECONDS] [--allow-empty] [--allow-inconclusive]
                     [--no-conditioning]
    (the profile defaults to the one that emulates the candidate's recorded mode, else float32)
    oracles run      GOLDEN --adapter pkg.mod:factory --out CANDIDATE [--expect-digest HEX] [--case-timeout S]
    oracles verify   GOLDEN [--only GLOB] [--expect-digest HEX] [--json REPORT]
    oracles diff     OLD.json NEW.json [--factor F] [--json OUT]
    oracles search   (--adapter pkg.mod:factory | --engine NAME) --out DIR [--profile P] [--max-examples N]
                     [--deadline S] [--seed N] [--database DIR | --no-database] [--kinds K,..] [--pin AXIS=VALUE]
    check also takes --known KNOWN.toml [--allow-fixed] (known divergences) and --junit REPORT.xml.
    check, run and search also take --engine transformers|mlx|llama.cpp|vllm [--engine-option KEY=VALUE]
    (the built-in engine adapters, oracles/engines/) in place of --adapter, and --in-process
    (the adapter in this process rather than a child process, checking/isolated.py: debugging).

check exits 0 when every checked case passes (or fails as its --known file declares: KNOWN); 1
when a case fails, is missing, errs (the adapter raised, exited, crashed or timed out), is
inconclusive, or passes although the known file declares it failing (FIXED), or when nothing was
checked at all; verify exits 1 when a regenerated case differs beyond its level, diff when a case
regressed, search when it found a divergence; 2 on bad input (one line on stderr, text from files
escaped); 130 when interrupted.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import sys
import time

from refimpl.atomic import atomic_directory, check_destination, distinct_destinations, write_text
from refimpl.errors import RefimplError, printable

from . import OraclesError, engines
from .checking import candidates, diff, isolated, junit, known, report_html
from .checking.check import run_check
from .checking.report import format_report
from .checking.worker import MAX_CASE_TIMEOUT, check_timeout, split_spec
from .format import tolerances
from .format.profiles import choose
from .format.untrusted import escape

# The authoring layer (suites, case kinds, the writer, verify, the search) runs refimpl's
# forward pass: `list`, `generate`, `verify` and `search` import it when they run, so that
# checking a suite never loads it.


def _progress(args):
    if getattr(args, "quiet", False) or not sys.stderr.isatty():
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line and exit 2, like every other user error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {escape(message)} (see {self.prog} --help)\n")


def _seconds(text):
    """--case-timeout: seconds, 0 (no limit) or from 0 to worker.MAX_CASE_TIMEOUT (1e6)."""
    try:
        return check_timeout(text)
    except OraclesError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds from 0 (no limit) "
                                         f"to {MAX_CASE_TIMEOUT:g}") from None


def _parser():
    p = _Parser(prog="oracles", description="golden suites and a checker for "
                                                            "DeepSeek-V3 engines")
    sub = p.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    ls = sub.add_parser("list", help="suites, or the cases of one suite")
    ls.add_argument("--suite")
    g = sub.add_parser("generate", help="write a golden suite")
    g.add_argument("--out", required=True)
    g.add_argument("--suite", default="default")
    g.add_argument("--only", help="comma-separated globs of case ids")
    g.add_argument("--quiet", action="store_true")
    g.add_argument("--checkpoint", metavar="DIR",
                   help="a golden of this checkpoint (referenced by digest, never copied): model "
                        "cases on --tokens instead of a built-in suite")
    g.add_argument("--tokens", metavar="FILE", help="with --checkpoint: .npy of token ids [batch, seq]")
    g.add_argument("--layers", type=int, default=None, metavar="N",
                   help="with --checkpoint: keep the first N decoder layers (plus the head)")
    g.add_argument("--new-tokens", type=int, default=4, metavar="N",
                   help="with --checkpoint: greedy tokens of the greedy case (default 4)")
    g.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="compute the cases on Ray workers: a local cluster, or join ADDRESS")
    c = sub.add_parser("check", help="check a candidate against a golden suite")
    c.add_argument("golden")
    c.add_argument("candidate", nargs="?", help="directory with cases/<id>/outputs.safetensors")
    c.add_argument("--adapter", help="pkg.module:factory of a Python engine adapter")
    _engine_args(c)
    c.add_argument("--profile", help="the tolerance profile (default: the one that emulates the "
                                      "candidate's recorded mode, else float32)")
    c.add_argument("--any-profile", action="store_true",
                   help="judge with a profile that emulates FP8 weights or an FP8 KV cache the run "
                        "did not have (the report says it is not this run's verdict)")
    c.add_argument("--only", help="comma-separated globs of case ids")
    c.add_argument("--json", dest="json_out", help="write the report as JSON here")
    c.add_argument("--expect-digest", metavar="HEX",
                   help="refuse the suite unless HEX is its manifest digest (sha256 of manifest.json, "
                        "every bit) or its question digest (what it asks, the same on every machine)")
    c.add_argument("--case-timeout", type=_seconds, default=600.0, metavar="SECONDS",
                   help="stop an adapter call that takes longer (default 600, at most 1e6; 0: no "
                        "limit; with --in-process 0 runs the calls in the main thread)")
    c.add_argument("--allow-empty", action="store_true",
                   help="exit 0 even if no required output was compared (all skipped or declined)")
    c.add_argument("--allow-inconclusive", action="store_true",
                   help="exit 0 even if a case compared too few positions to decide")
    c.add_argument("--html", dest="html_out", help="write the report as one self-contained HTML page here")
    c.add_argument("--no-conditioning", action="store_true",
                   help="do not recompute the reference on the candidate's routing where it resolved a "
                        "near-tie the other way: leave out what that reaches instead (section 3 of "
                        "docs/conformance.md)")
    c.add_argument("--junit", dest="junit_out", metavar="FILE",
                   help="write the report as JUnit XML here (one test case per golden case)")
    c.add_argument("--known", metavar="FILE",
                   help="a TOML file of known divergences: those failures are KNOWN, not failing")
    c.add_argument("--allow-fixed", action="store_true",
                   help="exit 0 even if a known failure now passes (FIXED)")
    c.add_argument("--checkpoint", metavar="DIR",
                   help="the checkpoint a checkpoint golden was generated from (its digest must match)")
    c.add_argument("--quiet", action="store_true")
    v = sub.add_parser("verify", help="regenerate a suite's expected values and tolerances here "
                                      "and compare them with the suite's")
    v.add_argument("golden")
    v.add_argument("--only", help="comma-separated globs of case ids")
    v.add_argument("--expect-digest", metavar="HEX",
                   help="refuse the suite unless HEX is its question or manifest digest")
    v.add_argument("--json", dest="json_out", help="write the verification as JSON here")
    v.add_argument("--quiet", action="store_true")
    d = sub.add_parser("diff", help="what changed between two check reports (--json) of one suite")
    d.add_argument("old")
    d.add_argument("new")
    d.add_argument("--factor", type=float, default=10.0,
                   help="flag outputs whose error / tolerance moved by more than this (default 10)")
    d.add_argument("--json", dest="json_out", help="write the differences as JSON here")
    r = sub.add_parser("run", help="run an adapter and write its outputs (the file route)")
    r.add_argument("golden")
    r.add_argument("--adapter")
    _engine_args(r)
    r.add_argument("--out", required=True)
    r.add_argument("--only")
    r.add_argument("--case-timeout", type=_seconds, default=600.0, metavar="SECONDS")
    r.add_argument("--expect-digest", metavar="HEX")
    r.add_argument("--checkpoint", metavar="DIR",
                   help="the checkpoint a checkpoint golden was generated from (its digest must match)")
    s = sub.add_parser("search", help="draw cases with hypothesis until a candidate diverges, then "
                                      "shrink the divergence and write it as a golden case")
    s.add_argument("--adapter", help="pkg.module:factory of a Python engine adapter")
    _engine_args(s)
    s.add_argument("--out", required=True, metavar="DIR",
                   help="where the shrunk case (DIR/search-<date>/) and the database go")
    s.add_argument("--profile", help="the tolerance profile (default: the one that emulates the "
                                      "candidate's mode, else float32)")
    s.add_argument("--max-examples", type=int, default=100, metavar="N",
                   help="examples judged at most before giving up (default 100)")
    s.add_argument("--deadline", type=_seconds, default=None, metavar="SECONDS",
                   help="the longest one example may take (hypothesis's deadline; default none)")
    s.add_argument("--seed", type=int, default=0, help="hypothesis's @seed (default 0)")
    s.add_argument("--database", metavar="DIR", help="the example database (default DIR/database)")
    s.add_argument("--no-database", action="store_true", help="no example database")
    s.add_argument("--kinds", help="comma-separated case kinds to draw (default all)")
    s.add_argument("--pin", action="append", default=[], metavar="AXIS=VALUE",
                   help="hold one axis at a value (e.g. fp8=false); repeatable")
    s.add_argument("--json", dest="json_out", help="write the report as JSON here")
    s.add_argument("--case-timeout", type=_seconds, default=600.0, metavar="SECONDS")
    s.add_argument("--quiet", action="store_true")
    return p


def _engine_args(p):
    p.add_argument("--engine", help="a built-in engine adapter: transformers, mlx, llama.cpp, vllm")
    p.add_argument("--engine-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an engine setting (dtype, kv_cache_dtype, flash_attn, ...); one per key")
    p.add_argument("--in-process", action="store_true",
                   help="run the adapter in this process (on a worker thread) instead of a child "
                        "process: for debugging; a crash or a stuck C call then ends the run")


def _candidate_adapter(args, restart_after_timeout: bool = True):
    """--adapter or --engine (exactly one) -> (candidate, repro); the candidate's `info` is the
    engine's (None for --adapter), read after the run. By default the adapter runs in a child
    process (isolated.ChildCandidate); --in-process builds it on this process's worker thread
    (candidates.AdapterCandidate). Either way it is built where every later call runs, under
    --case-timeout, and closed there (_close)."""
    if args.adapter and args.engine:
        raise OraclesError("give --adapter or --engine, not both")
    if args.engine_option and not args.engine:
        raise OraclesError("--engine-option needs --engine")
    if args.adapter:
        repro = f"--adapter {args.adapter}"
        if args.in_process:
            return candidates.load_adapter(args.adapter, args.case_timeout), repro
        split_spec(args.adapter)  # the spec's form, before a process is started
        return isolated.ChildCandidate(args.adapter, [], args.adapter, args.case_timeout,
                                       process=getattr(args, "prespawned", None),
                                       restart_after_timeout=restart_after_timeout), repro
    options = engines.parse_options(args.engine_option)
    engines.check_options(args.engine, options)  # names and values, before the engine is built
    repro = f"--engine {shlex.quote(args.engine)}" + "".join(
        f" --engine-option {shlex.quote(o)}" for o in args.engine_option)
    if not args.in_process:
        return isolated.ChildCandidate("oracles.engines:engine_adapter", [args.engine, options],
                                       f"--engine {args.engine}", args.case_timeout,
                                       label_of=engines.label,
                                       process=getattr(args, "prespawned", None),
                                       restart_after_timeout=restart_after_timeout), repro
    built = {}

    def factory():
        built["adapter"], built["info"] = engines.load_engine(args.engine, options)
        return built["adapter"]
    cand = candidates.make_candidate(factory, f"--engine {args.engine}", args.case_timeout)
    cand.info = built["info"]
    cand.label = engines.label(cand.info)
    return cand, repro


def conditioner(no_conditioning: bool):
    """What `oracles check` and the pytest plugin hand the checker to condition the goldens on
    the candidate's routing: authoring.conditioned.conditioner_for, imported only now (it runs
    refimpl's forward pass), or None with --no-conditioning (nothing of it is then loaded)."""
    if no_conditioning:
        return None
    from .authoring.conditioned import conditioner_for
    return conditioner_for


def repro_base(golden: str, how: str, engine: str | None, no_conditioning: bool,
               any_profile: bool) -> str:
    """`oracles check GOLDEN CANDIDATE` with what else its verdict depends on: the environment
    the engine reads, --no-conditioning, --any-profile. A failing case's reproduce line is this
    with its --only and --profile (check.repro_line), from `oracles check` and the plugin alike."""
    env = engines.environment(engine) if engine else {}
    return ("".join(f"{k}={shlex.quote(v)} " for k, v in env.items())
            + f"oracles check {shlex.quote(golden)} {how}"
            + (" --no-conditioning" if no_conditioning else "")
            + (" --any-profile" if any_profile else ""))


def _close(cand, abort: bool = False) -> None:
    """The adapter's close() where it was built (and its process or thread ended); a close()
    that fails is one warning line, not a change of verdict."""
    close = getattr(cand, "close", None)
    why = close(abort=abort) if callable(close) else None
    if why:
        print(f"oracles: warning: {escape(why)}", file=sys.stderr)


def main(argv=None, prespawned=None) -> int:
    """The command line -> its exit code. prespawned: an adapter process already started for
    this command (oracles/__main__.py), taken by the first adapter candidate."""
    try:
        args = _parser().parse_args(argv)
        args.prespawned = prespawned
        return COMMANDS[args.cmd](args)
    except RefimplError as e:  # OraclesError included
        print(f"oracles: error: {printable(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, or an adapter that raised it: one line, 130
        detail = f" ({printable(e)[:200]})" if str(e) else ""
        print(f"oracles: interrupted{detail}", file=sys.stderr)
        return 130


def cmd_list(args) -> int:
    from .authoring.suites import SUITE_DOCS, suite_cases

    if not args.suite:
        for name, doc in SUITE_DOCS.items():
            print(f"{name:<12} {len(suite_cases(name)):>3} cases  {doc}")
        return 0
    for cid, _ in suite_cases(args.suite):  # ids only: building full-width cases takes memory
        print(cid)
    return 0


def cmd_generate(args) -> int:
    from .authoring.writer import generate, suite_size

    t = time.perf_counter()
    suite, cases, doc = args.suite, None, None
    if args.checkpoint or args.tokens or args.layers is not None:
        from .authoring.checkpoint_cases import checkpoint_cases, load_tokens

        if not (args.checkpoint and args.tokens):
            raise OraclesError("a checkpoint golden needs both --checkpoint DIR and --tokens FILE")
        check_destination(args.out, "directory", OraclesError)
        cases = checkpoint_cases(args.checkpoint, load_tokens(args.tokens), args.layers,
                                 args.new_tokens)
        suite = "checkpoint"
        doc = ("model cases of a user's checkpoint (referenced by digest, not copied)"
               + (f", its first {args.layers} decoder layers" if args.layers else ""))
    m = generate(args.out, suite, args.only, progress=_progress(args), cases=cases,
                 suite_doc=doc, ray=args.ray)
    dt = time.perf_counter() - t
    print(f"wrote {args.out}: suite {suite}, {len(m['cases'])} cases, "
          f"{suite_size(args.out) / 1e6:.1f} MB in {dt:.1f} s")
    return 0


def _write_json(path, obj, expect=...):
    """The report as JSON, atomically (refimpl.atomic: temporary beside it, then rename)."""
    write_text(path, json.dumps(obj, indent=1) + "\n", OraclesError, tag="oracles", expect=expect)


def cmd_check(args) -> int:
    if bool(args.candidate) == bool(args.adapter or args.engine):
        raise OraclesError("check needs exactly one of CANDIDATE (a directory), --adapter "
                           "pkg.mod:factory or --engine NAME")
    distinct_destinations({"--json": args.json_out, "--html": args.html_out,
                           "--junit": args.junit_out}, OraclesError)
    json_dest = check_destination(args.json_out, "file", OraclesError) if args.json_out else None
    html_dest = check_destination(args.html_out, "file", OraclesError) if args.html_out else None
    junit_dest = check_destination(args.junit_out, "file", OraclesError) if args.junit_out else None
    known_file = known.load(args.known) if args.known else None
    if args.candidate:
        if args.engine_option:
            raise OraclesError("--engine-option needs --engine")
        cand, info = candidates.DirCandidate(args.candidate), engines.read_info(args.candidate)
        how, env = shlex.quote(args.candidate), {}
        if info:
            cand = engines.RecordedSkips(cand, info.pop("skipped"), info.pop("errors"))
    else:
        cand, how = _candidate_adapter(args)  # an adapter process starts now, while the suite is read
        info = None
    base = repro_base(args.golden, how, args.engine, args.no_conditioning, args.any_profile)
    t = time.perf_counter()
    try:
        cond = conditioner(args.no_conditioning)
        if info is None and args.engine:  # the engine's options, for --known (it is built now)
            info = cand.info
        mode = candidates.run_mode(cand, info)
        # the profile of its mode unless asked for; one emulating FP8 it did not have refused
        profile = choose(args.profile, mode, args.any_profile)
        rep = run_check(args.golden, cand, profile, args.only, repro_base=base,
                        progress=_progress(args), expect_digest=args.expect_digest,
                        allow_empty=args.allow_empty, allow_inconclusive=args.allow_inconclusive,
                        known=known_file, allow_fixed=args.allow_fixed,
                        engine_options=info.get("options") if info else None,
                        checkpoint=args.checkpoint, conditioner=cond, mode=mode,
                        any_profile=args.any_profile)
    except BaseException:
        _close(cand, abort=True)
        raise
    _close(cand)
    rep["seconds"] = round(time.perf_counter() - t, 3)
    if info:
        rep["engine"] = info
        print(f"engine: {escape(engines.label(info))}")
    print(format_report(rep))
    if args.json_out:
        _write_json(args.json_out, rep, expect=json_dest)
    if args.html_out:
        write_text(args.html_out, report_html.render(rep), OraclesError, tag="oracles", expect=html_dest)
    if args.junit_out:
        write_text(args.junit_out, junit.render(rep, allow_inconclusive=args.allow_inconclusive,
                                                allow_fixed=args.allow_fixed),
                   OraclesError, tag="oracles", expect=junit_dest)
    return 0 if rep["ok"] else 1


def cmd_verify(args) -> int:
    from .authoring.verify import format_verify, run_verify

    json_dest = check_destination(args.json_out, "file", OraclesError) if args.json_out else None
    rep = run_verify(args.golden, args.only, args.expect_digest, progress=_progress(args))
    print(format_verify(rep))
    if args.json_out:
        _write_json(args.json_out, rep.as_dict(), expect=json_dest)
    return 0 if rep.ok else 1


def cmd_diff(args) -> int:
    json_dest = check_destination(args.json_out, "file", OraclesError) if args.json_out else None
    d = diff.diff(args.old, args.new, args.factor)
    print(diff.format_diff(d))
    if args.json_out:
        _write_json(args.json_out, d.as_dict(), expect=json_dest)
    return 1 if d.regressed else 0


def cmd_run(args) -> int:
    if not (args.adapter or args.engine):
        raise OraclesError("run needs --adapter pkg.mod:factory or --engine NAME")
    check_destination(args.out, "directory", OraclesError)  # before the adapter runs
    cand, _ = _candidate_adapter(args)
    errors = {}
    try:
        with atomic_directory(args.out, OraclesError, tag="oracles") as tmp:  # never merged into
            skipped = candidates.write_outputs(args.golden, cand, tmp, args.only, errors=errors,
                                               expect_digest=args.expect_digest,
                                               checkpoint=args.checkpoint)
            info = getattr(cand, "info", None)
            if info:
                engines.write_info(tmp, info, skipped, errors)
    except BaseException:
        _close(cand, abort=True)
        raise
    _close(cand)
    if info:
        print(f"engine: {escape(engines.label(info))}")
    for cid, why in skipped.items():
        print(escape(f"skipped {cid}: {why}"))
    for cid, why in errors.items():
        print(escape(f"error {cid}: {why}"))
    print(escape(f"wrote {args.out}") + (f" ({len(errors)} case(s) failed to run)" if errors else ""))
    return 1 if errors else 0


def cmd_search(args) -> int:
    from .authoring import search

    if not (args.adapter or args.engine):
        raise OraclesError("search needs --adapter pkg.mod:factory or --engine NAME")
    if args.database and args.no_database:
        raise OraclesError("give --database DIR or --no-database, not both")
    if args.max_examples < 1:
        raise OraclesError(f"--max-examples {args.max_examples}: must be at least 1")
    if args.deadline is not None and args.deadline <= 0:
        raise OraclesError(f"--deadline {args.deadline:g}: must be a number of seconds > 0")
    if os.path.lexists(args.out) and not os.path.isdir(args.out):
        raise OraclesError(f"{printable(args.out)}: is not a directory")
    kinds = tuple(k.strip() for k in args.kinds.split(",")) if args.kinds else search.KINDS
    bad = [k for k in kinds if k not in search.KINDS]
    if bad:
        raise OraclesError(f"--kinds: {bad[0]!r} is not one of {', '.join(search.KINDS)}")
    pins = search.parse_pins(args.pin)
    json_dest = check_destination(args.json_out, "file", OraclesError) if args.json_out else None
    if args.profile is not None and args.profile not in tolerances.PROFILES:
        raise OraclesError(f"profile {args.profile!r} is not one of {', '.join(tolerances.PROFILES)}")
    # the adapter process of `oracles check` (a crash is that example's ERROR, the process
    # restarted); a call past --case-timeout ends the search, as in-process (its every replay
    # would wait as long again)
    cand, how = _candidate_adapter(args, restart_after_timeout=False)
    try:
        conditioner_for = conditioner(False)
        info = cand.info if args.engine else None  # (an adapter process: its factory awaited)
        # as `oracles check` judges: the profile of the candidate's mode unless given (one
        # emulating FP8 it did not have refused), the reference conditioned on its routing
        mode = candidates.run_mode(cand, info)
        profile = choose(args.profile, mode, any_flag=None)
        settings = search.Settings(
            profile=profile, max_examples=args.max_examples, deadline=args.deadline,
            seed=args.seed, kinds=kinds, pins=pins,
            database=None if args.no_database else (args.database or os.path.join(args.out, "database")))
        check = functools.partial(run_check, conditioner=conditioner_for, mode=mode)
        rep = search.search(cand, args.out, settings, check=check, repro=how,
                            progress=_progress(args) is not None)
    except BaseException:
        _close(cand, abort=True)
        raise
    _close(cand)
    if info:
        rep["engine"] = info
        print(f"engine: {escape(engines.label(info))}")
    print(search.format_report(rep))
    if args.json_out:
        _write_json(args.json_out, rep, expect=json_dest)
    return 0 if rep["ok"] else 1


COMMANDS = {"list": cmd_list, "generate": cmd_generate, "check": cmd_check, "run": cmd_run,
            "verify": cmd_verify, "diff": cmd_diff, "search": cmd_search}
