"""llama.cpp through `--engine llama.cpp` (run by hand: llama-cpp-python builds llama.cpp from
source, and the converter comes from its sdist, LLAMA_CPP_CONVERTER). With an f32 KV cache it
passes the float32 profile except the two real divergences, each diagnosed as the engine
behaviour oracles.engines.matrix names: rope_scaling.mscale read as mscale_all_dim, and V2's
group_limited_greedy scored by the top-2 sum. Its default f16 cache passes the f16_kv profile."""

import os

import pytest

llama_missing = None
try:
    import llama_cpp  # noqa: F401
except ImportError as e:
    llama_missing = f"llama-cpp-python is not installed ({e}): pip install '.[engine-llamacpp]'"
if llama_missing is None and not os.path.isfile(os.environ.get("LLAMA_CPP_CONVERTER", "")):
    llama_missing = "LLAMA_CPP_CONVERTER does not name convert_hf_to_gguf.py (from llama-cpp-python's sdist)"
if llama_missing:
    print(f"skipping the llama.cpp engine tests: {llama_missing}")

pytestmark = pytest.mark.skipif(llama_missing is not None, reason=llama_missing or "")

from oracles import engines  # noqa: E402
from oracles.checking.candidates import write_outputs  # noqa: E402
from oracles.checking.candidates import AdapterCandidate, DirCandidate  # noqa: E402
from oracles.checking.check import run_check  # noqa: E402
from oracles.engines import matrix  # noqa: E402
from oracles.format.golden import read_tensors  # noqa: E402

ONLY = "model.prefill.tiny,model.prefill.mscale_differs,model.prefill.v2_group_top2,model.decode.start5"


def test_llama_cpp_f32_cache_fails_exactly_the_two_diagnosed_divergences(default_dir, default_golden, tmp_path):
    adapter, info = engines.load_engine("llama.cpp", {"kv_cache_dtype": "f32"})
    write_outputs(default_dir, AdapterCandidate(adapter, "llama.cpp"), tmp_path, only=ONLY)
    rep = run_check(default_golden, DirCandidate(str(tmp_path)), "float32", only=ONLY)
    status = {r["id"]: r["status"] for r in rep["cases"]}
    assert status == {"model.prefill.tiny": "pass", "model.decode.start5": "pass",
                      "model.prefill.mscale_differs": "fail", "model.prefill.v2_group_top2": "fail"}
    first = {r["id"]: r.get("first_failure") for r in rep["cases"]}
    # intermediates from llama.cpp's cb_eval: the wrong YaRN factor first shows in the residual
    # after the first attention, the V2 group score in the first MoE layer's routing
    assert first["model.prefill.mscale_differs"].startswith("layers.0.h_attn")
    assert first["model.prefill.v2_group_top2"].startswith("layers.1.topk_idx")
    g = default_golden
    for cid, variant in (("model.prefill.mscale_differs", "mscale_read_as_mscale_all_dim"),
                         ("model.prefill.v2_group_top2", "group_score_top2_for_v2")):
        logits = read_tensors(str(tmp_path / "cases" / cid / "outputs.safetensors"))["logits"]
        assert matrix.diagnose(g, cid, logits, "float32")[0] == variant, cid


def test_llama_cpp_default_f16_cache_passes_f16_kv_and_fails_float32(default_dir, default_golden, tmp_path):
    adapter, _ = engines.load_engine("llama.cpp", {})
    write_outputs(default_dir, AdapterCandidate(adapter, "llama.cpp"), tmp_path, only="model.prefill.tiny")
    assert run_check(default_golden, DirCandidate(str(tmp_path)), "f16_kv", only="model.prefill.tiny")["ok"]
    assert not run_check(default_golden, DirCandidate(str(tmp_path)), "float32", only="model.prefill.tiny")["ok"]
