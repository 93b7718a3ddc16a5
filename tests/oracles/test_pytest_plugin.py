"""The pytest plugin (oracles/pytest_plugin.py, entry point pytest11): one item per golden case,
KNOWN as xfail(strict), the engine built once, nothing changed without --oracles-golden. Each
test runs pytest inside pytest (pytester) with the plugin loaded from its entry point, as an
engine team's CI loads it."""

import json
import os

import pytest

from oracles.authoring import writer
from oracles.format import golden

pytest_plugins = ["pytester"]

NEG = "gate.negative_biased,moe.negative_biased,model.prefill.negative_biased,gate.tiny,rms_norm.basic"
KNOWN = """
[[known]]
case = "gate.negative_biased"
output = "topk_idx"
reason = "zero group mask"
link = "mlx_lm/models/deepseek_v3.py:213"

[[known]]
case = "model.prefill.negative_biased"
output = "layers.1.topk_idx"
reason = "zero group mask"
link = "mlx_lm/models/deepseek_v3.py:213"

[[known]]
case = "gate.tiny"
reason = "fixed upstream since"
link = "x"
"""


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("golden") / "smoke")
    writer.generate(out, "smoke")
    return out


def test_without_its_options_the_plugin_leaves_a_test_run_alone(pytester):
    pytester.makepyfile("def test_one():\n    assert True\n")
    r = pytester.runpytest("-p", "no:cacheprovider")
    r.assert_outcomes(passed=1)
    assert "oracles" not in r.stdout.str()
    assert "--oracles-golden=DIR" in pytester.runpytest("--help").stdout.str()  # loaded: entry point


def test_options_without_a_suite_are_a_usage_error(pytester):
    r = pytester.runpytest("--oracles-engine", "mlx")
    assert r.ret == pytest.ExitCode.USAGE_ERROR
    assert "--oracles-engine needs --oracles-golden" in r.stderr.str()
    r = pytester.runpytest("--oracles-golden", "x")
    assert "needs exactly one of --oracles-engine, --oracles-adapter or --oracles-candidate" in r.stderr.str()


def test_a_bad_suite_is_one_line_and_a_usage_error(pytester, tmp_path):
    r = pytester.runpytest("--oracles-golden", str(tmp_path / "none"), "--oracles-adapter",
                           "oracles.adapters:refimpl_float32")
    assert r.ret == pytest.ExitCode.USAGE_ERROR
    assert "oracles: " in r.stderr.str() and "not a golden suite directory" in r.stderr.str()


def test_a_case_timeout_out_of_its_bounds_is_a_usage_error(pytester, smoke):
    r = pytester.runpytest("--oracles-golden", smoke, "--oracles-adapter",
                           "oracles.adapters:refimpl_float32", "--oracles-case-timeout", "1e10")
    assert r.ret == pytest.ExitCode.USAGE_ERROR and "from 0 (no limit) to 1e+06" in r.stderr.str()


def test_one_item_per_case_named_by_its_id(pytester, smoke):
    args = ["-p", "no:cacheprovider", "--oracles-golden", smoke, "--oracles-adapter",
            "oracles.adapters:refimpl_float32"]
    r = pytester.runpytest(*args, "--co", "-q")
    ids = [line.rsplit("::", 1)[-1] for line in r.stdout.lines if "::oracles::" in line]
    assert ids == list(golden.Golden(smoke).cases)
    r = pytester.runpytest(*args, "-k", "gate or rms_norm")
    r.assert_outcomes(passed=2)
    r = pytester.runpytest(*args)
    r.assert_outcomes(passed=5)
    assert "question digest (what the suite asks)" in r.stdout.str()


