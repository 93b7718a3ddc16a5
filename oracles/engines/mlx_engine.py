"""MLX-LM (extra `engine-mlx`: mlx[cpu], mlx-lm): a case's checkpoint directory loaded with
mlx_lm.utils.load_model, which picks mlx_lm.models.deepseek_v3 or deepseek_v2 by model_type.

    oracles check GOLDEN --engine mlx [--engine-option dtype=bfloat16 --engine-option expert_dtype=float32]

Options: dtype (float32 | bfloat16 | float16): the weights as a checkpoint stored in that dtype
would load (the gate's e_score_correction_bias stays float32, as checkpoints store it);
expert_dtype (same | float32): the routed experts' weights (switch_mlp) in float32 instead, the
values still rounded to dtype: MLX's CPU GatherMM refuses bfloat16, so a bf16 model on CPU runs
its expert GEMMs in float32. MLX keeps its KV cache in the activations' dtype.

Intermediates are module outputs observed by swapping a module's class for a recording
subclass (record.py; MLX has no hooks, and no source is patched): embed, layers.N.{attn_norm,
c_q, c_kv, attn_out, ffn_norm, ffn_out, topk_idx, topk_weight, hidden}, final_hidden, logits. Decode steps
forced tokens through mlx_lm's prompt cache; greedy takes the first maximum.
"""

from __future__ import annotations

import numpy as np

from . import model_case_support, resolve_options
from .serving import Outputs, Preempt, Share, steps_of
from .record import record_calls, restore

OPTIONS = {
    "dtype": ("float32", ("float32", "bfloat16", "float16"), "weights and activations"),
    "expert_dtype": ("same", ("same", "float32"), "routed experts' weights (GatherMM)"),
    "kv_cache_dtype": ("auto", ("auto",), "the cache is kept in the activations' dtype"),
}


