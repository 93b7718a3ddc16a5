"""Serving scenarios (oracles/authoring/scenarios.py): refimpl run through each schedule, with its own latent
cache, gives what each request gives alone; the schedules take the paths they claim (chunk edges
across 16/64/256, a prefix computed once, ragged and mixed batches, positions past 256 and past
the original context, MTP depth >= 2); the schedule is machine-readable where an engine reads
it, and an engine that cannot express it skips with its reason."""

import json
import os

import numpy as np
import pytest

import refimpl
from oracles import OraclesError
from oracles.authoring import scenarios
from oracles.authoring import writer
from oracles.format import golden
from oracles.checking.candidates import AdapterCandidate
from oracles.checking.check import MIN_COMPARED, run_check
from oracles.authoring.emulate import run_case
from oracles.authoring.suites import suite_cases
from refimpl.generate import greedy
from tests.helpers import rel_err

DEFAULT = {cid: b for cid, b in suite_cases("default") if cid.startswith("scenario.")}
SCENARIOS = dict(suite_cases("scenarios"))
ALL = {**DEFAULT, **SCENARIOS}
THOROUGH = os.environ.get("HYPOTHESIS_PROFILE") == "thorough"
# the scenarios suite's cases that take more than a few seconds in float64 (its real MLA widths,
# thousands of positions): run in the thorough profile; the default suite's small scenarios
# take every path (chunks, prefixes at a block multiple and one off, mixed steps, a final
# one-token chunk, preemption, speculation) in the fast one
LONG = {"scenario.decode.past_4096", "scenario.decode.past_1024", "scenario.decode.long",
        "scenario.speculation.depth2", "scenario.speculation.depth3", "scenario.ragged_batch.long",
        "scenario.prefix_cache.long", "scenario.prefix_blocks.64", "scenario.prefix_blocks.256",
        "scenario.mixed_step", "scenario.chunked_prefill.crossing"}
slow = pytest.mark.skipif(not THOROUGH, reason="the scenarios suite's long cases run in the "
                                                 "thorough profile (HYPOTHESIS_PROFILE=thorough)")


def _build(cid):
    return ALL[cid](cid)


@pytest.mark.parametrize("cid", [pytest.param(c, marks=[pytest.mark.slow, slow]) if c in LONG else c
                                 for c in sorted(ALL)])
def test_the_schedule_gives_what_each_request_gives_alone(cid):
    """float64, through the schedule (packed cache, block tables, chunks, shared slots, the MTP
    drafter) against one whole-sequence forward per request: equal to 1e-12."""
    case = _build(cid)
    through = run_case(case, "float64")
    alone = run_case(case, "float64", alone=True)
    assert list(through) == list(alone)  # the same outputs, in the same order
    for name, want in alone.items():
        got = through[name]
        assert got.shape == want.shape, name
        if np.issubdtype(want.dtype, np.integer):
            assert np.array_equal(got, want), name
        else:
            assert rel_err(got, want) <= 1e-12, (name, rel_err(got, want))


def _edges(case):
    """Chunk edges of request 0's forwards: positions where one forward ends."""
    tokens = scenarios.request_tokens(case)
    held, edges = 0, []
    for st in scenarios.expand(case.schedule, [len(t) for t in tokens]):
        if st[0] == "forward":
            for r, n in st[1]:
                if r == 0:
                    held += n
                    edges.append(held)
    return edges


def test_chunk_edges_cross_and_land_on_16_64_and_256():
    crossing = _edges(_build("scenario.chunked_prefill.crossing"))
    aligned = _edges(_build("scenario.chunked_prefill.aligned"))
    for b in (16, 64, 256):
        assert any(a < b < c for a, c in zip([0] + crossing, crossing)), b  # a chunk straddles b
        assert b in aligned  # a chunk ends exactly at b
    small = _edges(_build("scenario.chunked_prefill.small"))
    assert any(a < 16 < c for a, c in zip([0] + small, small))
    assert any(a < 64 < c for a, c in zip([0] + small, small))


def test_long_decodes_run_hundreds_of_steps_past_256_and_past_the_original_context():
    case = _build("scenario.decode.long")
    steps = scenarios.expand(case.schedule, [len(t) for t in scenarios.request_tokens(case)])
    one_token = [st for st in steps if st[0] == "forward" and st[1] == [(0, 1)]]
    last = len(scenarios.request_tokens(case)[0]) - 1
    assert len(one_token) >= 300 and last > 256
    assert last >= case.config.rope_scaling.original_max_position_embeddings
    spec = _build("scenario.speculation.depth2")
    assert spec.params["depth"] >= 2
    assert spec.inputs["input_ids"].shape[1] + spec.params["max_new_tokens"] > 256
    assert _build("scenario.speculation.depth3").params["depth"] == 3