def test_known_failures_are_xfail_a_fixed_one_fails_and_others_fail_with_their_first_output(
        pytester, default_dir):
    known = pytester.makefile(".toml", known=KNOWN)
    r = pytester.runpytest("-p", "no:cacheprovider", "-rA", "--oracles-golden", default_dir, "--oracles-adapter",
                           "oracles.mutants:zero_group_mask", "--oracles-only", NEG, "--oracles-known", str(known))
    r.assert_outcomes(passed=1, xfailed=2, failed=2)
    out = r.stdout.str()
    # a KNOWN case: xfail with the entry's reason
    assert "::oracles::gate.negative_biased - known FAIL: zero group mask" in out
    # FIXED: a pass that the file says fails is XPASS(strict)
    assert "[XPASS(strict)] known FAIL: fixed upstream since (x)" in out
    # a failure no entry covers: its first failing output and numbers, and how to reproduce it
    assert "moe.negative_biased (moe): FAIL: topk_idx: mismatch 1 > tol 0" in out
    assert "reproduce: oracles check" in out and "--only moe.negative_biased --profile float32" in out


def test_k_also_selects_by_kind(pytester, default_dir, default_golden):
    r = pytester.runpytest("-p", "no:cacheprovider", "--oracles-golden", default_dir, "--oracles-adapter",
                           "oracles.adapters:refimpl_float32", "--co", "-q", "-k", "schedule")
    ids = [line.rsplit("::", 1)[-1] for line in r.stdout.lines if "::oracles::" in line]
    g = default_golden
    assert ids and ids == [c for c, e in g.cases.items() if e["kind"] == "schedule"]
    assert not any("schedule" in c for c in ids)  # selected by kind, not by id


def test_last_failed_reruns_only_the_failed_cases(pytester, default_dir):
    args = ["--oracles-golden", default_dir, "--oracles-adapter", "oracles.mutants:zero_group_mask",
            "--oracles-only", NEG]
    pytester.runpytest(*args).assert_outcomes(passed=2, failed=3)
    r = pytester.runpytest(*args, "--lf")
    r.assert_outcomes(failed=3, deselected=2)


def test_the_engine_is_built_once_per_session(pytester, smoke):
    pytester.syspathinsert()
    count = pytester.path / "built.txt"
    pytester.makepyfile(counting_adapter=f"""
from oracles.adapters import RefimplAdapter

def factory():
    with open({str(count)!r}, "a") as f:
        f.write("built\\n")
    return RefimplAdapter("float32")
""")
    r = pytester.runpytest("-p", "no:cacheprovider", "--oracles-golden", smoke,
                           "--oracles-adapter", "counting_adapter:factory")
    r.assert_outcomes(passed=5)
    assert count.read_text() == "built\n"


def test_a_candidate_directory_is_the_file_route(pytester, smoke, tmp_path):
    from oracles import cli

    cand = str(tmp_path / "cand")
    assert cli.main(["run", smoke, "--adapter", "oracles.adapters:refimpl_float32", "--out", cand]) == 0
    os.remove(os.path.join(cand, "cases", "gate.tiny", "outputs.safetensors"))
    r = pytester.runpytest("-p", "no:cacheprovider", "--oracles-golden", smoke, "--oracles-candidate", cand)
    r.assert_outcomes(passed=4, failed=1)
    assert "gate.tiny (gate): MISSING: no outputs.safetensors for this case" in r.stdout.str()


# ---- the same verdicts as `oracles check` (the profile of the run's mode, conditioning) ----------

BF16 = "oracles.adapters:refimpl_bf16"  # refimpl's bf16 emulation: it says its mode is bf16
FP8 = "oracles.adapters:refimpl_fp8"  # refimpl's fp8 emulation: its mode is fp8
# model.prefill.near_ties is the default suite's one case kept on random routing: the fp8
# emulation resolves near-ties of it the other way (tests/oracles/test_decisive.py; the bf16
# one, rounding as DeepSeek's inference code does, routes it as the truth does)
ONLY = ("rms_norm.basic,gate.tiny,moe.tiny,model.prefill.tiny,model.prefill.near_ties,"
        "model.decode.start5,scenario.prefix_cache.small")
PLUGIN_FLAG = {"--no-conditioning": "--oracles-no-conditioning", "--profile": "--oracles-profile",
               "--any-profile": "--oracles-any-profile"}


def _check_verdicts(golden_dir, candidate, flags, tmp_path):
    """`oracles check --json`: {case id: its result}."""
    from oracles import cli

    rep = tmp_path / "check.json"
    if rep.exists():
        rep.unlink()
    cli.main(["check", golden_dir, *candidate, "--only", ONLY, "--json", str(rep), "--quiet", *flags])
    return {r["id"]: r for r in json.loads(rep.read_text())["cases"]}


