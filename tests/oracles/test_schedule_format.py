"""The schedule format's additions (oracles/schedule.py): prompt tokens marked (a final one-token
prefill chunk told from a decode step), preemption with recompute, the reading side's
cross-check of a schedule against its inputs and outputs; and the scenario cases the serving
bugs need (prefixes at block multiples and one off, decode across 512, 1024 and 4096, a forward
mixing prefill chunks and decode steps of several requests)."""

import hashlib
import json
import os
import shutil

import numpy as np
import pytest

from oracles import OraclesError
from oracles.authoring import scenarios
from oracles.authoring.kinds import case_model
from oracles.authoring.suites import suite_cases
from oracles.format import golden
from oracles.format.digest import question_digest
from oracles.format.golden import read_metadata, read_tensors
from oracles.format.schedule import Chunk, Forward, Preempt, Share, check_entry, plan
from refimpl.writer import write_safetensors

DEFAULT = {cid: b for cid, b in suite_cases("default") if cid.startswith("scenario.")}
SCENARIOS = dict(suite_cases("scenarios"))


def _case(cid):
    return {**DEFAULT, **SCENARIOS}[cid](cid)


def _plan(case):
    return plan(case.schedule, [len(t) for t in scenarios.request_tokens(case)])


def _s(steps, prompts=None, requests=1):
    s = {"format": 1, "requests": requests, "steps": steps}
    if prompts is not None:
        s["prompt_lengths"] = prompts
    return s


def test_plan_marks_prompt_chunks_decode_steps_and_recomputes():
    s = _s([{"op": "forward", "batch": [[0, 4], [1, 3]]},
            {"op": "forward", "batch": [[0, 1], [1, 1]], "repeat": 2},
            {"op": "preempt", "request": 1},
            {"op": "forward", "batch": [[0, 1], [1, 1]]}], prompts=[5, 3], requests=2)
    steps = plan(s, [7, 6])
    assert steps[0] == Forward((Chunk(0, 0, 4), Chunk(1, 0, 3)))
    # request 0's fifth token is its last prompt token: a one-token PREFILL chunk; request 1 decodes
    assert steps[1] == Forward((Chunk(0, 4, 1, prompt=True), Chunk(1, 3, 1, prompt=False)))
    assert steps[2] == Forward((Chunk(0, 5, 1, prompt=False), Chunk(1, 4, 1, prompt=False)))
    assert steps[3] == Preempt(1)
    # resumed: its 5 held tokens recomputed in the same forward as its next one
    assert steps[4] == Forward((Chunk(0, 6, 1, prompt=False), Chunk(1, 5, 1, 5, prompt=False)))
    assert list(steps[4].chunks[1].positions) == [0, 1, 2, 3, 4, 5]
    # without prompt_lengths every token is a prompt token (suites written before the field)
    old = {k: v for k, v in s.items() if k != "prompt_lengths"}
    assert all(c.prompt for st in plan(old, [7, 6]) if isinstance(st, Forward) for c in st.chunks)
    assert scenarios.expand(s, [7, 6])[3] == ("preempt", 1)


@pytest.mark.parametrize("schedule, lengths, message", [
    (_s([{"op": "forward", "batch": [[0, 5]]}], prompts=[3]), [5], "runs past its prompt of 3"),
    (_s([{"op": "forward", "batch": [[0, 3]]}, {"op": "forward", "batch": [[0, 2]]}], prompts=[3]),
     [5], "a decode step holds one token, not 2"),
    (_s([{"op": "forward", "batch": [[0, 5]]}], prompts=[6]), [5], "has only 5 tokens"),
    (_s([{"op": "forward", "batch": [[0, 5]]}], prompts=[0]), [5], "prompt_lengths[0]"),
    (_s([{"op": "forward", "batch": [[0, 5]]}], prompts=5), [5], "a list of 1 integers"),
    (_s([{"op": "forward", "batch": [[0, 5]]}, {"op": "share_prefix", "request": 1, "from": 0,
                                                "length": 4}, {"op": "forward", "batch": [[1, 2]]}],
        prompts=[5, 3], requests=2), [5, 6], "longer than request 1's prompt (3 tokens)"),
    (_s([{"op": "preempt", "request": 0}, {"op": "forward", "batch": [[0, 5]]}]), [5],
     "holds no cache entries"),
    (_s([{"op": "forward", "batch": [[0, 2]]}, {"op": "preempt", "request": 0},
         {"op": "preempt", "request": 0}, {"op": "forward", "batch": [[0, 3]]}]), [5], "holds no cache"),
    (_s([{"op": "forward", "batch": [[0, 3]]}, {"op": "preempt", "request": 0},
         {"op": "share_prefix", "request": 1, "from": 0, "length": 2},
         {"op": "forward", "batch": [[0, 2], [1, 2]]}], requests=2), [5, 4], "was preempted"),
    (_s([{"op": "preempt", "request": 3}]), [5], "not one of 0..0"),
])
def test_a_schedule_breaking_its_prompt_marking_or_preempting_nothing_is_refused(schedule, lengths, message):
    with pytest.raises(OraclesError) as e:
        plan(schedule, lengths)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_a_final_one_token_prefill_chunk_is_a_prompt_chunk_not_a_decode_step():
    for cid in ("scenario.final_chunk",):  # (scenario.mixed_step.small has one too: below)
        case = _case(cid)
        chunks = [st.chunks[0] for st in _plan(case) if isinstance(st, Forward)]
        prompt = case.schedule["prompt_lengths"][0]
        last = [c for c in chunks if c.prompt][-1]
        assert last.n == 1 and last.start == prompt - 1 and last.start > 0  # one token, with context
        decodes = [c for c in chunks if not c.prompt]
        assert decodes and all(c.n == 1 for c in decodes)  # the same shape, another step kind