def test_the_prefix_is_computed_once_and_its_cache_entries_reused():
    case = _build("scenario.prefix_cache.long")
    from oracles.authoring.kinds import case_model as _model

    tokens = scenarios.request_tokens(case)
    run = scenarios.PackedRun(_model(case, np.float64), tokens)
    for st in scenarios.expand(case.schedule, [len(t) for t in tokens]):
        run.share(*st[1:]) if st[0] == "share" else run.forward(st[1])
    prefix = scenarios.shared_lengths(case.schedule, 2)[1]
    assert prefix == 100
    assert run.cache.length == len(tokens[0]) + len(tokens[1]) - prefix  # no slot computed twice
    assert np.array_equal(run.slots[1][:prefix], run.slots[0][:prefix])
    out = run.outputs()
    assert out["request.1.logits"].shape[1] == len(tokens[1]) - prefix  # its own positions only


def test_ragged_batches_mix_prefill_and_decode_in_one_forward():
    case = _build("scenario.ragged_batch.small")
    steps = scenarios.expand(case.schedule, [len(t) for t in scenarios.request_tokens(case)])
    batches = [st[1] for st in steps if st[0] == "forward"]
    first = batches[0]
    assert len(first) >= 2 and len({n for _, n in first}) == len(first)  # different lengths, one forward
    assert any({n for _, n in b} >= {1} and max(n for _, n in b) > 1 for b in batches[1:])  # mixed


def test_expected_values_are_each_request_alone_and_speculation_equals_greedy(default_golden):
    g = default_golden
    case, exp = g.load_case("scenario.prefix_cache.small"), g.expected("scenario.prefix_cache.small")
    model = refimpl.load(case.model_path)
    share = scenarios.shared_lengths(case.schedule, 2)
    for r, toks in enumerate(scenarios.request_tokens(case)):
        want = np.asarray(model.forward(toks[None, :]))[:, share[r]:]
        assert rel_err(exp[f"request.{r}.logits"], want) <= 1e-12
    case, exp = g.load_case("scenario.speculation.depth2.short"), g.expected("scenario.speculation.depth2.short")
    n = case.params["max_new_tokens"]
    assert exp["tokens"][0].tolist() == greedy(refimpl.load(case.model_path), case.inputs["input_ids"][0], n)
    p = case.inputs["input_ids"].shape[1]
    assert exp["logits"].shape[1] == p + n - 1
    assert [exp[f"mtp.{k}.logits"].shape[1] for k in (1, 2)] == [p + n - 1, p + n - 2]


def test_the_schedule_is_in_the_manifest_and_the_inputs_metadata(default_golden):
    g = default_golden
    kinds = set()
    for cid in DEFAULT:
        entry = g.cases[cid]
        kinds.add(entry["kind"])
        meta = golden.read_metadata(os.path.join(g.case_dir(cid), "inputs.safetensors"))
        assert json.loads(meta["params"])["schedule"] == entry["params"]["schedule"]
        assert g.load_case(cid).schedule == entry["params"]["schedule"]  # what an adapter gets
    assert kinds == set(scenarios.SCHEDULE_KINDS)


@pytest.mark.parametrize("schedule, message", [
    ({"format": 2, "requests": 1, "steps": []}, "format-1"),
    ({"format": 1, "requests": 2, "steps": [{"op": "forward", "batch": [[0, 5]]}]}, "2, but the inputs hold 1"),
    ({"format": 1, "requests": 1, "steps": [{"op": "forward", "batch": [[0, 3]]}]}, "ends holding 3 of its 5"),
    ({"format": 1, "requests": 1, "steps": [{"op": "forward", "batch": [[0, 6]]}]}, "has only 5"),
    ({"format": 1, "requests": 1, "steps": [{"op": "fwd", "batch": [[0, 5]]}]}, "steps[0].op"),
    ({"format": 1, "requests": 1, "steps": [{"op": "forward", "batch": [[0, 0]]}]}, "integer >= 1"),
    ({"format": 1, "requests": 1, "steps": [{"op": "forward", "batch": [[0, 1]], "repeat": True}]}, "repeat"),
    ({"format": 1, "requests": 1, "steps": [{"op": "forward", "batch": [[0, 2], [0, 3]]}]}, "twice"),
    ({"format": 1, "requests": 1, "steps": [{"op": "share_prefix", "request": 0, "from": 0,
                                             "length": 1}]}, "two of"),
])
def test_a_malformed_schedule_is_one_line_naming_the_step(schedule, message):
    with pytest.raises(OraclesError) as e:
        scenarios.expand(schedule, [5])
    assert message in str(e.value) and "\n" not in str(e.value)


def test_sharing_more_than_the_other_request_holds_is_refused():
    s = {"format": 1, "requests": 2, "steps": [
        {"op": "forward", "batch": [[0, 3]]},
        {"op": "share_prefix", "request": 1, "from": 0, "length": 4}]}
    with pytest.raises(OraclesError, match=r"steps\[1\]: request 0 holds only 3"):
        scenarios.expand(s, [3, 6])


class _NoSchedules:
    """An engine that runs whole requests only."""

    def supports(self, case):
        if case.schedule is not None:
            return "this engine runs each request in one forward; it has no chunked prefill"
        return True

    def run(self, case):
        raise AssertionError("never asked")