def _plugin_verdicts(pytester, golden_dir, candidate, flags):
    """The plugin on the same candidate: (RunResult, {case id: (outcome, failure text)})."""
    plugin_flags = [PLUGIN_FLAG.get(f, f) for f in flags]
    r = pytester.runpytest("-p", "no:cacheprovider", "--oracles-golden", golden_dir, *candidate,
                           "--oracles-only", ONLY, *plugin_flags)
    got = {}
    for rep in r.reprec.getreports("pytest_runtest_logreport"):
        if "::oracles::" in rep.nodeid and (rep.when == "call" or not rep.passed):
            got[rep.nodeid.rsplit("::", 1)[-1]] = (rep.outcome, str(rep.longrepr) if rep.failed else "")
    return r, got


def _as_pytest(r: dict):
    """What the plugin makes of a case `oracles check` judged so: (outcome, how its failure
    starts, its reproduce line)."""
    if r["status"] in ("pass", "not_followed"):
        return "passed", None, None
    if r["status"] == "skip":
        return "skipped", None, None
    return "failed", f"{r['id']} ({r['kind']}): {r['status'].upper()}: ", r.get("repro")


def _same_verdicts(check, plugin):
    assert set(plugin) == set(check)
    for cid, r in check.items():
        outcome, head, repro = _as_pytest(r)
        assert plugin[cid][0] == outcome, (cid, r["status"], plugin[cid])
        if head:
            assert plugin[cid][1].startswith(head), (cid, plugin[cid][1])
            assert f"reproduce: {repro}" in plugin[cid][1], (cid, repro, plugin[cid][1])


@pytest.mark.parametrize("flags", [(), ("--no-conditioning",), ("--profile", "float32")])
def test_the_plugin_judges_an_emulated_run_case_by_case_as_oracles_check_does(
        pytester, default_dir, tmp_path, flags):
    """The fp8 emulation through its adapter: by default both judge it with the fp8 profile
    (its mode) and condition the goldens on its routing, so the near-ties it resolves the other
    way are judged (PASS) rather than left out (INCONCLUSIVE); the plugin used to judge a run
    with float32 (every case a false FAIL) and unconditioned. With --no-conditioning and with a
    stricter profile asked for, both still give the same verdict on every case, and the same
    reproduce line."""
    cand = ["--adapter", FP8]
    check = _check_verdicts(default_dir, cand, flags, tmp_path)
    r, plugin = _plugin_verdicts(pytester, default_dir, ["--oracles-adapter", FP8], flags)
    _same_verdicts(check, plugin)
    header = r.stdout.str()
    near = check["model.prefill.near_ties"]
    if not flags:
        assert "fp8 profile" in header
        assert "oracles: profile fp8: the fp8 profile emulates this run's mode" in header
        assert "conditioned on the candidate's routing" in header
        assert all(v["status"] == "pass" for v in check.values()), check
        assert near["conditioned"]["forced"] >= 1  # a near-tie decided on its routing
    elif flags == ("--no-conditioning",):
        assert "not conditioned on the candidate's routing" in header
        assert near["status"] == "inconclusive"  # what conditioning decides in the default run
        assert "--no-conditioning --only model.prefill.near_ties --profile fp8" in near["repro"]
        assert [c for c, v in check.items() if v["status"] != "pass"] == ["model.prefill.near_ties"]
    else:
        assert "oracles: profile float32: STRICTER than this run's mode (fp8)" in header
        assert all(v["status"] == "fail" for v in check.values())  # its precision, not a bug


def _bf16_engine_run(default_dir, tmp_path):
    """A file-route candidate recorded as a bf16 engine run (engine.json mode bf16): the bf16
    emulation's outputs, one case left without its outputs (MISSING: a reproduce line)."""
    from oracles import cli

    cand = tmp_path / "cand"
    assert cli.main(["run", default_dir, "--adapter", BF16, "--only", ONLY, "--out", str(cand)]) == 0
    os.remove(cand / "cases" / "gate.tiny" / "outputs.safetensors")
    info = {"engine": "vllm", "version": "0.32.0", "mode": "bf16",
            "options": {"dtype": "bfloat16", "kv_cache_dtype": "auto"}, "skipped": {}}
    (cand / "engine.json").write_text(json.dumps(info))
    return str(cand)