def test_a_forward_mixes_prefill_chunks_and_decode_steps_of_several_requests():
    for cid in ("scenario.mixed_step.small", "scenario.mixed_step"):
        fwds = [st for st in _plan(_case(cid)) if isinstance(st, Forward)]
        mixed = [st for st in fwds if sum(not c.prompt for c in st.chunks) >= 2
                 # a middle chunk (context before it, prompt left after it) and a final one-token one
                 and any(c.prompt and c.start > 0 and c.n > 1 for c in st.chunks)
                 and any(c.prompt and c.start > 0 and c.n == 1 for c in st.chunks)]
        assert mixed, cid


def test_shared_prefixes_sit_at_block_multiples_and_one_off_each():
    lengths = set()
    for cid in SCENARIOS:
        if cid.startswith("scenario.prefix_blocks."):
            lengths |= {st.length for st in _plan(_case(cid)) if isinstance(st, Share)}
    for block in (16, 64, 256):
        assert block in lengths and ({block - 1, block + 1} & lengths), sorted(lengths)
    small = {st.length for st in _plan(_case("scenario.prefix_blocks.small")) if isinstance(st, Share)}
    assert small == {16, 17}


def test_decode_steps_cross_512_1024_and_4096_positions():
    for cid, boundary in (("scenario.decode.past_512", 512), ("scenario.decode.past_1024", 1024),
                          ("scenario.decode.past_4096", 4096)):
        case = _case(cid)
        decode = [c.start for st in _plan(case) if isinstance(st, Forward) for c in st.chunks if not c.prompt]
        assert min(decode) < boundary < max(decode), (cid, min(decode), max(decode))
        assert max(decode) < case.config.max_position_embeddings


def test_a_preempted_request_is_recomputed_not_remembered():
    """refimpl's run frees the preempted request's cache entries: the recompute adds as many
    slots as it holds, and its outputs still equal the request alone (float64)."""
    case = _case("scenario.preemption.small")
    tokens = scenarios.request_tokens(case)
    steps = _plan(case)
    (pre,) = [i for i, st in enumerate(steps) if isinstance(st, Preempt)]
    held = sum(c.n for st in steps[:pre] if isinstance(st, Forward) for c in st.chunks if c.request == 1)
    resumed = next(c for st in steps[pre:] if isinstance(st, Forward) for c in st.chunks if c.request == 1)
    assert resumed.recompute == held > 0
    run = scenarios.PackedRun(case_model(case, np.float64), tokens, max_len=sum(map(len, tokens)) + held)
    for st in steps:
        if isinstance(st, Share):
            run.share(st.request, st.donor, st.length)
        elif isinstance(st, Preempt):
            run.preempt(st.request)
        else:
            run.forward([(c.request, c.n) for c in st.chunks])
    assert run.cache.length == sum(map(len, tokens)) + held
    assert len(run.slots[1]) == len(tokens[1])  # a whole new block table after the recompute
    out = run.outputs()
    assert out["request.1.logits"].shape[1] == len(tokens[1])  # each position reported once


def _edit_manifest(src, dst, cid, edit):
    """A suite of one case copied from `src`, its manifest entry edited, and everything that
    pins it made consistent again, as whoever rewrites a suite can (the params recorded in
    inputs.safetensors, its sha256, the question digest): the schedule checks are the ones
    tested, not the reader's tamper checks."""
    os.makedirs(os.path.join(dst, "cases"))
    shutil.copytree(os.path.join(src, "cases", cid), os.path.join(dst, "cases", cid))
    m = json.load(open(os.path.join(src, "manifest.json")))
    m["cases"] = [e for e in m["cases"] if e["id"] == cid]
    entry = m["cases"][0]
    edit(entry)
    p = os.path.join(dst, "cases", cid, "inputs.safetensors")
    meta = dict(read_metadata(p), params=json.dumps(entry["params"], sort_keys=True))
    write_safetensors(p, read_tensors(p), metadata=meta)
    entry["files"]["inputs.safetensors"] = hashlib.sha256(open(p, "rb").read()).hexdigest()
    m["question_digest"] = question_digest(m)
    json.dump(m, open(os.path.join(dst, "manifest.json"), "w"))
    return dst


