"""The layering of oracles/: reading and checking a suite never imports refimpl's forward pass
(model, mla, moe, mtp); writing one does.  Run in a fresh interpreter, so that what this test
session has already imported does not hide an import."""

import json
import os
import shutil
import subprocess
import sys

FORWARD = ("refimpl.model", "refimpl.mla", "refimpl.moe", "refimpl.mtp", "oracles.cases",
           "oracles.conditioned", "oracles.emulate", "oracles.mutants", "oracles.suites")

CHECK_A_SUITE = """
import json, sys
from oracles.check import DirCandidate, run_check
from oracles.golden import Golden
from refimpl.checkpoint import write_safetensors
import oracles.adapters, oracles.metrics, oracles.tolerance, oracles.cli, refimpl
golden_dir, cand = sys.argv[1], sys.argv[2]
g = Golden(golden_dir)
for cid in g.cases:  # the expected values as a candidate's files
    write_safetensors(f"{cand}/cases/{cid}/outputs.safetensors",
                      {k: v for k, v in g.expected(cid).items() if not k.endswith("_margin")})
    g.load_case(cid)
rep = run_check(golden_dir, DirCandidate(cand), "float32")
print(json.dumps({"counts": rep["counts"], "modules": sorted(sys.modules)}))
"""


def _run(code, *args):
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    r = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                       cwd=root, timeout=300)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_reading_and_checking_a_suite_never_imports_the_forward_pass(default_dir, tmp_path):
    cand = tmp_path / "cand"
    g = json.load(open(os.path.join(default_dir, "manifest.json")))
    for c in g["cases"]:
        os.makedirs(cand / "cases" / c["id"])
    out = _run(CHECK_A_SUITE, default_dir, str(cand))
    assert out["counts"]["pass"] == len(g["cases"]) and out["counts"]["fail"] == 0
    assert not [m for m in FORWARD if m in out["modules"]]
    shutil.rmtree(cand)


def test_writing_a_suite_does_import_it(tmp_path):
    """The check above can fail: the writing side pulls the forward pass in."""
    out = _run("import json, sys; from oracles import golden; "
               "golden.generate(sys.argv[1], 'default', only='rms_norm.*'); "
               "print(json.dumps({'modules': sorted(sys.modules)}))", str(tmp_path / "g"))
    assert [m for m in FORWARD if m not in out["modules"]] == []