class Engine:
    name = "mlx"
    SERVING = ("schedule cases through mlx_lm's caches: a one-request forward on the request's "
               "own prompt cache (make_prompt_cache); several requests in one forward on the "
               "batch cache its PromptProcessingBatch builds (KVCache.merge into BatchKVCache, "
               "prepare(right_padding), finalize, extract); a shared prefix is a copy of the "
               "donor's prompt cache trimmed to L (trim_prompt_cache); a preempted request's "
               "cache is dropped and recomputed")

    def __init__(self, options: dict | None = None):
        import mlx.core as mx
        import mlx.utils
        import mlx_lm.models.cache
        import mlx_lm.utils

        self.mx, self.mlx_utils, self.mlx_lm_utils, self.cache = mx, mlx.utils, mlx_lm.utils, mlx_lm.models.cache
        self.options = resolve_options(self.name, OPTIONS, options or {})

    def supports(self, case):
        if case.kind.startswith("mtp") or case.kind == "speculative":
            return ("MLX-LM's deepseek_v3 has no MTP module: the model builds num_hidden_layers "
                    "decoder layers only and sanitize drops the MTP layer (mlx_lm/models/"
                    "deepseek_v3.py:327-330 and :475-479 in mlx-lm 0.32.2, `# Remove multi-token "
                    "prediction layer`)")
        ok = model_case_support(case, "MLX-LM", schedules=True)
        if ok is not True:
            return ok
        cfg = case.config
        if cfg.n_shared_experts == 0:
            return ("MLX-LM cannot load n_shared_experts 0 (spec edge): it builds a 0-wide "
                    "shared-expert Linear, whose initialisation divides by zero "
                    "(mlx_lm/models/deepseek_v3.py, DeepseekV3MoE: `if config.n_shared_experts "
                    "is not None`)")
        if cfg.model_type == "deepseek_v3" and cfg.topk_method != "noaux_tc":
            return f"MLX-LM's deepseek_v3 refuses topk_method {cfg.topk_method!r} (Unsupported topk method)"
        return True

    # No close(): the models live only inside run(), and MLX must not be torn down from the
    # adapter's thread: a close() that ran gc.collect() or mx.clear_cache() there made 2 of 8
    # in-process `oracles check --engine mlx` runs abort at exit (`terminate called without an
    # active exception`; none in 8 without it, 2026-12-02).

    # ---- loading ---------------------------------------------------------------------------
    def _load(self, case):
        from pathlib import Path

        mx = self.mx
        model, _ = self.mlx_lm_utils.load_model(Path(case.model_path))
        dtype = getattr(mx, self.options["dtype"])
        if dtype != mx.float32:
            params = self.mlx_utils.tree_flatten(model.parameters())
            cast = []
            for name, a in params:
                if name.endswith("e_score_correction_bias") or not mx.issubdtype(a.dtype, mx.floating):
                    cast.append((name, a))
                    continue
                a = a.astype(dtype)
                if self.options["expert_dtype"] == "float32" and ".switch_mlp." in name:
                    a = a.astype(mx.float32)  # dtype's values, float32 GEMMs
                cast.append((name, a))
            model.load_weights(cast)
        mx.eval(model.parameters())
        return model

    def _np(self, a):
        a = self.mx.array(a)
        if self.mx.issubdtype(a.dtype, self.mx.floating):
            a = a.astype(self.mx.float32)
        return np.array(a)

    def _observe(self, model, store):
        """Record module outputs into store[name] (lists, one entry per forward call)."""
        watched = []

        def keep(obj, name, pick=lambda o: o):
            def on_output(out, *args):
                store.setdefault(name, []).append(pick(out))
            record_calls(obj, on_output)
            watched.append(obj)

        inner = model.model
        keep(inner.embed_tokens, "embed")
        keep(inner.norm, "final_hidden")
        for i, layer in enumerate(inner.layers):
            p = f"layers.{i}."
            keep(layer.input_layernorm, p + "attn_norm")
            keep(layer.self_attn, p + "attn_out")
            for sub, name in (("q_a_layernorm", "c_q"), ("kv_a_layernorm", "c_kv")):
                if getattr(layer.self_attn, sub, None) is not None:
                    keep(getattr(layer.self_attn, sub), p + name)
            keep(layer.post_attention_layernorm, p + "ffn_norm")
            keep(layer.mlp, p + "ffn_out")
            keep(layer, p + "hidden")
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None and not hasattr(gate, "in_proj"):
                keep(gate, p + "topk_idx", lambda o: o[0])
                keep(gate, p + "topk_weight", lambda o: o[1])
        return watched

    def _forward(self, model, ids, cache, store):
        logits = model(self.mx.array(ids), cache=cache)
        self.mx.eval(logits)
        store.setdefault("logits", []).append(logits)
        return logits

    # ---- run ---------------------------------------------------------------------------------
    def run(self, case):
        model = self._load(case)
        ids = np.asarray(case.inputs.get("input_ids", np.zeros((1, 0))), dtype=np.int64)
        if case.kind == "greedy":
            return {"tokens": self._greedy(model, ids, case.params["max_new_tokens"])}
        store = {}
        watched = self._observe(model, store)
        try:
            if case.kind == "schedule":
                return self._schedule(model, case, store)
            if case.kind == "prefill":
                self._forward(model, ids, None, store)
            else:  # decode: prefill, then one forced token at a time through the cache
                p = case.params["prefill"]
                cache = self.cache.make_prompt_cache(model)
                self._forward(model, ids[:, :p], cache, store)
                store.clear()
                for j in range(p, ids.shape[1]):
                    self._forward(model, ids[:, j:j + 1], cache, store)
        finally:
            for obj in watched:
                restore(obj)
        out = {}
        for k, v in store.items():
            arrs = [self._np(a) for a in v]
            out[k] = np.concatenate(arrs, axis=1)
            if k.endswith("topk_idx"):
                out[k] = out[k].astype(np.int64)
        return out

    # ---- serving schedules -------------------------------------------------------------------
    def _schedule(self, model, case, store):
        """A `schedule` case through mlx_lm's serving caches (SERVING in the module docstring)."""
        import copy

        mx, cache_mod = self.mx, self.cache
        tokens, steps = steps_of(case)
        outputs = Outputs(len(tokens))
        caches = {}  # request -> its prompt cache (a list of per-layer caches)
        for st in steps:
            if isinstance(st, Share):  # the donor's prompt cache, copied and trimmed to L
                c = copy.deepcopy(caches[st.donor])
                held = c[0].size()
                cache_mod.trim_prompt_cache(c, held - st.length)
                caches[st.request] = c
                continue
            if isinstance(st, Preempt):  # freed: the next forward recomputes it
                caches.pop(st.request, None)
                continue
            chunks = st.chunks
            for c in chunks:
                caches.setdefault(c.request, cache_mod.make_prompt_cache(model))
            seqs = [tokens[c.request][c.start - c.recompute:c.start + c.n].tolist() for c in chunks]
            store.clear()
            if len(chunks) == 1:  # the request's own prompt cache
                self._forward(model, np.array([seqs[0]]), caches[chunks[0].request], store)
            else:  # its batch caches: merged, right-padded, rolled back, extracted
                batch = self._merge([caches[c.request] for c in chunks])
                lengths = [len(q) for q in seqs]
                width = max(lengths)
                padding = [width - n for n in lengths]
                if max(padding):
                    for layer in batch:
                        layer.prepare(lengths=lengths, right_padding=padding)
                ids = np.array([q + [0] * p for q, p in zip(seqs, padding)])
                self._forward(model, ids, batch, store)
                if max(padding):
                    for layer in batch:
                        layer.finalize()
                mx.eval([layer.state for layer in batch])
                for i, c in enumerate(chunks):
                    caches[c.request] = [layer.extract(i) for layer in batch]
            for i, c in enumerate(chunks):  # its new tokens: the last n of its row's real tokens
                last = len(seqs[i])
                piece = {}
                for k, v in store.items():
                    a = self._np(v[-1])
                    if a.ndim >= 2 and a.shape[0] == len(chunks):
                        piece[k] = a[i:i + 1, last - c.n:last]
                outputs.add(c.request, piece)
        return outputs.result()

    @staticmethod
    def _merge(caches):
        """Per-request prompt caches -> one batch cache per layer (each layer's merge: what
        mlx_lm's PromptProcessingBatch builds, generate._merge_caches)."""
        return [caches[0][i].merge([c[i] for c in caches]) for i in range(len(caches[0]))]

    def _greedy(self, model, ids, new):
        cache = self.cache.make_prompt_cache(model)
        logits = self._forward(model, ids, cache, {})
        toks = []
        while True:
            nxt = int(np.argmax(self._np(logits[0, -1])))  # first maximum: lower id on ties
            toks.append(nxt)
            if len(toks) == new:
                return np.array([toks], dtype=np.int64)
            logits = self._forward(model, np.array([[nxt]]), cache, {})
