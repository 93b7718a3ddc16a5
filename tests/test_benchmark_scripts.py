"""The GPU benchmark and the GPU check script, run on the CPU so that every code path of theirs is
proven before a GPU sees them; and the operation and byte counts pinned to the parameter counts
of spec section 8."""

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from refimpl import Config
from refimpl.layout import attention_shapes
from tests.helpers import ROOT

BENCH = os.path.join(ROOT, "benchmarks", "gpu_layers.py")
CHECK = os.path.join(ROOT, "scripts", "gpu_check.sh")
CASES = ("mla_prefill", "mla_decode", "moe")


def load_bench():
    """benchmarks/gpu_layers.py as a module (benchmarks/ is no package)."""
    if "gpu_layers" not in sys.modules:
        spec = importlib.util.spec_from_file_location("gpu_layers", BENCH)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["gpu_layers"] = mod  # dataclasses look their module up while the file runs
        spec.loader.exec_module(mod)
    return sys.modules["gpu_layers"]


def run(cmd, **kw):
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
               **kw.pop("env", {}))
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600, **kw)


def check_result(res: dict, mode: str):
    assert res["mode"] == mode and res["small"] is True and res["dtype"] == "float32"
    c = res["ceilings"]
    assert c["matmul"]["ceiling_tflops"] > 0 and c["copy"]["ceiling_gbps"] > 0
    assert set(res["cases"]) == set(CASES), res.get("errors")
    for name, r in res["cases"].items():
        assert r["flops"] > 0 and r["bytes"] > 0, name
        for side in ("refimpl", "torch"):
            assert len(r[side]["times_ms"]) == res["repeats"]
            assert all(t > 0 for t in r[side]["times_ms"]), (name, side)
            assert r[side]["tflops"] > 0 and r[side]["gbps"] > 0
            assert 0 < r[side]["frac_matmul"] and 0 < r[side]["frac_copy"]
        assert r["ratio_refimpl_over_torch"] > 0
        assert r["rel_err"] < 1e-4, (name, r["rel_err"])  # float32 against float32
    moe = res["cases"]["moe"]
    assert moe["routing_agree_tokens"] == moe["routing_tokens"]  # no near ties at this size
    assert set(res["targets"]) >= {f"{c} refimpl/torch" for c in CASES}


@pytest.fixture(scope="module")
def torch_here():
    return pytest.importorskip("torch", reason="the benchmark compares against torch (peer extra)")


def test_gpu_layers_small_cpu_measures_every_case(torch_here, tmp_path):
    p = run([sys.executable, BENCH, "--small", "--cpu", "--warmup", "1", "--repeats", "2",
             "--out", str(tmp_path)])
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((tmp_path / "gpu_layers.json").read_text())
    check_result(res, "cpu")
    table = (tmp_path / "gpu_layers.md").read_text()
    assert all(f"| {c} |" in table for c in CASES)
    assert p.stdout.rstrip().endswith(table.rstrip().splitlines()[-1])  # the table comes last


def test_gpu_layers_refuses_bad_arguments_and_missing_gpu(torch_here, tmp_path):
    p = run([sys.executable, BENCH, "--cpu", "--cases", "nope", "--out", str(tmp_path)])
    assert p.returncode == 2 and "unknown case" in p.stderr
    try:
        import cupy  # noqa: F401

        pytest.skip("cupy is installed: the no-GPU message cannot be provoked here")
    except ImportError:
        pass
    p = run([sys.executable, BENCH, "--small", "--out", str(tmp_path)])
    assert p.returncode == 2 and "no GPU" in p.stderr and "--cpu" in p.stderr


def v3_dims():
    return load_bench().sizes(False).dims


def test_mla_weight_count_matches_the_tensor_plan():
    b, cfg = load_bench(), Config.preset("deepseek-v3")
    planned = sum(math.prod(s) for s in attention_shapes(cfg).values())
    assert b.mla_weight_params(v3_dims()) == planned == 187_107_328


def test_moe_counts_match_spec_section_8():
    """spec section 8: an MoE layer holds 11,320,164,608 parameters, 398,196,992 active per token."""
    b, z = load_bench(), v3_dims()
    assert b.moe_bytes(z, 0, z["E"], 1) == 11_320_164_608
    assert b.moe_bytes(z, 0, z["K"], 1) == 398_196_992
    # one token goes through every active matrix once: 2 FLOP per active weight (not the bias)
    assert b.moe_flops(z, 1) == 2 * (398_196_992 - z["E"])
    assert b.moe_flops(z, 4096) == 4096 * b.moe_flops(z, 1)


