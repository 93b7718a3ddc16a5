"""The oracles' reference adapter on a device (tests/fakecupy.py: CuPy's rules on the CPU):
every case of the default suite, component and model kinds, scenarios included, runs with its
floating-point inputs on the device and gives the CPU reference's outputs bit for bit; a check
of the suite against it passes."""

import numpy as np

import tests.fakecupy as fcp
from oracles.engines.reference import RefimplAdapter
from oracles.checking.candidates import AdapterCandidate
from oracles.checking.check import run_check
from oracles.authoring.emulate import on_device, run_case


def test_every_default_case_runs_on_the_device_with_the_cpu_bits(default_golden):
    g = default_golden
    on_dev = RefimplAdapter("float64", device=fcp)
    for cid in g.cases:
        case = g.load_case(cid)
        got, want = on_dev.run(case), run_case(case, "float64")
        assert list(got) == list(want), cid
        for k in want:
            assert np.array_equal(got[k], want[k]), (cid, k)


def test_only_floating_point_inputs_are_placed_on_the_device(default_golden):
    g = default_golden
    case = on_device(g.load_case("mla_decode.start5"), fcp)
    assert isinstance(case.inputs["x"], fcp.ndarray)
    case = on_device(g.load_case("model.decode.start5"), fcp)
    assert isinstance(case.inputs["input_ids"], np.ndarray)  # ids stay with the host bookkeeping
    case = on_device(g.load_case("fp8_dequant.aligned"), fcp)
    assert isinstance(case.inputs["q"], np.ndarray)  # e4m3: no device dtype


def test_a_check_against_the_device_reference_passes(default_golden):
    cand = AdapterCandidate(RefimplAdapter("float64", device=fcp), "refimpl on the stand-in device")
    rep = run_check(default_golden, cand, "float32", only="model.*,mla.*,moe.*,scenario.*")
    assert rep["ok"] and rep["counts"]["pass"] > 10, rep["counts"]