def test_an_fp8_profile_for_a_run_without_fp8_is_refused_unless_asked_for(pytester, default_dir,
                                                                          tmp_path):
    cand = _bf16_engine_run(default_dir, tmp_path)
    args = ["-p", "no:cacheprovider", "--oracles-golden", default_dir, "--oracles-candidate", cand,
            "--oracles-only", ONLY]
    for profile, what in (("fp8", "FP8 weights"), ("fp8_kv", "an FP8 KV cache")):
        r = pytester.runpytest(*args, "--oracles-profile", profile)
        assert r.ret == pytest.ExitCode.USAGE_ERROR
        err = [line for line in r.stderr.lines if line.strip()]
        assert len(err) == 1 and f"--oracles-profile {profile}: the {profile} profile emulates {what}" in err[0]
        assert "check it with --oracles-profile bf16" in err[0] and "--oracles-any-profile" in err[0]
    # asked for: judged, labelled as not this run's verdict, the same verdicts as `oracles check`
    flags = ("--profile", "fp8", "--any-profile")
    check = _check_verdicts(default_dir, [cand], flags, tmp_path)
    r, plugin = _plugin_verdicts(pytester, default_dir, ["--oracles-candidate", cand], flags)
    _same_verdicts(check, plugin)
    assert "oracles: profile fp8: LOOSER than this run's mode (bf16)" in r.stdout.str()
    assert "not this run's verdict" in r.stdout.str()
    assert check["gate.tiny"]["status"] == "missing"
    assert check["gate.tiny"]["repro"].endswith(" --any-profile --only gate.tiny --profile fp8")
    # and by default, the profile of its recorded mode
    r, plugin = _plugin_verdicts(pytester, default_dir, ["--oracles-candidate", cand], ())
    _same_verdicts(_check_verdicts(default_dir, [cand], (), tmp_path), plugin)
    assert "oracles: profile bf16: the bf16 profile emulates this run's mode" in r.stdout.str()
    assert sorted(o for o, _ in plugin.values()) == ["failed"] + ["passed"] * 6


MODULES = """
import json, sys

def pytest_sessionfinish(session):
    with open("modules.json", "w") as f:
        json.dump(sorted(sys.modules), f)
"""
FORWARD = ("refimpl.model", "refimpl.layer", "refimpl.mla", "refimpl.moe", "refimpl.mtp")


def test_the_plugin_loads_the_checker_only_with_a_suite_and_the_forward_pass_only_to_condition(
        pytester, smoke, tmp_path):
    """In fresh interpreters (this session has imported everything): a test run without
    --oracles-golden imports nothing of oracles but the plugin's options; a suite checked with
    --oracles-no-conditioning never loads refimpl's forward pass; by default it does (the check
    can fail)."""
    from oracles import cli

    cand = str(tmp_path / "cand")
    assert cli.main(["run", smoke, "--adapter", "oracles.adapters:refimpl_float32", "--out", cand]) == 0
    pytester.makeconftest(MODULES)
    pytester.makepyfile("def test_one():\n    assert True\n")

    def modules(*args, passed):
        pytester.runpytest_subprocess("-p", "no:cacheprovider", *args).assert_outcomes(passed=passed)
        return json.loads((pytester.path / "modules.json").read_text())
    mods = modules(passed=1)
    assert "oracles.pytest_plugin" in mods  # loaded from its entry point
    assert [m for m in mods if m.startswith("oracles.")] == ["oracles.pytest_plugin"]
    suite = ["--oracles-golden", smoke, "--oracles-candidate", cand]
    mods = modules(*suite, "--oracles-no-conditioning", passed=6)
    assert "oracles.pytest_items" in mods and not [m for m in FORWARD if m in mods]
    assert not [m for m in mods if m.startswith("oracles.authoring")]
    mods = modules(*suite, passed=6)
    assert "oracles.authoring.conditioned" in mods and "refimpl.moe" in mods
