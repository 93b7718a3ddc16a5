"""A pytest plugin (entry point `pytest11: oracles`): a golden suite as pytest items.

    pytest --oracles-golden GOLDEN (--oracles-engine NAME [--oracles-engine-option K=V ...]
                                    | --oracles-adapter pkg.mod:factory | --oracles-candidate DIR)
           [--oracles-profile P] [--oracles-known FILE] [--oracles-only GLOB]
           [--oracles-expect-digest HEX] [--oracles-case-timeout S] [--oracles-in-process]
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
as usual. The engine (or adapter) is built once per session, on the first case that runs, in a
process of its own as `oracles check` builds it (--oracles-in-process: in pytest's process), and
closed at the end of the session.

Without --oracles-golden the plugin only registers its options: a project's own test run is
left alone, and nothing of oracles is imported. The items and the run are pytest_items.py.
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
    g.addoption("--oracles-profile", default="float32", metavar="P", help="tolerance profile")
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
    # the checker is imported only now: this module is loaded by every pytest run in the
    # environment (the entry point), and must cost nothing without --oracles-golden
    from . import pytest_items

    config.pluginmanager.register(pytest_items.OraclesRun(config), "oracles-run")


