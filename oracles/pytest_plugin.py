"""A pytest plugin (entry point `pytest11: oracles`): a golden suite as pytest items.

    pytest --oracles-golden GOLDEN (--oracles-engine NAME [--oracles-engine-option K=V ...]
                                    | --oracles-adapter pkg.mod:factory | --oracles-candidate DIR)
           [--oracles-profile P] [--oracles-any-profile] [--oracles-no-conditioning]
           [--oracles-known FILE] [--oracles-only GLOB]
           [--oracles-expect-digest HEX] [--oracles-case-timeout S] [--oracles-in-process]
           [--oracles-allow-inconclusive] [--oracles-allow-fixed]

One item per golden case, named by its case id (so `-k`, `--lf` and `--deselect` select cases;
`-k` also matches the case's kind), under the collector `oracles`. Each item is judged as
`oracles check` judges the same case, on the same outputs (the suite opened and verified once,
every case's contract checked at collection, check.check_case, conventions marked as in a run,
known.apply):

- the profile is the one that emulates the mode the candidate recorded (engine.json `mode`, or
  the mode its adapter reports: candidates.run_mode), else float32 (profiles.choose, which
  `oracles check` calls too); --oracles-profile asks for another, and the header says how it
  relates to the run's mode (STRICTER, LOOSER, or its mode's). A profile that emulates FP8
  weights or an FP8 KV cache the run did not have is a usage error (one line) unless
  --oracles-any-profile, and then the header says it is not this run's verdict;
- the goldens are conditioned on the candidate's routing where it resolved a forgiven near-tie
  the other way (authoring/conditioned.py, which runs refimpl's forward pass and is imported
  only then), unless --oracles-no-conditioning (what such a near-tie reaches is left out).

PASS and NOT_FOLLOWED pass; FAIL, MISSING and ERROR fail with the first failing output and its
numbers and the `oracles check` command that reproduces the case (with the same profile,
--no-conditioning, --any-profile and the engine's environment: cli.repro_base); SKIP skips with
its reason; INCONCLUSIVE fails (skips with --oracles-allow-inconclusive). A case that a known
entry names is marked xfail(strict=True): its known failure is XFAIL with the entry's reason, a
pass is XPASS(strict), which fails (FIXED; --oracles-allow-fixed makes it non-strict), and any
other failure of it fails as usual. The engine (or adapter) is built once per session, at its
start (its mode chooses the profile; so `--collect-only` builds it too), in a process of its own
as `oracles check` builds it (--oracles-in-process: in pytest's process), and closed at the end
of the session; an adapter that cannot be built, or a candidate directory whose engine.json is
bad, is a usage error (one line), as it is exit 2 for `oracles check`.

Without --oracles-golden the plugin only registers its options (any other --oracles-* option is
a usage error): a project's own test run is left alone, and nothing of oracles is imported. The
items and the run are pytest_items.py.
"""

from __future__ import annotations

import pytest


def pytest_addoption(parser):
    g = parser.getgroup("oracles", "DeepSeek-V3 golden suites (oracles check as pytest items)")
    g.addoption("--oracles-golden", metavar="DIR", help="a golden suite: one pytest item per case")
    g.addoption("--oracles-engine", metavar="NAME", help="a built-in engine adapter "
                                                        "(transformers, mlx, llama.cpp, vllm)")
    g.addoption("--oracles-engine-option", action="append", default=[], metavar="KEY=VALUE",
                help="an engine setting; one per key")
    g.addoption("--oracles-adapter", metavar="MOD:FACTORY", help="a Python engine adapter")
    g.addoption("--oracles-candidate", metavar="DIR",
                help="a candidate directory (cases/<id>/outputs.safetensors)")
    g.addoption("--oracles-profile", metavar="P",
                help="the tolerance profile (default: the one that emulates the candidate's "
                     "recorded mode, else float32)")
    g.addoption("--oracles-any-profile", action="store_true",
                help="judge with a profile that emulates FP8 weights or an FP8 KV cache the run "
                     "did not have (the header says it is not this run's verdict)")
    g.addoption("--oracles-no-conditioning", action="store_true",
                help="do not recompute the reference on the candidate's routing where it "
                     "resolved a near-tie the other way: leave out what that reaches instead")
    g.addoption("--oracles-known", metavar="FILE", help="known divergences (TOML): xfail(strict)")
    g.addoption("--oracles-only", metavar="GLOB", help="comma-separated globs of case ids")
    g.addoption("--oracles-expect-digest", metavar="HEX",
                help="refuse the suite unless HEX is its question or manifest digest")
    g.addoption("--oracles-case-timeout", type=float, default=600.0, metavar="SECONDS",
                help="stop an adapter call that takes longer (0: no limit; at most 1e6)")
    g.addoption("--oracles-in-process", action="store_true",
                help="run the adapter in pytest's process rather than its own (debugging)")
    g.addoption("--oracles-allow-inconclusive", action="store_true")
    g.addoption("--oracles-allow-fixed", action="store_true",
                help="a known failure that passes is XPASS, not a failure")


def pytest_configure(config):
    opts = {k: config.getoption(k) for k in ("oracles_engine", "oracles_adapter",
                                              "oracles_candidate", "oracles_known", "oracles_only",
                                              "oracles_profile", "oracles_any_profile",
                                              "oracles_no_conditioning")}
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
    # the checker is imported only now: this module is loaded by every pytest run in the
    # environment (the entry point), and must cost nothing without --oracles-golden
    from . import pytest_items

    config.pluginmanager.register(pytest_items.OraclesRun(config), "oracles-run")


