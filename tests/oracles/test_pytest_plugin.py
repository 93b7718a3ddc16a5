"""The pytest plugin (oracles/pytest_plugin.py, entry point pytest11): one item per golden case,
KNOWN as xfail(strict), the engine built once, nothing changed without --oracles-golden. Each
test runs pytest inside pytest (pytester) with the plugin loaded from its entry point, as an
engine team's CI loads it."""

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


def test_k_also_selects_by_kind(pytester, default_dir):
    r = pytester.runpytest("-p", "no:cacheprovider", "--oracles-golden", default_dir, "--oracles-adapter",
                           "oracles.adapters:refimpl_float32", "--co", "-q", "-k", "schedule")
    ids = [line.rsplit("::", 1)[-1] for line in r.stdout.lines if "::oracles::" in line]
    g = golden.Golden(default_dir)
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