@pytest.mark.parametrize("edit, message", [
    (lambda e: e["params"]["schedule"].update(prompt_lengths=[5, 5]), "runs past its prompt"),
    (lambda e: e["params"]["schedule"]["steps"].pop(), "ends holding"),
    (lambda e: e["outputs"][[o["name"] for o in e["outputs"]].index("request.1.logits")]["shape"].__setitem__(1, 3),
     "computes 13 position(s) for request 1"),
])
def test_the_reader_cross_checks_a_schedule_against_inputs_and_outputs(default_dir, tmp_path, edit, message):
    """A suite whose schedule breaks its own rules, or whose outputs do not span the positions
    the schedule computes, is refused (one line, exit 2) before anything runs."""
    from tests.helpers import run_main

    d = _edit_manifest(default_dir, str(tmp_path / "g"), "scenario.prefix_cache.small", edit)
    g = golden.Golden(d, verify=False)
    with pytest.raises(OraclesError) as e:
        g.required("scenario.prefix_cache.small")
    assert message in str(e.value) and "\n" not in str(e.value)
    rc, _, err = run_main("check", d, "--adapter", "oracles.adapters:refimpl_float32", module="oracles")
    assert rc == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_check_entry_takes_the_request_lengths_from_the_inputs():
    entry = {"params": {"schedule": _s([{"op": "forward", "batch": [[0, 4]]}])},
             "outputs": [{"name": "request.0.logits", "shape": [1, 4, 8]}]}
    check_entry(entry, {"request.0.input_ids": [1, 4]}, "here")
    with pytest.raises(OraclesError, match="ends holding 4 of its 5"):
        check_entry(entry, {"request.0.input_ids": [1, 5]}, "here")
    with pytest.raises(OraclesError, match=r"not \[1, n\]"):
        check_entry(entry, {"request.0.input_ids": [2, 4]}, "here")
    entry["outputs"].append({"name": "request.1.logits", "shape": [1, 4, 8]})
    with pytest.raises(OraclesError, match="names no request"):
        check_entry(entry, {"request.0.input_ids": [1, 4]}, "here")


def test_what_vllm_can_express_is_decided_before_it_runs():
    """vLLM on a CPU (MLA: no chunked prefill, no prefix caching, vllm/platforms/cpu.py) runs
    the scenarios of whole prompts, decode steps and preemption, and skips the others naming
    the line of vLLM that decides it (pure Python: no vLLM needed)."""
    from oracles.engines import vllm_serving

    runs = {cid for cid in SCENARIOS if cid.startswith("scenario.") and "speculation" not in cid
            and vllm_serving.unsupported(_case(cid)) is None}
    assert runs == {"scenario.ragged_batch.long", "scenario.preemption", "scenario.decode.long",
                    "scenario.decode.past_512", "scenario.decode.past_1024", "scenario.decode.past_4096"}
    why = vllm_serving.unsupported(_case("scenario.prefix_blocks.16"))
    assert "prefix caching" in why and "vllm/platforms/cpu.py:516-530" in why
    why = vllm_serving.unsupported(_case("scenario.final_chunk"))
    assert "chunked prefill" in why and "cpu.py" in why
    idle = _s([{"op": "forward", "batch": [[0, 3], [1, 3]]}, {"op": "forward", "batch": [[0, 1]]},
               {"op": "forward", "batch": [[0, 1], [1, 1]]}], prompts=[3, 3], requests=2)
    case = type("C", (), {"schedule": idle, "inputs": {"request.0.input_ids": np.zeros((1, 5), np.int64),
                                                        "request.1.input_ids": np.zeros((1, 4), np.int64)},
                          "id": "idle"})()
    assert "scheduler.py:657-659" in vllm_serving.unsupported(case)


def test_the_preemption_case_fills_exactly_the_blocks_a_paged_engine_would_preempt_at():
    """With 16-token blocks the two requests hold 3 + 4 blocks before the preemption; the next
    decode step of request 1 (position 64) needs a fifth block of its own, request 0's (44) none."""
    from oracles.engines import vllm_serving

    case = _case("scenario.preemption")
    assert vllm_serving.blocks_before_preemption(case) == 7
    steps = _plan(case)
    (pre,) = [i for i, st in enumerate(steps) if isinstance(st, Preempt)]
    before = {c.request: c.start + c.n for st in steps[:pre] if isinstance(st, Forward) for c in st.chunks}
    assert before == {0: 44, 1: 64}
    assert vllm_serving.blocks_before_preemption(_case("scenario.decode.long")) is None