def test_mla_flops_are_two_per_weight_plus_attention():
    b, z = load_bench(), v3_dims()
    matrices = b.mla_weight_params(z) - z["ql"] - z["dc"]  # without the two norm weights
    # absorbed decode over no keys: every matrix once (W^UK and W^UV are kv_b_proj's two halves)
    assert b.mla_decode_flops(z, 0) == 2 * matrices
    per_key = 2 * z["H"] * (2 * z["dc"] + z["dr"])  # scores (d_c + d_R) and p.c^KV (d_c)
    assert b.mla_decode_flops(z, 32768) - b.mla_decode_flops(z, 0) == 32768 * per_key
    # naive prefill of one token: every matrix once, plus q.k and p.v for one key
    assert b.mla_prefill_flops(z, 1) == 2 * matrices + 2 * z["H"] * (z["dn"] + z["dr"] + z["dv"])
    assert b.mla_decode_bytes(z, 32768, 4) == 4 * (187_107_328 + 32769 * 576 + 2 * 7168)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_check_script_dry_run_on_cpu(torch_here, tmp_path):
    """The whole device script on the CPU: environment check, tests/gpu (skipped here, with the
    reason printed), the benchmark at small widths, the table printed last."""
    p = run(["bash", CHECK, "--cpu-dry-run"],
            env={"OUT": str(tmp_path), "PYTHON": sys.executable, "GPU_CHECK_BENCH_ARGS":
                 "--warmup 1 --repeats 2"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    tests = (tmp_path / "tests.txt").read_text()
    assert "skipped" in tests and "no GPU" in tests
    check_result(json.loads((tmp_path / "gpu_layers.json").read_text()), "cpu")
    table = (tmp_path / "gpu_layers.md").read_text()
    assert p.stdout.rstrip().endswith(table.rstrip().splitlines()[-1])


def test_gpu_check_script_is_valid_bash():
    if shutil.which("bash") is None:
        pytest.skip("needs bash")
    for script in (CHECK, os.path.join(ROOT, "scripts", "gpu_prepare_wheels.sh")):
        p = subprocess.run(["bash", "-n", script], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr


def test_rel_err_and_clock_helpers(torch_here):
    b = load_bench()
    t = torch_here
    assert b.rel_err_torch(t.tensor([1.0, 2.0]), t.tensor([1.0, 2.0])) == 0
    assert b.rel_err_torch(t.tensor([1.0, 2.5]), t.tensor([1.0, 2.0])) == pytest.approx(0.25)
    ms, out = b.host_clock(lambda: 7)
    assert out == 7 and ms >= 0
    times, out = b.measure(b.host_clock, lambda: np.ones(3), warmup=1, repeats=3)
    assert len(times) == 3 and out.sum() == 3


def load_cost():
    if "full_model_cost" not in sys.modules:
        path = os.path.join(ROOT, "benchmarks", "full_model_cost.py")
        spec = importlib.util.spec_from_file_location("full_model_cost", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules["full_model_cost"] = mod
        spec.loader.exec_module(mod)
    return sys.modules["full_model_cost"]


def test_full_model_cost_counts_the_published_model():
    """spec section 8: 671,026,419,200 parameters; about 36.6 B read per token without the embedding;
    the routed experts are 58 layers x 256 experts x 3 x 7168 x 2048."""
    m = load_cost()
    c = m.costs(Config.preset("deepseek-v3"), m.parse_args([]))
    inv = c["inventory"]
    assert inv["params"] == 671_026_419_200
    assert inv["routed_params"] == 58 * 256 * 3 * 7168 * 2048
    assert 36.5e9 < inv["active_params"] < 36.7e9
    assert 37e9 < c["decode"]["weight_bytes"] < 38.5e9  # FP8 matrices, bf16 head and gates
    assert c["decode"]["cache_bytes_bf16"] == 61 * 576 * 32768 * 2
    assert c["prefill"]["experts_touched_per_layer"] > 255.9  # 4096 tokens touch every expert
    # the 8-GPU node holds the FP8 model; one GPU does not
    assert inv["bytes"] / 8 < 141e9 < inv["bytes"]


def test_full_model_cost_prints_its_table(tmp_path):
    p = run([sys.executable, os.path.join(ROOT, "benchmarks", "full_model_cost.py"),
             "--json", str(tmp_path / "cost.json")])
    assert p.returncode == 0, p.stderr
    assert "671,026,419,200 parameters" in p.stdout and "| decode, batch 1" in p.stdout
    assert json.loads((tmp_path / "cost.json").read_text())["inventory"]["params"] == 671_026_419_200