def test_an_engine_that_cannot_express_a_schedule_skips_with_its_reason(default_golden):
    rep = run_check(default_golden, AdapterCandidate(_NoSchedules(), "whole-requests"), "float32",
                    only="scenario.*")
    assert rep["counts"]["skip"] == len(DEFAULT)
    assert {r["reason"] for r in rep["cases"]} == \
        {"this engine runs each request in one forward; it has no chunked prefill"}


def test_a_file_route_engine_skips_a_schedule_with_skip_txt(default_golden, tmp_path):
    from oracles.checking.candidates import DirCandidate

    d = tmp_path / "cand" / "cases" / "scenario.ragged_batch.small"
    d.mkdir(parents=True)
    (d / "skip.txt").write_bytes(b"no ragged batches in this engine\x1b[31m\nsecond line\n")
    rep = run_check(default_golden, DirCandidate(str(tmp_path / "cand")), "float32",
                    only="scenario.ragged_batch.small,scenario.prefix_cache.small")
    status = {r["id"]: (r["status"], r.get("reason")) for r in rep["cases"]}
    assert status["scenario.ragged_batch.small"] == ("skip", "no ragged batches in this engine[31m")
    assert status["scenario.prefix_cache.small"][0] == "missing"  # no skip.txt, no outputs


def test_after_a_forgiven_near_tie_the_stream_outputs_are_compared_only_before_it(default_golden):
    """A speculation candidate whose stream goes another way at a near-tie (allowed) passes
    whatever its logits are after that step, and still fails for a wrong logit before it."""
    from oracles.checking.check import judge

    cid = "scenario.speculation.depth2.short"
    g = default_golden
    entry, exp = g.cases[cid], g.expected(cid)
    tols = entry["tolerances"]["bf16"]
    near = np.nonzero(exp["tokens_margin"][0] <= tols["tokens"]["logit_eps"])[0]
    assert len(near) and near[0] + 3 < exp["tokens"].shape[1]  # this case has a near-tie
    n, j = exp["tokens"].shape[1], int(near[0]) + 2  # the stream goes another way after it
    cand = {k: v.copy() for k, v in exp.items() if k in {o["name"] for o in entry["outputs"]}}
    cand["tokens"][0, j:] = (cand["tokens"][0, j:] + 1) % 256  # another stream from step j
    for k, v in cand.items():
        if k != "tokens" and v.dtype.kind == "f":
            # another sequence in the last N - j positions of every output: module k's index
            # P + j - k on (its input t_(i+k) is token j), the main model's P + j on (and, as the
            # checker conservatively leaves it out too, P + j - 1)
            v[:, v.shape[1] - (n - j):] += 1.0
    res = judge(entry["kind"], entry["outputs"], exp, cand, tols)
    # nothing fails; the stream was verified only up to step j, so when that is under the
    # checker's minimum share the case is INCONCLUSIVE (never PASS), and says so of the tokens
    assert res["status"] == ("pass" if j / n >= MIN_COMPARED else "inconclusive"), res
    if res["status"] == "inconclusive":
        assert res["compared"]["output"] == "tokens" and res["compared"]["positions"] == j
    cand["logits"][:, -(n - j) - 1] += 1.0  # a position whose inputs precede the divergence
    res = judge(entry["kind"], entry["outputs"], exp, cand, tols)
    assert res["status"] == "fail" and res["first_failure"] == "logits"


@pytest.mark.parametrize("cid", ["scenario.speculation.depth2.short",
                                 pytest.param("scenario.speculation.depth3", marks=[pytest.mark.slow, slow])])
def test_speculation_accepts_drafts_at_depth_2_and_rejects_others(cid):
    """The schedule takes both paths: several tokens committed in one forward (a depth-2 draft
    accepted) and a rollback (a draft rejected)."""
    from oracles.authoring.kinds import case_model as _model
    from refimpl.generate import decode

    case = _build(cid)
    rep = decode(_model(case, np.float64), case.inputs["input_ids"][0],
                 case.params["max_new_tokens"], use_mtp=True, depth=case.params["depth"])
    assert rep.accepted[1] >= 1 and rep.accepted[0] < rep.drafted[0]


def test_a_long_scenario_suite_case_is_written_and_passed_by_the_reference(tmp_path):
    """The scenarios suite end to end for one case (generate, then check the reference in
    float32 and in emulated bf16 under their profiles): it is a suite like the others."""
    from oracles.checking.candidates import load_adapter

    out = str(tmp_path / "scenarios")
    writer.generate(out, "scenarios", only="scenario.final_chunk")
    assert run_check(out, load_adapter("oracles.adapters:refimpl_float32"), "float32")["ok"]
    bf16 = load_adapter("oracles.adapters:refimpl_bf16")
    rep = run_check(out, bf16, "bf16")
    assert rep["counts"]["fail"] == 0, rep
    assert run_check(out, bf16, "float32")["counts"]["fail"] > 0
